"""The Celery app, its one task, and dispatching ids to it.

Tasks carry message ids only (never content, never secrets). Celery is set
for at-least-once hand-off (``acks_late``, ``reject_on_worker_lost``,
prefetch 1 on Redis); duplicates are harmless because a worker must *claim* rows
before it sends. Long waits never live in the broker: a deferred message is
a row with ``next_attempt_at`` that the scheduler dispatches when due.

Each priority lane has its own queue (``priority.lane_queue``); a task's ids
all share one lane, and workers take the lanes' queues in the order
``lanes.py`` sets.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals
from sqlalchemy.exc import OperationalError

from ..config import Settings, get_settings, hide_password
from ..priority import NORMAL, lane_queue, lane_queues, priority_word
from ..store import Store, dispose_engines, get_engine
from .handoff import Handoff
from .lanes import LANE_CYCLE_PATH
from .loop import get_loop_thread
from .service import Deliverer
from .sqlite_broker import prepare_sqlite_broker
from .stopping import shield_child_from_group_sigterm

# A string: kombu imports the transport (and SQLAlchemy's ORM) only when it is used.
SQLA_TRANSPORT_PATH = "mailqueue.worker.sqla_transport:SqlaTransport"

__all__ = [
    "get_app",
    "dispatch",
    "dispatch_committed",
    "flush_dispatch",
    "get_deliverer",
    "TASK_NAME",
]

log = logging.getLogger("mailqueue.dispatch")

TASK_NAME = "mailqueue.deliver"

# How long one connect or command to a Redis broker may take before it counts as down.
BROKER_SOCKET_TIMEOUT_S = 4.0

# Tasks reserved per worker child on the serverless (polling) broker.
SQLITE_BROKER_PREFETCH = 8

_app: Celery | None = None
_app_lock = threading.Lock()
_deliverer: Deliverer | None = None


def _make_app(settings: Settings) -> Celery:
    broker_url = settings.broker_url
    transport_options: dict[str, Any] = {}
    broker: dict[str, Any] = {}
    prefetch = 1
    if broker_url.startswith("sqla+"):
        # The serverless broker polls its table: every 0.2 s through this app's
        # own subclass of kombu's transport (sqla_transport.py says why not an
        # option or kombu's class). A transport named explicitly takes the URL
        # without the "sqla+" prefix; the engine and the tables are the same.
        broker = {"broker_transport": SQLA_TRANSPORT_PATH}
        broker_url = broker_url.removeprefix("sqla+")
        # A polling consumer whose prefetch is full sleeps a whole interval
        # before it looks again, even when its children finished long ago:
        # with prefetch 1, single enqueue()s drained at 2 tasks per 0.2 s
        # (10 msg/s, measured). Reserving more per child keeps them fed; a
        # reserved id lost with a killed worker is re-dispatched from SQL.
        prefetch = SQLITE_BROKER_PREFETCH
        prepare_sqlite_broker(settings.broker_url, lane_queues(settings.queue_name))
    if settings.broker_url.startswith(("redis", "rediss")):
        # A task is redelivered if not acknowledged within this time; it must
        # outlast the longest batch (the claim makes a redelivery harmless).
        transport_options["visibility_timeout"] = 3600
        # Without these, a publish to a Redis that accepts the connection but never
        # answers (a dead host behind NAT, a stuck server) waits forever, and with
        # it the exit of every process that enqueued (the hand-off is flushed at
        # exit). Bounded: (1 + max_retries) * BROKER_SOCKET_TIMEOUT_S plus the
        # retry intervals; consuming is unaffected (BRPOP answers every second).
        transport_options["socket_connect_timeout"] = BROKER_SOCKET_TIMEOUT_S
        transport_options["socket_timeout"] = BROKER_SOCKET_TIMEOUT_S
        # The lanes' queues highest first, with the starvation guard (lanes.py),
        # instead of kombu's round robin across queues.
        transport_options["queue_order_strategy"] = LANE_CYCLE_PATH
    app = Celery("mailqueue", broker=broker_url, set_as_current=False)
    app.conf.update(
        **broker,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=prefetch,
        task_default_queue=settings.queue_name,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        broker_connection_timeout=4,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        worker_hijack_root_logger=False,
        enable_utc=True,
    )

    # Import the broker's transport module now, in the thread that builds the app:
    # the first hand-off may run in the background thread while the interpreter
    # exits (handoff.py), when imports that register exit hooks (redis-py's) fail.
    app.connection_for_write().transport  # noqa: B018 - imports, connects nothing

    @app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True)
    def deliver(self: Any, ids: list[str]) -> dict[str, Any]:
        """Deliver the due messages among ``ids`` (a batch from one dispatch)."""
        try:
            report = get_loop_thread().run(
                get_deliverer().deliver_batch([uuid.UUID(i) for i in ids])
            )
        except OperationalError as exc:
            # The database is unreachable before anything was claimed: try again
            # in a few seconds (short, bounded; the scheduler covers longer outages).
            raise self.retry(exc=exc, countdown=5, max_retries=12) from None
        return {"claimed": report.claimed, "skipped": report.skipped, **report.recipients}

    return app


def get_app() -> Celery:
    """The process's Celery app, built from the current settings."""
    global _app
    if _app is None:
        with _app_lock:
            if _app is None:
                _app = _make_app(get_settings())
    return _app


