"""Per-recipient outcomes, retries and never-twice, on both stacks (in-process worker code).

Every test with the dev server runs twice: without PIPELINING and with it
(``both_paths``), so both ways ``smtp.delivery`` sends are held to the same outcomes.

These drive the very code a Celery task runs (``Deliverer.deliver_batch``)
against the real dev SMTP server and a real database, and assert on what the
server received and what the status table says.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from collections import Counter

import pytest
import sqlalchemy as sa

import mailqueue
from mailqueue import Message
from mailqueue.store.models import MessageRow
from mailqueue.worker.service import BatchReport, Deliverer

pytestmark = pytest.mark.both_paths  # every test with the dev server runs on both send paths


def deliver(stack, ids, *, owner=None) -> BatchReport:
    """Run one batch the way a worker does, with its own pools, then close them."""

    async def go() -> BatchReport:
        deliverer = Deliverer(stack.settings, stack.store, owner=owner)
        try:
            return await deliverer.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await deliverer.aclose()

    return asyncio.run(go())


def make_due(stack, ids) -> None:
    """Move deferred messages' next attempt to now (instead of waiting minutes)."""
    table = MessageRow.__table__
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with stack.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(table.c.id.in_([uuid.UUID(str(i)) for i in ids]))
            .values(next_attempt_at=past)
        )


def copies(server, address) -> int:
    return len(server.received_for(address))


def test_refused_and_deferred_recipients_do_not_stop_the_accepted_one(stack, smtp_server):
    smtp_server.reject = ["refused@*"]
    smtp_server.defer = ["later@*"]
    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["ok@example.com", "refused@example.com"],
            cc=["later@example.com"],
            subject="three recipients",
            text="hello",
        )
    )

    deliver(stack, [mid])

    assert copies(smtp_server, "ok@example.com") == 1
    assert copies(smtp_server, "refused@example.com") == 0
    assert copies(smtp_server, "later@example.com") == 0
    info = mailqueue.get_status(mid)
    assert info.status == "deferred"
    by = {r.address: r for r in info.recipients}
    assert (by["ok@example.com"].status, by["ok@example.com"].smtp_code) == ("sent", 250)
    assert by["ok@example.com"].sent_at is not None
    assert (by["refused@example.com"].status, by["refused@example.com"].smtp_code) == (
        "failed",
        550,
    )
    assert by["refused@example.com"].enhanced_code == "5.1.1"
    assert "refused@example.com" in by["refused@example.com"].reply
    assert by["refused@example.com"].error == "RecipientError"
    assert (by["later@example.com"].status, by["later@example.com"].smtp_code) == ("deferred", 450)
    assert by["later@example.com"].enhanced_code.startswith("4.")
    assert info.next_attempt_at is not None
    assert info.next_attempt_at > dt.datetime.now(dt.UTC) + dt.timedelta(
        seconds=30
    )  # backoff, not a spin

    # Not due yet: a second task does nothing.
    assert deliver(stack, [mid]).claimed == 0

    # The relay recovers and the retry comes due: only the deferred one is sent.
    smtp_server.defer = []
    make_due(stack, [mid])
    deliver(stack, [mid])

    assert copies(smtp_server, "later@example.com") == 1
    assert copies(smtp_server, "ok@example.com") == 1  # never sent again
    assert copies(smtp_server, "refused@example.com") == 0
    retry_envelope = smtp_server.messages[-1]
    assert retry_envelope.rcpt_tos == ("later@example.com",)
    info = mailqueue.get_status(mid)
    assert info.status == "partial"
    by = {r.address: r for r in info.recipients}
    assert by["later@example.com"].status == "sent"
    assert by["later@example.com"].attempts == 2
    assert by["ok@example.com"].attempts == 1
    assert info.attempts == 2

    # The history keeps every attempt, not only each recipient's last word.
    history = [(a.address, a.status, a.smtp_code) for a in mailqueue.get_attempts(mid)]
    assert history == [
        ("ok@example.com", "sent", 250),
        ("refused@example.com", "failed", 550),
        ("later@example.com", "deferred", 450),
        ("later@example.com", "sent", 250),
    ]


