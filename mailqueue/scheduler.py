"""The scheduler: hands due rows to the broker, again and again if need be.

SQL is the truth and the broker only a wake-up call, so this loop is what
makes the queue whole: it dispatches deferred messages when their time
comes, messages whose lease expired (a worker died), and messages whose
dispatch never reached the broker (it was down, or restarted empty). Run
one (or more: on PostgreSQL they skip each other's rows).

``mailqueue scheduler`` refuses to start on a database without mailqueue's
tables (``migrate.require_schema``). Should the tables vanish while it runs
(a database restored from before ``migrate``), each tick logs one ERROR line
saying so, without a traceback, and the loop goes on.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

from . import metrics as _metrics
from .config import Settings, get_settings, hide_password
from .store import Store, get_engine
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
            ids = self.store.take_due(
                limit=self.limit, redispatch_after_s=self.settings.redispatch_after_s
            )
            if not ids:
                return report
            if dispatch(ids, settings=self.settings):
                report.dispatched += len(ids)
            else:
                report.undispatched += len(ids)
                return report
            if len(ids) < self.limit:
                return report

    def run(self) -> None:
        log.info("scheduler started (every %.1fs)", self.settings.scheduler_interval_s)
        while not self._stop.is_set():
            try:
                report = self.tick()
                _metrics.scheduler_tick(report, self.store.engine)
                if report.dispatched or report.undispatched:
                    log.info(
                        "dispatched %d, broker refused %d", report.dispatched, report.undispatched
                    )
            except Exception as exc:  # noqa: BLE001 - a database blip must not end the scheduler
                if _missing_tables(exc):
                    log.error(
                        "the database at %s has no mailqueue tables: run `mailqueue migrate`; "
                        "trying again in %.1fs",
                        hide_password(self.settings.database_url),
                        self.settings.scheduler_interval_s,
                    )
                else:
                    log.exception("scheduler tick failed; trying again")
            self._stop.wait(self.settings.scheduler_interval_s)
        log.info("scheduler stopped")

    def stop(self) -> None:
        self._stop.set()


def _missing_tables(exc: BaseException) -> bool:
    """The database said a mailqueue table does not exist (SQLite's words, or
    PostgreSQL's undefined_table); ``migrate.is_missing_tables`` for the CLI."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "42P01":
        return True
    return "no such table: mq_" in str(orig if orig is not None else exc)


def run_scheduler(settings: Settings | None = None) -> None:
    """Run until SIGINT or SIGTERM (what ``mailqueue scheduler`` does)."""
    scheduler = Scheduler(settings)

    def _stop(*_: object) -> None:
        scheduler.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    scheduler.run()
