"""Prometheus metrics: definitions, the hooks the worker, pool and scheduler call, exposure.

Metric objects are built on first use, not at import: under Celery's prefork
pool the worker must switch prometheus_client to multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``) before the first metric exists, and the
worker, pool and scheduler modules import this one early.

Exposure (see ``serve``): set ``MAILQUEUE_METRICS_PORT`` and

* ``mailqueue worker`` collects its prefork children's metrics through
  multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, a fresh temporary folder
  unless you set one) and serves them all from the parent on that port;
* ``mailqueue scheduler`` serves its own on that port.

They listen on 127.0.0.1 unless ``MAILQUEUE_METRICS_ADDR`` names another
address (``0.0.0.0`` or ``::`` for every interface, e.g. when Prometheus
scrapes from another host or container). The endpoint has no
authentication: relay names, volumes and failure rates are for the
operator's network, not the Internet.

The hooks (``observe_attempt``, ``pool_changed``, ``pool_waited``,
``scheduler_tick``, ``worker_consuming``, ``outcomes_committed``) never raise:
a metrics problem must not stop delivery.

Metric names:

==========================================  =========  ==========================================
``mailqueue_messages_total``                counter    attempts by message outcome (``relay``,
                                                       ``outcome``: sent/partial/failed/deferred/
                                                       queued)
``mailqueue_recipients_total``              counter    recipient outcomes (``relay``,
                                                       ``outcome``: sent/deferred/failed)
``mailqueue_smtp_replies_total``            counter    replies by class (``relay``, ``class``:
                                                       2xx/4xx/5xx/none = no reply, e.g. refused)
``mailqueue_delivery_latency_seconds``      histogram  enqueue → accepted, per recipient
``mailqueue_delivery_attempts``             histogram  attempt number at which recipients ended
``mailqueue_attempts_total``                counter    delivery attempts made (``relay``)
``mailqueue_record_lag_seconds``            histogram  reply → committed outcome, per message:
                                                       the duplicate window (a kill inside it
                                                       resends those recipients)
``mailqueue_pool_connections``              gauge      ``state``: open/idle/in_use (summed over
                                                       live worker processes)
``mailqueue_pool_waits_total``              counter    borrowers that waited for a connection
``mailqueue_pool_connections_opened_total`` counter    connections opened
``mailqueue_worker_processes``              gauge      live delivering processes
``mailqueue_worker_consuming``              gauge      1 while the worker consumes from the
                                                       broker, 0 while it cannot (per worker;
                                                       see ``worker/liveness.py``)
``mailqueue_queue_depth``                   gauge      ``state``: waiting/due, per relay (scheduler)
``mailqueue_oldest_due_age_seconds``        gauge      how long the oldest due message waits
``mailqueue_scheduler_dispatched_total``    counter    ids handed to the broker
``mailqueue_scheduler_undispatched_total``  counter    ids the broker refused
``mailqueue_scheduler_last_tick_timestamp`` gauge      unix time of the last finished tick
``mailqueue_bounce_reports_total``          counter    reports that came back (``kind``: dsn/
                                                       complaint/text/unparsed, ``effect``:
                                                       bounced/complained/recorded/unmatched)
==========================================  =========  ==========================================
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .statuses import RecipientStatus

__all__ = [
    "StoreReads",
    "read_store_with",
    "get",
    "enable_multiprocess",
    "serve",
    "observe_attempt",
    "pool_changed",
    "pool_waited",
    "scheduler_tick",
    "worker_consuming",
    "outcomes_committed",
    "observe_queue",
    "reply_class",
]

log = logging.getLogger("mailqueue.metrics")

LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400,
)  # fmt: skip
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 7, 10, 15, 20, 30)
RECORD_LAG_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip


@dataclass(frozen=True)
class StoreReads:
    """What the metrics read from ``store/``, handed in from above.

    The pool and the worker import this module, and ``smtp/`` must never reach
    ``store/``: so metrics never import the store, and the package gives them
    these functions once (:func:`read_store_with`).
    """

    derive_status: Callable[[Iterable[str]], str]
    """A message's status from its recipients' statuses."""
    queue_depth: Callable[[Any], Iterable[Any]]
    """Per relay: ``relay``, ``waiting``, ``due``, ``oldest_due_age_s`` (from an engine)."""
    relay_states: Callable[[Any], Iterable[Any]]
    """Per relay: ``name`` and ``paused`` (from an engine)."""
    suppressions: Callable[[Any], dict[str, int]]
    """Suppression list entries per reason (from an engine)."""


_reads: StoreReads | None = None


def read_store_with(reads: StoreReads) -> None:
    """Install how the metrics read the queue (done by ``mailqueue/__init__.py``)."""
    global _reads
    _reads = reads


def _store_reads() -> StoreReads:
    if _reads is None:
        raise RuntimeError("metrics: read_store_with() was not called")
    return _reads


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.messages = Counter(
            "mailqueue_messages_total",
            "Delivery attempts by the message's status afterwards",
            ["relay", "outcome"],
        )
        self.recipients = Counter(
            "mailqueue_recipients_total",
            "Recipient outcomes of delivery attempts",
            ["relay", "outcome"],
        )
        self.replies = Counter(
            "mailqueue_smtp_replies_total",
            "SMTP replies to RCPT/DATA by class; 'none' when no reply came (connection failed)",
            ["relay", "class"],
        )
        self.latency = Histogram(
            "mailqueue_delivery_latency_seconds",
            "Seconds from enqueue to the relay accepting a recipient",
            ["relay"],
            buckets=LATENCY_BUCKETS,
        )
        self.attempt_number = Histogram(
            "mailqueue_delivery_attempts",
            "Attempt number at which a recipient reached sent or failed",
            ["relay", "outcome"],
            buckets=ATTEMPT_BUCKETS,
        )
        self.attempts = Counter(
            "mailqueue_attempts_total", "Delivery attempts made on messages", ["relay"]
        )
        self.record_lag = Histogram(
            "mailqueue_record_lag_seconds",
            "Seconds from a message's last SMTP reply to its outcome's commit "
            "(a worker killed meanwhile resends those recipients)",
            buckets=RECORD_LAG_BUCKETS,
        )
        self.suppressions = Gauge(
            "mailqueue_suppressions",
            "Entries on the suppression list, by reason (read by the scheduler)",
            ["reason"],
            multiprocess_mode="max",
        )
        self.pool = Gauge(
            "mailqueue_pool_connections",
            "SMTP connections of the worker pools by state (open = idle + in_use)",
            ["relay", "state"],
            multiprocess_mode="livesum",
        )
        self.pool_waits = Counter(
            "mailqueue_pool_waits_total",
            "Times a sender waited because the pool was at its bound",
            ["relay"],
        )
        self.cluster_waits = Counter(
            "mailqueue_cluster_limit_waits_total",
            "Deliveries that waited for a relay's cluster-wide limit "
            "(limit=connections: a free slot; limit=rate: their turn)",
            ["relay", "limit"],
        )
        self.pool_opened = Counter(
            "mailqueue_pool_connections_opened_total", "SMTP connections opened", ["relay"]
        )
        self.worker_processes = Gauge(
            "mailqueue_worker_processes",
            "Live worker processes that have delivered since they started",
            multiprocess_mode="livesum",
        )
        self.worker_consuming = Gauge(
            "mailqueue_worker_consuming",
            "1 while this worker consumes from the broker (connected, its loop turning), "
            "0 while it cannot; it exits 1 after MAILQUEUE_WORKER_STALL_S of 0",
            multiprocess_mode="livemax",
        )
        self.queue_depth = Gauge(
            "mailqueue_queue_depth",
            "Messages waiting (queued or deferred) and, of those, due now",
            ["relay", "state"],
            multiprocess_mode="max",
        )
        self.oldest_due = Gauge(
            "mailqueue_oldest_due_age_seconds",
            "How long the longest-waiting due message has been due",
            ["relay"],
            multiprocess_mode="max",
        )
        self.relay_paused = Gauge(
            "mailqueue_relay_paused",
            "1 while a relay is paused after an auth or TLS failure (mq_relay), else 0",
            ["relay"],
            multiprocess_mode="max",
        )
        self.dispatched = Counter(
            "mailqueue_scheduler_dispatched_total", "Message ids the scheduler handed to the broker"
        )
        self.undispatched = Counter(
            "mailqueue_scheduler_undispatched_total",
            "Message ids the scheduler could not hand to the broker",
        )
        self.last_tick = Gauge(
            "mailqueue_scheduler_last_tick_timestamp",
            "Unix time when the scheduler last finished a tick",
            multiprocess_mode="max",
        )
        self.bounce_reports = Counter(
            "mailqueue_bounce_reports_total",
            "Bounces and complaints that came back, by kind and what they did",
            ["kind", "effect"],
        )
        self._relays_seen: set[str] = set()
        self._worker_marked = False
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client checks the labels and
        takes a lock on every ``labels`` call, a few per cent of a busy worker's CPU."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_metrics: _Metrics | None = None
_lock = threading.Lock()


def get() -> _Metrics:
    """The process's metric objects (built on first use)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


