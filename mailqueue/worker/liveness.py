"""Alive means working: a worker that cannot consume says so, and then exits non-zero.

Three signals, one judgement (issue #21):

* **Exit status.** ``run_worker`` returns Celery's own exit status, which
  ``Celery.worker_main`` throws away (``Celery.start`` drops the value
  click returns): after an unrecoverable broker error
  (kombu's ``restore_unacked`` raising ``AttributeError`` on a channel that
  died with Redis, say) Celery logs ``Unrecoverable error``, stops with
  status 1, and the process used to exit 0 anyway. Status 0 now means
  "asked to stop" (SIGTERM, SIGINT) and nothing else, so ``Restart=on-failure``,
  supervisord's ``autorestart=unexpected`` and container restart policies
  bring the worker back.
* **Watchdog.** A thread of the main process judges every second whether the
  worker is *consuming*: the consumer's bootsteps are started (connected,
  subscribed) and its event loop ran a heartbeat timer within the last
  ``MAILQUEUE_WORKER_STALL_S`` (default 60 s) — or a task is running in
  this process (the solo and threads pools run tasks on the consumer's
  thread). A worker that is not consuming for that long (a broker that
  never comes back, a consumer wedged in a loop) is stopped with status 1:
  a warm stop, so batches in the children finish and are recorded, and a
  hard ``os._exit(1)`` if that stop itself has not ended ``STOP_GRACE_S``
  later. A stop asked for by a signal is never turned into a failure.
* **Probe and metric.** While it judges the worker consuming, the watchdog
  touches ``MAILQUEUE_HEALTH_FILE`` (when set) every ``BEAT_S`` seconds;
  ``mailqueue worker --check-health`` exits 1 when that file is older than
  ``--max-age`` (the compose healthcheck). The gauge
  ``mailqueue_worker_consuming`` is 1 or 0 on the worker's metrics port.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals

from .. import metrics as _metrics

__all__ = [
    "BEAT_S",
    "HEALTH_FILE_ENV",
    "STALL_ENV",
    "check_health",
    "run_worker",
    "stall_s",
]

log = logging.getLogger("mailqueue.worker")

HEALTH_FILE_ENV = "MAILQUEUE_HEALTH_FILE"
STALL_ENV = "MAILQUEUE_WORKER_STALL_S"
DEFAULT_STALL_S = 60.0
BEAT_S = 2.0
"""How often the consumer's event loop beats, and the watchdog looks."""
STOP_GRACE_S = 120.0
"""How long a stop the watchdog asked for may take before it becomes ``os._exit(1)``
(the shipped unit's ``TimeoutStopSec``)."""
EX_NOT_CONSUMING = 1


def stall_s(environ: dict[str, str] | None = None) -> float:
    """``MAILQUEUE_WORKER_STALL_S``: seconds without consuming before the worker exits 1."""
    raw = (environ if environ is not None else os.environ).get(STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_STALL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STALL_ENV}={raw!r}: expected seconds, e.g. 60") from None
    if value <= 0:
        raise ValueError(f"{STALL_ENV}={raw!r}: must be more than 0 seconds")
    return value


class _Liveness:
    """What the consumer, the task signals and the shutdown signals tell the watchdog."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.subscribed = False  # the consumer's steps are started
        self.last_beat: float | None = None  # monotonic: the consumer loop's last timer tick
        self.inline_tasks = 0  # tasks running in this process (solo/threads pools)
        self.stop_requested = False  # a signal asked the worker to stop

    def consuming(self, now: float, stall: float) -> bool:
        with self.lock:
            if self.stop_requested:
                return False
            if self.inline_tasks:
                return True
            return self.subscribed and self.last_beat is not None and now - self.last_beat <= stall


_live = _Liveness()


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """A consumer bootstep: started once the worker consumes, stopped when the
    connection is lost (Celery restarts the consumer's steps around a reconnect).
    Its timer runs on the consumer's event loop, so it stops with the loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        with _live.lock:
            _live.subscribed = True
            _live.last_beat = time.monotonic()
        self.tref = c.timer.call_repeatedly(BEAT_S, _beat)

    def stop(self, c: Any) -> None:
        with _live.lock:
            _live.subscribed = False
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)


def _beat() -> None:
    with _live.lock:
        _live.last_beat = time.monotonic()