def get_deliverer() -> Deliverer:
    """The process's deliverer (pools live on the process's event loop)."""
    global _deliverer
    if _deliverer is None:
        settings = get_settings()
        _deliverer = Deliverer(settings, Store(get_engine(settings.database_url)))
        deliverer = _deliverer
        get_loop_thread().on_stop(deliverer.aclose)
    return _deliverer


def reset() -> None:
    """Forget the app and deliverer (settings changed)."""
    global _app, _deliverer
    _handoff.flush()  # ids committed under the old settings go to the old broker
    get_loop_thread().stop()
    _app = None
    _deliverer = None


def dispatch(
    ids: Sequence[uuid.UUID], *, settings: Settings | None = None, priority: int = NORMAL
) -> bool:
    """Hand ids (all of lane ``priority``) to that lane's queue in batches; False when
    the broker is unreachable.

    Never raises for a broker failure: the rows are the promise, and the
    ids not handed over are flagged for the scheduler to send again.
    """
    settings = settings or get_settings()
    if not ids:
        return True
    app = get_app()
    size = max(1, settings.batch_size)
    queue = lane_queue(settings.queue_name, priority)
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        try:
            app.send_task(TASK_NAME, args=[[str(i) for i in chunk]], queue=queue)
        except Exception as exc:  # noqa: BLE001 - any broker failure means "not dispatched"
            log.warning(
                "broker unreachable at %s (%s: %s); %d %s message(s) stay queued in SQL "
                "and the scheduler will pick them up at its next tick",
                hide_password(settings.broker_url),
                type(exc).__name__,
                exc,
                len(ids) - start,
                priority_word(priority),
            )
            try:
                Store(get_engine(settings.database_url)).mark_undispatched(list(ids[start:]))
            except Exception:  # noqa: BLE001
                log.warning("could not flag undispatched messages; the scheduler finds them later")
            return False
    return True


_handoff = Handoff(
    lambda ids, settings, priority: dispatch(ids, settings=settings, priority=priority)
)


def dispatch_committed(
    ids: Sequence[uuid.UUID], *, settings: Settings | None = None, priority: int = NORMAL
) -> None:
    """Hand ids (of lane ``priority``) whose rows are committed to the broker: from the
    background thread (``MAILQUEUE_DISPATCH=background``, the default; see
    ``handoff.py``) or now."""
    settings = settings or get_settings()
    if settings.dispatch == "inline":
        dispatch(ids, settings=settings, priority=priority)
    else:
        get_app()  # built here, not in the hand-off thread (see _make_app)
        _handoff.submit(ids, settings, priority)


def flush_dispatch(timeout: float = 30.0) -> bool:
    """Wait until the ids handed to ``dispatch_committed`` reached the broker (or were
    flagged for the scheduler). Runs by itself when the process exits."""
    return _handoff.flush(timeout)


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A prefork child must not reuse the parent's sockets, loop or pools, and leaves
    stopping to the main process (``stopping.py``: a group SIGTERM would kill it mid-batch)."""
    global _deliverer
    shield_child_from_group_sigterm()
    dispose_engines()
    _deliverer = None


@signals.worker_process_shutdown.connect
def _on_child_exit(**_: Any) -> None:
    get_loop_thread().stop()


@signals.worker_shutdown.connect
def _on_worker_exit(**_: Any) -> None:
    get_loop_thread().stop()
