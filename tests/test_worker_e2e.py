"""The real thing: `mailqueue worker` and `mailqueue scheduler` processes over a real broker.

On the ``sqlite`` stack the broker is kombu's SQLite transport; on
``postgres`` it is Redis. These prove that tasks carry ids, that the prefork
pool with several children keeps one pool (and one event loop) per child,
and that the scheduler brings deferred and orphaned messages back.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
import sqlalchemy as sa

import mailqueue
from mailqueue import Message
from mailqueue.store.models import MessageRow

from .conftest import wait_until

pytestmark = pytest.mark.slow

TERMINAL = {"sent", "partial", "failed", "cancelled"}


def all_terminal(ids) -> bool:
    return all(mailqueue.get_status(i).status in TERMINAL for i in ids)


def test_worker_and_scheduler_deliver_refuse_and_retry(stack, smtp_server, spawn):
    """The issue's flow end to end: 1 accepted, 1 refused (550), 1 deferred (450) then accepted."""
    stack.reconfigure(retry_base_s=1.0, retry_max_s=1.0)
    smtp_server.reject = ["refused@*"]
    smtp_server.defer = ["later@*"]
    env = stack.env()
    spawn("worker", "--concurrency", "2", "--loglevel", "WARNING", env=env)
    spawn("scheduler", env=env)

    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["ok@example.com", "refused@example.com", "later@example.com"],
            subject="end to end",
            text="hello",
        )
    )
    wait_until(lambda: mailqueue.get_status(mid).status == "deferred", what="the first attempt")
    assert len(smtp_server.received_for("ok@example.com")) == 1

    smtp_server.defer = []  # the relay recovers; the scheduler re-dispatches when due
    wait_until(lambda: mailqueue.get_status(mid).status == "partial", what="the retry")

    assert len(smtp_server.received_for("ok@example.com")) == 1
    assert len(smtp_server.received_for("later@example.com")) == 1
    assert len(smtp_server.received_for("refused@example.com")) == 0
    statuses = {r.address: (r.status, r.smtp_code) for r in mailqueue.get_status(mid).recipients}
    assert statuses == {
        "ok@example.com": ("sent", 250),
        "refused@example.com": ("failed", 550),
        "later@example.com": ("sent", 250),
    }


def test_prefork_children_each_keep_a_pool_and_reuse_connections(stack, smtp_server, spawn):
    """Two prefork children, pool size 2 each: at most 4 connections, reused across tasks."""
    stack.reconfigure(batch_size=10, relay_pool_size=2)
    spawn("worker", "--concurrency", "2", "--loglevel", "WARNING", env=stack.env())
    ids = mailqueue.enqueue_many(
        Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
        for i in range(200)
    )
    wait_until(lambda: len(smtp_server.messages) >= 200, timeout=90, what="200 deliveries")
    wait_until(lambda: all_terminal(ids), what="statuses recorded")

    with stack.engine.connect() as conn:
        workers = Counter(conn.execute(sa.select(MessageRow.__table__.c.worker)).scalars())
    assert len(workers) == 2, workers  # both children delivered
    assert smtp_server.connections_peak <= 4
    # 20 tasks, but connections stay open between tasks: far fewer than messages
    assert smtp_server.connections_total <= 8
    counts = Counter(r for m in smtp_server.messages for r in m.rcpt_tos)
    assert set(counts.values()) == {1}