def test_a_big_attempt_keeps_every_recipients_history(stack, smtp_server):
    """12 recipients in one attempt: written with COPY on PostgreSQL, row by row on SQLite."""
    smtp_server.reject = ["no*@example.com"]
    smtp_server.defer = ["later*@example.com"]
    to = [f"ok{i}@example.com" for i in range(7)] + ["no1@example.com", "no2@example.com"]
    to += ["later1@example.com", "later2@example.com", "later3@example.com"]
    mid = mailqueue.enqueue(Message(sender="a@example.com", to=to, subject="s", text="t"))
    deliver(stack, [mid])
    history = mailqueue.get_attempts(mid)
    assert [(a.address, a.status, a.smtp_code) for a in history] == [
        (address, status, code)
        for address in to
        for status, code in [
            ("failed", 550)
            if address.startswith("no")
            else ("deferred", 450)
            if address.startswith("later")
            else ("sent", 250)
        ]
    ]
    assert all(a.worker and a.at is not None for a in history)
    assert {a.reply.split()[0] for a in history if a.status == "failed"} == {"5.1.1"}


def test_all_accepted_is_sent_and_all_refused_is_failed(stack, smtp_server):
    smtp_server.reject = ["*@bad.example.com"]
    good = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", subject="s", text="t")
    )
    bad = mailqueue.enqueue(
        Message(
            sender="a@example.com",
            to=["y@bad.example.com", "z@bad.example.com"],
            subject="s",
            text="t",
        )
    )
    deliver(stack, [good, bad])
    assert mailqueue.get_status(good).status == "sent"
    info = mailqueue.get_status(bad)
    assert info.status == "failed"
    assert info.last_error == "RecipientError"
    assert {r.status for r in info.recipients} == {"failed"}
    assert smtp_server.messages and all(
        "bad.example.com" not in " ".join(m.rcpt_tos) for m in smtp_server.messages
    )


def test_bcc_is_delivered_but_never_in_the_headers(stack, smtp_server):
    mid = mailqueue.enqueue(
        Message(
            sender="a@example.com",
            to="to@example.com",
            bcc="hidden@example.com",
            subject="s",
            text="t",
        )
    )
    deliver(stack, [mid])
    (received,) = smtp_server.messages
    assert set(received.rcpt_tos) == {"to@example.com", "hidden@example.com"}
    assert b"hidden@example.com" not in received.data


def test_a_task_delivered_twice_sends_once(stack, smtp_server):
    ids = mailqueue.enqueue_many(
        Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
        for i in range(20)
    )
    # Two workers get the same task at the same moment (a broker redelivery).
    reports: list[BatchReport] = []
    threads = [
        threading.Thread(target=lambda o=o: reports.append(deliver(stack, ids, owner=o)))
        for o in ("host:1:a", "host:2:b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # And once more, later.
    reports.append(deliver(stack, ids))

    counts = Counter(rcpt for m in smtp_server.messages for rcpt in m.rcpt_tos)
    assert len(counts) == 20
    assert set(counts.values()) == {1}
    assert sum(r.claimed for r in reports) == 20
    assert all(mailqueue.get_status(i).status == "sent" for i in ids)


def test_a_failed_connection_defers_instead_of_failing(stack, smtp_server):
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", subject="s", text="t")
    )
    smtp_server.stop()  # nothing listens any more: connection refused
    deliver(stack, [mid])
    info = mailqueue.get_status(mid)
    assert info.status == "deferred"
    assert info.last_error == "ConnectError"
    (r,) = info.recipients
    assert r.status == "deferred" and r.error == "ConnectError"


def test_expired_messages_fail_instead_of_retrying_forever(stack, smtp_server):
    stack.reconfigure(message_lifetime_s=1.0, retry_base_s=5.0)
    smtp_server.defer = ["*"]
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", subject="s", text="t")
    )
    deliver(stack, [mid])
    info = mailqueue.get_status(mid)
    # the next try would fall after the 1 s lifetime: give up now, keep the last reply
    assert info.status == "failed"
    assert info.last_error == "Expired"
    (r,) = info.recipients
    assert (r.status, r.smtp_code, r.error) == ("failed", 450, "Expired")


def test_retry_requeues_failed_recipients_only(stack, smtp_server):
    smtp_server.reject = ["no@*"]
    mid = mailqueue.enqueue(
        Message(
            sender="a@example.com", to=["yes@example.com", "no@example.com"], subject="s", text="t"
        )
    )
    deliver(stack, [mid])
    assert mailqueue.get_status(mid).status == "partial"

    smtp_server.reject = []
    assert mailqueue.retry(mid) == 1
    assert mailqueue.get_status(mid).status == "queued"
    deliver(stack, [mid])

    assert copies(smtp_server, "yes@example.com") == 1
    assert copies(smtp_server, "no@example.com") == 1
    assert mailqueue.get_status(mid).status == "sent"
    assert mailqueue.retry(mid) == 0  # nothing left to retry