def _task_started(**_: Any) -> None:
    with _live.lock:
        _live.inline_tasks += 1


def _task_ended(**_: Any) -> None:
    with _live.lock:
        _live.inline_tasks = max(0, _live.inline_tasks - 1)


def _stop_requested(**_: Any) -> None:
    with _live.lock:
        _live.stop_requested = True


class _Watchdog(threading.Thread):
    def __init__(self, stall: float, health_file: Path | None) -> None:
        super().__init__(name="mailqueue-watchdog", daemon=True)
        self.stall = stall
        self.health_file = health_file
        self.done = threading.Event()

    def run(self) -> None:
        last_ok = time.monotonic()
        shown: bool | None = None
        asked_at: float | None = None
        while not self.done.wait(BEAT_S):
            now = time.monotonic()
            ok = _live.consuming(now, self.stall)
            if ok != shown:
                _metrics.worker_consuming(ok)
                shown = ok
            if ok:
                last_ok = now
                self._touch()
                continue
            if _live.stop_requested:
                return  # stopping on purpose: not a failure, and no longer healthy
            if asked_at is None and now - last_ok > self.stall:
                asked_at = now
                log.critical(
                    "worker has not consumed from the broker for %.0f s (%s=%g); stopping "
                    "with status %d so that its supervisor restarts it",
                    now - last_ok,
                    STALL_ENV,
                    self.stall,
                    EX_NOT_CONSUMING,
                )
                from celery.worker import state

                state.should_stop = EX_NOT_CONSUMING  # a warm stop: children finish their batches
            elif asked_at is not None and now - asked_at > STOP_GRACE_S:
                log.critical("the stop did not end within %.0f s; exiting now", STOP_GRACE_S)
                logging.shutdown()
                os._exit(EX_NOT_CONSUMING)

    def _touch(self) -> None:
        if self.health_file is None:
            return
        try:
            self.health_file.touch()
        except OSError as exc:
            log.warning("could not touch %s=%s: %s", HEALTH_FILE_ENV, self.health_file, exc)


def health_file(environ: dict[str, str] | None = None) -> Path | None:
    raw = (environ if environ is not None else os.environ).get(HEALTH_FILE_ENV, "").strip()
    return Path(raw) if raw else None


def run_worker(app: Celery, argv: Sequence[str]) -> int:
    """Run ``celery worker`` with the liveness bootstep and watchdog; return its exit status.

    0 only when the worker was asked to stop; 1 after an unrecoverable error or
    when it stopped consuming for ``MAILQUEUE_WORKER_STALL_S``.
    """
    stall = stall_s()
    target = health_file()
    if target is not None:
        target.unlink(missing_ok=True)  # a file left by an earlier run says nothing about this one
    app.steps["consumer"].add(ConsumerHeartbeat)
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_ended, weak=False)
    signals.worker_shutting_down.connect(_stop_requested, weak=False)
    _metrics.worker_consuming(False)
    watchdog = _Watchdog(stall, target)
    watchdog.start()
    try:
        code = _celery_main(app, argv)
    finally:
        watchdog.done.set()
        _metrics.worker_consuming(False)
        if target is not None:
            target.unlink(missing_ok=True)
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _celery_main(app: Celery, argv: Sequence[str]) -> Any:
    """``celery worker …`` for ``app``, returning its exit status.

    What ``Celery.start`` does, minus dropping the status: with click's
    ``standalone_mode=False`` the status is the return value of ``main``.
    """
    from celery.bin.celery import celery
    from click.exceptions import Exit

    celery.params[0].default = app
    try:
        return celery.main(args=list(argv), standalone_mode=False)
    except Exit as exc:
        return exc.exit_code
    finally:
        celery.params[0].default = None


def check_health(path: Path | None, max_age_s: float) -> tuple[bool, str]:
    """Is the worker that writes ``path`` consuming? (healthy, what to print)."""
    if path is None:
        return False, f"{HEALTH_FILE_ENV} is not set: the worker writes no heartbeat to check"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, (
            f"no heartbeat at {path}: the worker is starting, stopped, or has never consumed"
        )
    if age > max_age_s:
        return False, (
            f"heartbeat at {path} is {age:.0f} s old (more than {max_age_s:g} s): the worker "
            "is not consuming from the broker; see its log"
        )
    return True, f"consuming (heartbeat {age:.0f} s ago)"