def test_single_enqueues_drain_as_fast_as_they_arrive(stack, smtp_server, spawn):
    """One enqueue() per web request, ~70 a second: the queue must not fall behind.

    Each call is its own task. On the serverless broker a worker with one task
    reserved per child slept 0.2 s between polls once both were taken, so it
    drained 10 tasks a second whatever the relay could do: 80 calls were still
    being delivered ~7 s after the last one.
    """
    spawn("worker", "--concurrency", "2", "--loglevel", "WARNING", env=stack.env())
    first = mailqueue.enqueue(
        Message(sender="a@example.com", to="warmup@example.com", subject="s", text="t")
    )
    wait_until(lambda: mailqueue.get_status(first).status == "sent", what="the worker to start")

    ids = []
    for i in range(80):
        msg = Message(sender="a@example.com", to=f"web{i}@example.com", subject="s", text="t")
        ids.append(mailqueue.enqueue(msg))
        time.sleep(0.01)
    last_enqueued = time.monotonic()
    wait_until(lambda: all_terminal(ids), timeout=60, interval=0.05, what="80 deliveries")
    behind = time.monotonic() - last_enqueued
    # A figure, not a bound (a busy machine is slower): 0.1-0.2 s when idle, ~7 s
    # before the fix (ops/bench/README.md). What keeps it low is asserted without a clock in
    # test_sqlite_broker.py (the poll interval and the prefetch).
    print(f"the last of 80 single enqueues was delivered {behind:.1f} s late")
    delivered = {m.rcpt_tos[0] for m in smtp_server.messages}
    assert delivered >= {f"web{i}@example.com" for i in range(80)}


def test_scheduler_redispatches_what_never_reached_the_broker(stack, smtp_server, spawn):
    """A row whose dispatch was lost (broker restarted empty) is found from SQL."""
    stack.reconfigure(redispatch_after_s=0.5)
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="lost@example.com", subject="s", text="t")
    )
    # Simulate the loss: purge the queue before any worker runs.
    from mailqueue.worker.app import get_app

    with get_app().connection_for_write() as conn:
        conn.default_channel.queue_purge(stack.settings.queue_name)
    env = stack.env()
    spawn("worker", "--concurrency", "1", "--loglevel", "WARNING", env=env)
    spawn("scheduler", env=env)
    wait_until(lambda: mailqueue.get_status(mid).status == "sent", what="redispatch from SQL")
    assert len(smtp_server.received_for("lost@example.com")) == 1


def test_expired_lease_is_picked_up_again(stack, smtp_server, spawn):
    """A worker that died holding a lease: once it expires, the message is delivered."""
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="orphan@example.com", subject="s", text="t")
    )
    table = MessageRow.__table__
    with stack.engine.begin() as conn:  # what a killed worker leaves behind
        conn.execute(
            sa.update(table)
            .where(table.c.id == uuid.UUID(mid))
            .values(
                status="sending",
                lease_owner="dead-host:1:x",
                lease_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1),
                dispatched_at=None,
            )
        )
    env = stack.env()
    spawn("worker", "--concurrency", "1", "--loglevel", "WARNING", env=env)
    spawn("scheduler", env=env)
    wait_until(lambda: mailqueue.get_status(mid).status == "sent", what="lease recovery")
    assert len(smtp_server.received_for("orphan@example.com")) == 1


def test_cli_send_status_list_stats(stack, smtp_server, spawn):
    env = stack.env()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailqueue", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    sent = cli(
        "send",
        "--from",
        "cli@example.com",
        "--to",
        "a@example.com",
        "--bcc",
        "b@example.com",
        "--subject",
        "from the CLI",
        "--text",
        "body",
    )
    assert sent.returncode == 0, sent.stderr
    mid = sent.stdout.strip()
    uuid.UUID(mid)

    spawn("worker", "--concurrency", "1", "--loglevel", "WARNING", env=env)
    wait_until(
        lambda: json.loads(cli("status", mid, "--json").stdout)["status"] == "sent", what="delivery"
    )

    status = json.loads(cli("status", mid, "--json").stdout)
    assert {r["address"]: r["status"] for r in status["recipients"]} == {
        "a@example.com": "sent",
        "b@example.com": "sent",
    }
    listed = json.loads(cli("list", "--status", "sent", "--json").stdout)
    assert [m["id"] for m in listed] == [mid]
    counts = json.loads(cli("stats", "--json").stdout)
    assert counts["messages"]["sent"] == 1 and counts["recipients"]["sent"] == 2
    human = cli("status", mid)
    assert human.returncode == 0 and "a@example.com" in human.stdout

    bad = cli(
        "send",
        "--from",
        "cli@example.com",
        "--to",
        "not an address",
        "--subject",
        "x",
        "--text",
        "y",
    )
    assert bad.returncode == 2
    assert "not an address" in bad.stderr
    missing = cli("status", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no message" in missing.stderr