def test_cancel_stops_pending_recipients(stack, smtp_server):
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", subject="s", text="t")
    )
    info = mailqueue.cancel(mid)
    assert info.status == "cancelled"
    assert deliver(stack, [mid]).claimed == 0
    assert smtp_server.messages == []


def test_recording_keeps_a_cancel_made_during_the_attempt_except_for_accepted_ones(stack):
    """The rules ``Store.record`` applies on both backends, whatever the batch: a
    recipient the relay accepted is ``sent`` even if cancelled meanwhile (that is
    what happened); any other result leaves a cancelled recipient cancelled; the
    message's status is derived from what its rows say then; the history keeps
    every result; the lease is given back. Eight messages in one record call."""
    check_recording_rules(stack)


def check_recording_rules(stack) -> None:
    from mailqueue.store.queue import MessageOutcome, RecipientOutcome

    def outcome(rid, status, code):
        return RecipientOutcome(rid, status, code, None, f"{code} words", None)

    ids = [
        mailqueue.enqueue(
            Message(sender="a@example.com", to=["ok@example.com", "no@example.com"], text="t")
        )
        for _ in range(8)
    ]
    owner = "test-host:1:abc"
    claimed = stack.store.claim([uuid.UUID(i) for i in ids], owner=owner, lease_s=60)
    assert len(claimed) == 8
    mailqueue.cancel(ids[0])  # both recipients cancelled while the attempt runs
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    outcomes = []
    for i, message in enumerate(claimed):
        ok, no = message.recipients
        second = outcome(no.id, "deferred", 450) if i % 2 else outcome(no.id, "failed", 550)
        outcomes.append(
            MessageOutcome(
                message.id,
                later if i % 2 else None,
                (outcome(ok.id, "sent", 250), second),
                last_error="refused" if i % 2 == 0 else "deferred",
                last_reply="550 words" if i % 2 == 0 else "450 words",
            )
        )
    stack.store.record(outcomes, owner=owner)

    first = mailqueue.get_status(ids[0])
    assert [(r.address, r.status) for r in first.recipients] == [
        ("ok@example.com", "sent"),
        ("no@example.com", "cancelled"),
    ]
    assert first.status == "partial"
    by_id = {str(m.id): i for i, m in enumerate(claimed)}
    for mid in ids[1:]:
        info = mailqueue.get_status(mid)
        deferred = by_id[mid] % 2 == 1
        assert [(r.address, r.status, r.smtp_code) for r in info.recipients] == [
            ("ok@example.com", "sent", 250),
            ("no@example.com", *(("deferred", 450) if deferred else ("failed", 550))),
        ]
        assert info.status == ("deferred" if deferred else "partial")
        assert info.last_reply == ("450 words" if deferred else "550 words")
    assert [(a.address, a.status) for a in mailqueue.get_attempts(ids[0])] == [
        ("ok@example.com", "sent"),
        ("no@example.com", "failed" if by_id[ids[0]] % 2 == 0 else "deferred"),
    ]
    table = MessageRow.__table__
    with stack.engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.id, table.c.lease_owner, table.c.next_attempt_at, table.c.worker)
        ).all()
    assert all(r.lease_owner is None and r.worker == "test-host:1" for r in rows)
    for r in rows:
        if by_id[str(r.id)] % 2:
            assert abs((r.next_attempt_at - later).total_seconds()) < 0.001


