"""The scheduler: hands due rows to the broker, again and again if need be.

SQL is the truth and the broker only a wake-up call, so this loop is what
makes the queue whole: it dispatches deferred messages when their time
comes, messages whose lease expired (a worker died), and messages whose
dispatch never reached the broker (it was down, or restarted empty). Run
one (or more: on PostgreSQL they skip each other's rows).

``mailqueue scheduler`` refuses to start on a database without mailqueue's
tables (``migrate.require_schema``). Once running, a tick that fails (the
database or the broker unreachable, the tables gone after a restore) is
logged once per state change, one ERROR when it starts and one INFO when
ticks succeed again, and the loop backs off (doubling, up to a minute)
instead of logging every tick.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from dataclasses import dataclass

from . import metrics as _metrics
from .config import Settings, get_settings, hide_password
from .store import Store, get_engine
from .store.db import is_missing_tables
from .worker.app import dispatch

__all__ = ["Scheduler", "run_scheduler"]

log = logging.getLogger("mailqueue.scheduler")


@dataclass
class TickReport:
    dispatched: int = 0
    undispatched: int = 0


class Scheduler:
    """One tick finds due rows and dispatches them; ``run`` ticks until stopped."""

    def __init__(self, settings: Settings | None = None, *, limit: int = 5000) -> None:
        self.settings = settings or get_settings()
        self.store = Store(get_engine(self.settings.database_url))
        self.limit = limit
        self._stop = threading.Event()

    def tick(self) -> TickReport:
        report = TickReport()
        while True:
            taken = self.store.take_due(
                limit=self.limit, redispatch_after_s=self.settings.redispatch_after_s
            )
            if not taken:
                return report
            for priority, ids in _by_lane(taken):
                if dispatch(ids, settings=self.settings, priority=priority):
                    report.dispatched += len(ids)
                else:
                    # the rest stay flagged for the next tick (dispatch flagged these)
                    rest = [i for i, p in taken if p > priority]
                    if rest:
                        self.store.mark_undispatched(rest)
                    report.undispatched += len(ids) + len(rest)
                    return report
            if len(taken) < self.limit:
                return report

    def run(self) -> None:
        """Tick until stopped. A failing tick (database or broker unreachable, tables
        gone) is logged once per state change, not once per tick: one ERROR when a
        new kind of failure starts (with its traceback if unexpected), one INFO when
        ticks succeed again; in between the wait doubles, up to ``_MAX_BACKOFF_S``."""
        interval = self.settings.scheduler_interval_s
        log.info("scheduler started (every %.1fs)", interval)
        failing: str | None = None  # the kind of failure in progress, if any
        failures = 0
        while not self._stop.is_set():
            try:
                report = self.tick()
                _metrics.scheduler_tick(report, self.store.engine)
                if failing is not None:
                    log.info("ticking again after %d failed tick(s): %s", failures, failing)
                    failing, failures = None, 0
                if report.dispatched or report.undispatched:
                    log.info(
                        "dispatched %d, broker refused %d", report.dispatched, report.undispatched
                    )
            except Exception as exc:  # noqa: BLE001 - a database blip must not end the scheduler
                kind = _failure_kind(exc)
                failures += 1
                if kind != failing:
                    self._log_failure(exc, kind)
                    failing = kind
                else:
                    log.debug("scheduler tick failed again (%d in a row): %s", failures, kind)
            wait = interval if failing is None else _backoff(interval, failures)
            self._stop.wait(wait)
        log.info("scheduler stopped")

    def _log_failure(self, exc: Exception, kind: str) -> None:
        if is_missing_tables(exc):
            log.error(
                "the database at %s has no mailqueue tables: run `mailqueue migrate`; "
                "trying again with backoff (logged again only when this changes)",
                hide_password(self.settings.database_url),
            )
        else:
            log.error(
                "scheduler tick failed (%s); trying again with backoff up to %.0fs "
                "(logged again only when this changes)",
                kind,
                _MAX_BACKOFF_S,
                exc_info=exc,
            )

    def stop(self) -> None:
        self._stop.set()


def _by_lane(taken: list[tuple[uuid.UUID, int]]) -> list[tuple[int, list[uuid.UUID]]]:
    """(priority, ids) per lane, highest lane first: one lane per dispatch batch."""
    lanes: dict[int, list[uuid.UUID]] = {}
    for message_id, priority in taken:
        lanes.setdefault(priority, []).append(message_id)
    return sorted(lanes.items())


_MAX_BACKOFF_S = 60.0
"""The longest wait between two failing ticks."""


def _backoff(interval: float, failures: int) -> float:
    """The wait after ``failures`` failed ticks in a row: the interval, doubled each time."""
    return float(min(max(interval, _MAX_BACKOFF_S), interval * 2 ** min(failures, 16)))


def _failure_kind(exc: BaseException) -> str:
    """What went wrong, in words that stay the same while the same thing stays wrong."""
    if is_missing_tables(exc):
        return "no mailqueue tables"
    orig = getattr(exc, "orig", None)
    cause = orig if orig is not None else exc
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {first_line[:200]}"


def run_scheduler(settings: Settings | None = None) -> None:
    """Run until SIGINT or SIGTERM (what ``mailqueue scheduler`` does)."""
    scheduler = Scheduler(settings)

    def _stop(*_: object) -> None:
        scheduler.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    scheduler.run()