def enable_multiprocess(directory: str) -> None:
    """Switch this process (and children forked later) to multiprocess files in ``directory``.

    Must run before the first metric is built. Stale files from an earlier
    run are removed; each prefork child's files are marked dead when it exits.
    """
    if _metrics is not None:
        raise RuntimeError("metrics already built; enable multiprocess mode earlier")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.unlink(os.path.join(directory, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.get_value_class()

    from celery import signals

    signals.worker_process_init.connect(_child_started, weak=False)
    signals.worker_process_shutdown.connect(_child_exited, weak=False)


def _child_started(**_: Any) -> None:
    """Each prefork child counts itself once (a livesum gauge: dead children drop out)."""
    m = get()
    m._worker_marked = True
    m.worker_processes.set(1)


def _child_exited(**_: Any) -> None:
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(os.getpid())
    except Exception:  # noqa: BLE001
        log.debug("could not mark metrics of process %d dead", os.getpid(), exc_info=True)


DEFAULT_ADDR = "127.0.0.1"


def metrics_addr(environ: dict[str, str] | None = None) -> str:
    """``MAILQUEUE_METRICS_ADDR``, the address to listen on; loopback when unset or empty."""
    value = (environ if environ is not None else os.environ).get("MAILQUEUE_METRICS_ADDR", "")
    return value.strip() or DEFAULT_ADDR


def serve(port: int, addr: str | None = None) -> Any:
    """Serve ``/metrics`` on ``addr:port`` from a background thread; multiprocess-aware.

    ``addr`` defaults to ``metrics_addr()``: 127.0.0.1 unless
    ``MAILQUEUE_METRICS_ADDR`` says otherwise. The address is logged.
    """
    if addr is None:
        addr = metrics_addr()
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    host = f"[{addr}]" if ":" in addr else addr
    port = server.server_address[1]
    if addr in (DEFAULT_ADDR, "::1", "localhost"):
        log.info("metrics on http://%s:%d/metrics (this host only)", host, port)
    else:
        log.info(
            "metrics on http://%s:%d/metrics (MAILQUEUE_METRICS_ADDR=%s: reachable from "
            "other hosts, with no authentication)",
            host,
            port,
            addr,
        )
    return server


def metrics_port(environ: dict[str, str] | None = None) -> int | None:
    """``MAILQUEUE_METRICS_PORT`` as an int, or None when unset or empty."""
    value = (environ if environ is not None else os.environ).get("MAILQUEUE_METRICS_PORT", "")
    return int(value) if value.strip() else None


# -- hooks ------------------------------------------------------------------------------


def reply_class(code: int | None) -> str:
    """``2xx``/``4xx``/``5xx`` for a reply code, ``none`` when no reply came."""
    if not code:
        return "none"
    return f"{code // 100}xx"


def _enqueued_at(message_id: uuid.UUID) -> float | None:
    """Message ids are UUIDv7: their first 48 bits are the enqueue time in ms."""
    if message_id.version != 7:
        return None
    return (message_id.int >> 80) / 1000.0


def observe_attempt(message: Any, result: Any, outcome: Any) -> None:
    """After one attempt on one claimed message is recorded (``worker.service``)."""
    try:
        _observe_attempt(message, result, outcome)
    except Exception:  # noqa: BLE001 - metrics never stop delivery
        log.debug("metrics: observe_attempt failed", exc_info=True)


def _observe_attempt(message: Any, result: Any, outcome: Any) -> None:
    derive_status = _store_reads().derive_status
    m = get()
    relay = message.relay
    if not m._worker_marked:
        m._worker_marked = True
        m.worker_processes.set(1)
    m.child(m.attempts, relay).inc()
    now = time.time()
    enqueued = _enqueued_at(message.id)
    attempt = message.attempts  # the claim counted this attempt already
    final = {r.id: r.status for r in message.recipients}
    for r in outcome.recipients:
        final[r.recipient_id] = r.status
        m.child(m.recipients, relay, r.status).inc()
        if r.status in (RecipientStatus.SENT, RecipientStatus.FAILED):
            m.child(m.attempt_number, relay, r.status).observe(attempt)
        if r.status == RecipientStatus.SENT and enqueued is not None:
            m.child(m.latency, relay).observe(max(0.0, now - enqueued))
    # Withheld by the suppression list at this claim: never in ``outcome``.
    suppressed = getattr(message, "suppressed", 0)
    if suppressed:
        m.child(m.recipients, relay, RecipientStatus.SUPPRESSED).inc(suppressed)
    for r in result.recipients:
        m.child(m.replies, relay, reply_class(r.code)).inc()
    if outcome.recipients or suppressed:
        m.child(m.messages, relay, derive_status(final.values())).inc()


def bounces_recorded(records: Iterable[Any]) -> None:
    """After reports that came back were recorded (``inbound``)."""
    try:
        m = get()
        for record in records:
            if record.effect:
                effect = record.effect
            elif record.recipient_id is None and record.kind != "unparsed":
                effect = "unmatched"
            else:
                effect = "recorded"
            m.child(m.bounce_reports, record.kind, effect).inc()
    except Exception:  # noqa: BLE001 - metrics never stop ingesting
        log.debug("metrics: bounces_recorded failed", exc_info=True)


def pool_changed(pool: Any) -> None:
    """After the pool's state changed (``smtp.pool``): open/idle/in-use gauges."""
    try:
        m = get()
        relay = pool.relay.name
        idle = pool.idle_count
        busy = pool.busy_count
        m.child(m.pool, relay, "open").set(pool.open_count)
        m.child(m.pool, relay, "idle").set(idle)
        m.child(m.pool, relay, "in_use").set(busy)
    except Exception:  # noqa: BLE001
        log.debug("metrics: pool_changed failed", exc_info=True)


def outcomes_committed(lags_s: Iterable[float]) -> None:
    """One group commit of outcomes is done; each waited this long since its reply."""
    try:
        m = get()
        for lag in lags_s:
            m.record_lag.observe(lag)
    except Exception:  # noqa: BLE001
        log.debug("metrics: outcomes_committed failed", exc_info=True)


def worker_consuming(consuming: bool) -> None:
    """The worker's watchdog judged it consuming or not (``worker.liveness``)."""
    try:
        get().worker_consuming.set(1 if consuming else 0)
    except Exception:  # noqa: BLE001
        log.debug("metrics: worker_consuming failed", exc_info=True)


def pool_waited(pool: Any) -> None:
    try:
        m = get()
        m.child(m.pool_waits, pool.relay.name).inc()
    except Exception:  # noqa: BLE001
        log.debug("metrics: pool_waited failed", exc_info=True)


def cluster_limit_waited(relay: str, limit: str) -> None:
    """A delivery waited for a cluster-wide limit (``smtp.cluster_limits``)."""
    try:
        m = get()
        m.child(m.cluster_waits, relay, limit).inc()
    except Exception:  # noqa: BLE001
        log.debug("metrics: cluster_limit_waited failed", exc_info=True)


def pool_opened(pool: Any) -> None:
    try:
        m = get()
        m.child(m.pool_opened, pool.relay.name).inc()
    except Exception:  # noqa: BLE001
        log.debug("metrics: pool_opened failed", exc_info=True)


_last_queue_check = 0.0


def scheduler_tick(report: Any, engine: Any, *, every_s: float = 15.0) -> None:
    """After each scheduler tick: dispatch counters, and queue depth every ``every_s``."""
    global _last_queue_check
    try:
        m = get()
        m.dispatched.inc(report.dispatched)
        m.undispatched.inc(report.undispatched)
        m.last_tick.set(time.time())
        now = time.monotonic()
        if now - _last_queue_check >= every_s:
            _last_queue_check = now
            observe_queue(engine)
    except Exception:  # noqa: BLE001 - a metrics query must not stop the scheduler
        log.warning("metrics: could not read the queue depth", exc_info=True)


def observe_queue(engine: Any) -> None:
    """Set queue depth and oldest-due-age gauges per relay from SQL."""
    reads = _store_reads()
    m = get()
    depths = reads.queue_depth(engine)
    seen = set()
    for d in depths:
        seen.add(d.relay)
        m.queue_depth.labels(d.relay, "waiting").set(d.waiting)
        m.queue_depth.labels(d.relay, "due").set(d.due)
        m.oldest_due.labels(d.relay).set(d.oldest_due_age_s)
    for relay in (m._relays_seen | {"default"}) - seen:
        m.queue_depth.labels(relay, "waiting").set(0)
        m.queue_depth.labels(relay, "due").set(0)
        m.oldest_due.labels(relay).set(0)
    m._relays_seen |= seen
    for state in reads.relay_states(engine):
        m.relay_paused.labels(state.name).set(1 if state.paused else 0)
    for reason, count in reads.suppressions(engine).items():
        m.suppressions.labels(reason).set(count)