def test_a_retry_whose_broker_cannot_be_built_returns_and_leaves_it_to_the_scheduler(
    stack, smtp_server, monkeypatch, caplog
):
    """The requeue is committed before the broker is told: a broker that fails then
    (here its transport cannot even be imported) is a WARNING, never an exception a
    caller would answer with a second retry (ARCHITECTURE, invariant 10)."""
    import mailqueue.worker.app as worker_app
    from mailqueue.scheduler import Scheduler

    smtp_server.reject = ["no@*"]
    mid = mailqueue.enqueue(Message(sender="a@example.com", to="no@example.com", text="t"))
    deliver(stack, [mid])
    assert mailqueue.get_status(mid).status == "failed"
    smtp_server.reject = []

    def broken_app() -> None:
        raise ModuleNotFoundError("No module named 'packaging'")

    monkeypatch.setattr(worker_app, "get_app", broken_app)
    caplog.set_level("WARNING")
    assert mailqueue.retry(mid) == 1
    assert mailqueue.retry_failed() == 0  # already requeued
    assert mailqueue.get_status(mid).status == "queued"
    assert any("scheduler will pick" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()

    assert Scheduler(stack.settings).tick().dispatched == 1  # flagged: the very next tick
    deliver(stack, [mid])
    assert copies(smtp_server, "no@example.com") == 1  # refused once, then delivered once
    assert mailqueue.get_status(mid).status == "sent"


def _deliver_holding_first_commit(stack, smtp_server, *, messages, release_when):
    """Deliver ``messages`` messages in one batch while the first group commit is held
    until ``release_when(events)`` holds (or two seconds pass), and return the
    order of events: ("MAIL", sender) and ("DATA", sender) as the server reads
    them (DATA: the content taken, just before its 250), ("commit", senders)."""
    events: list[tuple[str, object]] = []
    lock = threading.Lock()
    changed = threading.Condition(lock)

    def log(event: tuple[str, object]) -> None:
        with changed:
            events.append(event)
            changed.notify_all()

    def on_sender(address: str) -> None:
        log(("MAIL", address))

    smtp_server.on_sender = on_sender
    smtp_server.on_message = lambda received: log(("DATA", received.mail_from))
    ids = [
        mailqueue.enqueue(
            Message(sender=f"app{i}@example.com", to=[f"r{i}@example.com"], subject="s", text="t")
        )
        for i in range(messages)
    ]
    store = stack.store
    record = store.record
    senders = {uuid.UUID(str(mid)): f"app{i}@example.com" for i, mid in enumerate(ids)}

    def held_record(outcomes, **kw):
        with changed:
            if not any(kind == "commit" for kind, _ in events):
                # Give a second message every chance to go out on a freed connection.
                changed.wait_for(lambda: release_when(events), timeout=2.0)
        record(outcomes, **kw)
        log(("commit", sorted(senders[o.message_id] for o in outcomes)))

    store.record = held_record

    async def go() -> BatchReport:
        deliverer = Deliverer(stack.settings, store)
        try:
            return await deliverer.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await deliverer.aclose()

    report = asyncio.run(go())
    assert report.recipients == {"sent": messages}
    return events


def test_a_connection_carries_no_next_message_before_the_outcome_is_committed(stack, smtp_server):
    """Issue #21, with MAILQUEUE_COMMIT_BEFORE_REUSE: with one connection and the first
    commit held, the second message's MAIL reaches the relay only after the first
    outcome is committed (so a crash can cost at most one resent message per connection)."""
    stack.reconfigure(relay_pool_size=1, commit_before_reuse=True)
    events = _deliver_holding_first_commit(
        stack,
        smtp_server,
        messages=3,
        release_when=lambda ev: sum(kind == "MAIL" for kind, _ in ev) >= 2,
    )
    events = [e for e in events if e[0] != "DATA"]
    mails = [e for e in events if e[0] == "MAIL"]
    commits = [e for e in events if e[0] == "commit"]
    assert len(mails) == 3 and len({m.session_id for m in smtp_server.messages}) == 1
    for mail, commit in zip(mails, commits, strict=True):
        assert events.index(mail) < events.index(commit)  # sent, then committed …
    for commit, next_mail in zip(commits, mails[1:], strict=False):
        assert events.index(commit) < events.index(next_mail)  # … before the next goes out


def test_by_default_a_connection_carries_the_next_message_while_the_commit_runs(stack, smtp_server):
    """The default (throughput first, ops/bench/README.md "The duplicate window"): the
    connection goes back to the pool with the DATA reply, so with the first commit
    held, the next message's MAIL reaches the relay before that commit."""
    stack.reconfigure(relay_pool_size=1)
    events = _deliver_holding_first_commit(
        stack,
        smtp_server,
        messages=2,
        release_when=lambda ev: sum(kind == "MAIL" for kind, _ in ev) >= 2,
    )
    first_commit = next(i for i, e in enumerate(events) if e[0] == "commit")
    assert [e[0] for e in events[:first_commit]].count("MAIL") == 2


def test_concurrent_connections_still_send_while_a_commit_is_held(stack, smtp_server):
    """Holding a connection until its outcome is committed does not serialize the
    pool: the other connections send meanwhile, and their outcomes share a commit."""
    stack.reconfigure(relay_pool_size=3, commit_before_reuse=True)
    events = _deliver_holding_first_commit(
        stack,
        smtp_server,
        messages=3,
        release_when=lambda ev: sum(kind == "DATA" for kind, _ in ev) == 3,
    )
    first_commit = next(i for i, e in enumerate(events) if e[0] == "commit")
    assert sorted(e[0] for e in events[:first_commit]) == ["DATA"] * 3 + ["MAIL"] * 3
    assert sum(len(e[1]) for e in events if e[0] == "commit") == 3
