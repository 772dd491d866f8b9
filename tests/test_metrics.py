"""Prometheus metrics move with real deliveries; workers and the scheduler serve them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import urllib.request
import uuid

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import mailqueue
from mailqueue import Message, metrics
from mailqueue.logging_setup import SecretFilter, configure_logging, scrub
from mailqueue.store.models import MessageRow
from mailqueue.worker.service import Deliverer

from .conftest import wait_until


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def deliver(stack, ids) -> None:
    async def go() -> None:
        d = Deliverer(stack.settings, stack.store)
        try:
            await d.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await d.aclose()

    asyncio.run(go())


def test_a_real_delivery_moves_outcome_reply_latency_and_pool_metrics(stack, smtp_server):
    metrics.get()  # build them so the "before" samples exist
    names = {
        "sent": ("mailqueue_recipients_total", {"relay": "default", "outcome": "sent"}),
        "failed": ("mailqueue_recipients_total", {"relay": "default", "outcome": "failed"}),
        "deferred": ("mailqueue_recipients_total", {"relay": "default", "outcome": "deferred"}),
        "2xx": ("mailqueue_smtp_replies_total", {"relay": "default", "class": "2xx"}),
        "4xx": ("mailqueue_smtp_replies_total", {"relay": "default", "class": "4xx"}),
        "5xx": ("mailqueue_smtp_replies_total", {"relay": "default", "class": "5xx"}),
        "partial": ("mailqueue_messages_total", {"relay": "default", "outcome": "partial"}),
        "msg_deferred": ("mailqueue_messages_total", {"relay": "default", "outcome": "deferred"}),
        "latency": ("mailqueue_delivery_latency_seconds_count", {"relay": "default"}),
        "attempts": ("mailqueue_attempts_total", {"relay": "default"}),
        "opened": ("mailqueue_pool_connections_opened_total", {"relay": "default"}),
    }
    before = {k: sample(n, **labels) for k, (n, labels) in names.items()}

    smtp_server.reject = ["no@*"]
    smtp_server.defer = ["later@*"]
    a = mailqueue.enqueue(
        Message(sender="s@example.com", to=["yes@example.com", "no@example.com"], text="x")
    )
    b = mailqueue.enqueue(Message(sender="s@example.com", to=["later@example.com"], text="x"))
    deliver(stack, [a, b])

    delta = {k: sample(n, **labels) - before[k] for k, (n, labels) in names.items()}
    # Side by side the two messages take two connections; on a busy machine the
    # first can be done before the second starts and lend it its connection.
    assert 1 <= delta.pop("opened") <= 2
    assert delta == {
        "sent": 1,
        "failed": 1,
        "deferred": 1,
        "2xx": 1,
        "4xx": 1,
        "5xx": 1,
        "partial": 1,
        "msg_deferred": 1,
        "latency": 1,
        "attempts": 2,
    }
    # enqueue -> accepted took well under a minute here
    le_60 = sample("mailqueue_delivery_latency_seconds_bucket", relay="default", le="60.0")
    total = sample("mailqueue_delivery_latency_seconds_count", relay="default")
    assert le_60 == total
    # the pool was closed after the batch: nothing open, nothing in use
    assert sample("mailqueue_pool_connections", relay="default", state="open") == 0
    assert sample("mailqueue_pool_connections", relay="default", state="in_use") == 0
    assert sample("mailqueue_worker_processes") == 1


def test_queue_depth_and_oldest_due_age_per_relay(stack):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    ids = [
        mailqueue.enqueue(Message(sender="s@example.com", to=[f"r{i}@example.com"], text="x"))
        for i in range(3)
    ]
    later = mailqueue.enqueue(
        Message(sender="s@example.com", to=["r@example.com"], text="x"),
        relay="bulk",
        send_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    table = MessageRow.__table__
    with stack.engine.begin() as conn:
        conn.execute(
            sa.update(table).where(table.c.id == uuid.UUID(ids[0])).values(next_attempt_at=old)
        )
    metrics.observe_queue(stack.engine)
    assert sample("mailqueue_queue_depth", relay="default", state="waiting") == 3
    assert sample("mailqueue_queue_depth", relay="default", state="due") == 3
    assert 590 < sample("mailqueue_oldest_due_age_seconds", relay="default") < 900
    assert sample("mailqueue_queue_depth", relay="bulk", state="waiting") == 1
    assert sample("mailqueue_queue_depth", relay="bulk", state="due") == 0
    assert sample("mailqueue_oldest_due_age_seconds", relay="bulk") == 0

    mailqueue.cancel(later)
    metrics.observe_queue(stack.engine)
    assert sample("mailqueue_queue_depth", relay="bulk", state="waiting") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.slow
def test_prefork_worker_and_scheduler_serve_metrics(stack, smtp_server, spawn):
    """Two prefork children deliver; the parent serves their summed counters."""
    worker_port, scheduler_port = _free_port(), _free_port()
    smtp_server.reject = ["no@*"]
    env = stack.env()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker makes its own folder
    spawn(
        "worker",
        "-c",
        "2",
        "-l",
        "WARNING",
        env={**env, "MAILQUEUE_METRICS_PORT": str(worker_port)},
    )
    spawn("scheduler", env={**env, "MAILQUEUE_METRICS_PORT": str(scheduler_port)})
    ids = mailqueue.enqueue_many(
        Message(sender="s@example.com", to=[f"r{i}@example.com"], text="x") for i in range(12)
    )
    refused = mailqueue.enqueue(Message(sender="s@example.com", to=["no@example.com"], text="x"))
    terminal = {"sent", "failed"}
    wait_until(
        lambda: all(mailqueue.get_status(i).status in terminal for i in [*ids, refused]),
        timeout=60,
        what="deliveries",
    )

    def worker_counts():
        try:
            return scrape(worker_port)
        except OSError:
            return None

    key_sent = ("mailqueue_recipients_total", (("outcome", "sent"), ("relay", "default")))
    key_failed = ("mailqueue_recipients_total", (("outcome", "failed"), ("relay", "default")))
    wait_until(lambda: (worker_counts() or {}).get(key_sent) == 12, what="worker metrics")
    got = worker_counts()
    assert got[key_failed] == 1
    assert got[("mailqueue_smtp_replies_total", (("class", "5xx"), ("relay", "default")))] == 1
    assert got[("mailqueue_worker_processes", ())] >= 1
    assert got[("mailqueue_delivery_latency_seconds_count", (("relay", "default"),))] == 12

    wait_until(
        lambda: ("mailqueue_scheduler_last_tick_timestamp", ()) in scrape(scheduler_port),
        what="scheduler metrics",
    )
    sched = scrape(scheduler_port)
    assert sched[("mailqueue_scheduler_last_tick_timestamp", ())] > 0
    # The depth is read from SQL (every 15 s): whenever it was read, it counted at
    # most the 13 messages of this test, and once they are all terminal it reads 0.
    waiting = ("mailqueue_queue_depth", (("relay", "default"), ("state", "waiting")))
    due = ("mailqueue_queue_depth", (("relay", "default"), ("state", "due")))
    assert 0 <= sched[due] <= sched[waiting] <= 13, (sched[due], sched[waiting])
    wait_until(
        lambda: scrape(scheduler_port)[waiting] == 0 and scrape(scheduler_port)[due] == 0,
        timeout=60,
        what="the scheduler's queue depth reads 0 once everything is terminal",
    )


def test_json_logs_carry_message_id_and_recipient_and_no_secrets(stack, smtp_server, capsys):
    smtp_server.reject = ["no@*"]
    configure_logging(logging.INFO, as_json=True)
    try:
        mid = mailqueue.enqueue(Message(sender="s@example.com", to=["no@example.com"], text="x"))
        deliver(stack, [mid])
        logging.getLogger("mailqueue.test").warning(
            "connecting to smtp://u:topsecretpw@relay:25 password=hunter2"
        )
    finally:
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "_mailqueue", False):
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
    err = capsys.readouterr().err
    assert "topsecretpw" not in err and "hunter2" not in err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("message_id") == mid]
    assert mine and mine[0]["recipient"] == "no@example.com"
    assert mine[0]["status"] == "failed" and mine[0]["smtp_code"] == 550
    assert mine[0]["level"] == "WARNING"
    assert any("smtp://u:***@relay:25" in r["message"] for r in records)


def test_secret_filter_masks_urls_keys_and_auth_lines():
    assert scrub("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert scrub("postgresql://mail:s3cr3t@db/mail") == "postgresql://mail:***@db/mail"
    assert scrub("token=abc123 rest") == "token=*** rest"
    assert scrub("AUTH PLAIN AGFuYQBzZWNyZXQ=") == "AUTH PLAIN ***"
    assert scrub("smtp://relay:25 ok") == "smtp://relay:25 ok"
    record = logging.LogRecord("x", logging.INFO, "f", 1, "url %s", ("smtp://a:b@c",), None)
    record.extra_field = "password: zzz"
    SecretFilter().filter(record)
    assert record.getMessage() == "url smtp://a:***@c"
    assert record.extra_field == "password: ***"


def test_a_paused_relay_shows_in_the_metrics(stack):
    from mailqueue.metrics import observe_queue
    from mailqueue.store.relays import pause_relay, resume_relay

    pause_relay(stack.engine, "default", error="AuthError", reply="535 5.7.8 no")
    observe_queue(stack.engine)
    assert sample("mailqueue_relay_paused", relay="default") == 1
    resume_relay(stack.engine, "default")
    observe_queue(stack.engine)
    assert sample("mailqueue_relay_paused", relay="default") == 0


def test_pool_gauges_show_the_state_the_pool_settles_in(smtp_server):
    """The gauges are written at most every 50 ms while the pool churns; the state it
    settles in (here: 3 open, all idle) still shows within a moment, without a close."""
    from mailqueue.config import RelayConfig
    from mailqueue.smtp.delivery import deliver as smtp_deliver
    from mailqueue.smtp.pool import Pool

    data = b"From: a@example.com\r\nSubject: t\r\n\r\nhello\r\n"
    relay = RelayConfig(name="gauges", url=smtp_server.url, pool_size=3, command_timeout_s=5)

    async def go() -> tuple[float, float, float]:
        pool = Pool(relay)
        await asyncio.gather(
            *(smtp_deliver(pool, "a@example.com", [f"r{i}@example.com"], data) for i in range(30))
        )
        await asyncio.sleep(0.2)  # the throttle's timer writes the settled state
        seen = tuple(
            sample("mailqueue_pool_connections", relay="gauges", state=s)
            for s in ("open", "idle", "in_use")
        )
        await pool.aclose()
        return seen  # type: ignore[return-value]

    assert asyncio.run(go()) == (3, 3, 0)
    assert sample("mailqueue_pool_connections", relay="gauges", state="open") == 0


def _non_loopback_ipv4() -> str | None:
    """This host's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def _answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_metrics_listen_on_loopback_unless_an_address_is_given(monkeypatch, caplog):
    monkeypatch.delenv("MAILQUEUE_METRICS_ADDR", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    outside = _non_loopback_ipv4()
    caplog.set_level(logging.INFO, logger="mailqueue.metrics")

    server = metrics.serve(0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        assert _answers("127.0.0.1", port)
        if outside:  # another interface of this very host is refused
            assert not _answers(outside, port)
    finally:
        server.shutdown()
        server.server_close()
    assert f"metrics on http://127.0.0.1:{port}/metrics (this host only)" in caplog.text

    caplog.clear()
    monkeypatch.setenv("MAILQUEUE_METRICS_ADDR", "0.0.0.0")
    server = metrics.serve(0)
    try:
        host, port = server.server_address[:2]
        assert host == "0.0.0.0"
        if outside:
            assert _answers(outside, port)
    finally:
        server.shutdown()
        server.server_close()
    assert f"metrics on http://0.0.0.0:{port}/metrics (MAILQUEUE_METRICS_ADDR=0.0.0.0" in (
        caplog.text
    )


def test_metrics_address_setting_reads_the_environment():
    assert metrics.metrics_addr({}) == "127.0.0.1"
    assert metrics.metrics_addr({"MAILQUEUE_METRICS_ADDR": "  "}) == "127.0.0.1"
    assert metrics.metrics_addr({"MAILQUEUE_METRICS_ADDR": "10.0.0.5"}) == "10.0.0.5"
    assert metrics.metrics_addr({"MAILQUEUE_METRICS_ADDR": "::"}) == "::"


def test_compose_services_serving_metrics_to_prometheus_say_where():
    """In compose Prometheus scrapes from its own container: loopback would hide them."""
    from .test_ops import _compose

    envs = {n: s.get("environment") or {} for n, s in _compose()["services"].items()}
    serving = {n: env for n, env in envs.items() if "MAILQUEUE_METRICS_PORT" in env}
    assert set(serving) == {"worker", "scheduler"}
    for name, env in serving.items():
        assert env.get("MAILQUEUE_METRICS_ADDR") == "0.0.0.0", name
