"""Enqueue: durable before it returns, all-or-nothing, and inside the caller's transaction."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import mailqueue
from mailqueue import InvalidMessageError, Message
from mailqueue.config import hide_password
from mailqueue.store.models import MessageRow, RecipientRow

M = MessageRow.__table__
R = RecipientRow.__table__


def counts(stack) -> tuple[int, int]:
    with stack.engine.connect() as conn:
        return (
            conn.execute(sa.select(sa.func.count()).select_from(M)).scalar(),
            conn.execute(sa.select(sa.func.count()).select_from(R)).scalar(),
        )


def broker_depth(stack) -> int:
    """How many task messages wait in the broker's queue, once the background
    hand-off has sent everything it was given (see ``worker/handoff.py``)."""
    from mailqueue.worker.app import flush_dispatch, get_app

    assert flush_dispatch(timeout=30)

    with get_app().connection_for_write() as conn:
        _, depth, _ = conn.default_channel.queue_declare(
            stack.settings.queue_name, passive=False, durable=True, auto_delete=False
        )
        return depth


def test_enqueue_writes_message_and_deduplicated_recipients(stack):
    mid = mailqueue.enqueue(
        Message(
            sender="Shop <shop@example.com>",
            to=["a@example.com", "B@example.com"],
            cc=["a@example.com"],
            bcc=["c@example.com", "b@example.com"],
            subject="Order",
            text="thanks",
        )
    )
    info = mailqueue.get_status(mid)
    assert info.status == "queued"
    assert info.mail_from == "shop@example.com"
    assert [(r.address.lower(), r.kind, r.status) for r in info.recipients] == [
        ("a@example.com", "to", "pending"),
        ("b@example.com", "to", "pending"),
        ("c@example.com", "bcc", "pending"),
    ]
    assert broker_depth(stack) == 1  # woken with one task carrying ids


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(to=["not-an-address"]), "to"),
        (dict(to=[]), "to"),
        (dict(subject="hi\r\nBcc: victim@example.com"), "subject"),
        (dict(headers={"X-Tag": "a\nInjected: yes"}), "headers"),
        (dict(text="x" * 5000), "size"),
    ],
)
def test_bad_input_is_refused_whole(stack, bad, field):
    stack.reconfigure(max_message_size=4096)
    good = [
        Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
        for i in range(3)
    ]
    fields = dict(sender="a@example.com", to=["x@example.com"], subject="s", text="t")
    fields.update(bad)
    with pytest.raises(InvalidMessageError) as caught:
        mailqueue.enqueue_many([*good, Message(**fields)])
    assert caught.value.field == field
    assert "message #3" in str(caught.value)
    with pytest.raises(InvalidMessageError):
        mailqueue.enqueue(Message(**fields))
    assert counts(stack) == (0, 0)  # nothing half-written


def _nested(depth: int) -> dict:
    """``{"a": {"a": ... {"a": 1}}}`` with ``depth`` objects."""
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


def _cyclic() -> dict:
    loop: dict = {}
    loop["self"] = loop
    return loop


def _refused(field, call, *args, **kwargs) -> InvalidMessageError:
    with pytest.raises(InvalidMessageError) as caught:
        call(*args, **kwargs)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field, caught.value
    return caught.value


@pytest.mark.parametrize("item", [{"sender": "a@example.com"}, None, "a@example.com", b"x", 5])
def test_anything_but_a_message_is_refused_whole(stack, item):
    good = Message(sender="a@example.com", to="x@example.com", text="t")
    kind = type(item).__name__
    error = _refused("message", mailqueue.enqueue_many, [good, good, item])
    assert str(error) == f"message: message #2: expected a mailqueue.Message, got {kind}"
    error = _refused("message", mailqueue.enqueue, item)
    assert str(error) == f"message: expected a mailqueue.Message, got {kind}"
    _refused("messages", mailqueue.enqueue_many, good)  # one Message, not a list of them
    _refused("message", mailqueue.send_now, item)
    assert counts(stack) == (0, 0)


@pytest.mark.parametrize(
    "options, field, says",
    [
        (dict(send_at=5), "send_at", "must be a timezone-aware datetime, not int"),
        (dict(send_at="2030-01-01T00:00:00Z"), "send_at", "not str"),
        (dict(send_at=dt.date(2030, 1, 1)), "send_at", "not date"),
        (dict(send_at=dt.datetime(2030, 1, 1)), "send_at", "must be timezone-aware"),
        (dict(relay=5), "relay", "must be a relay name (a string), not int"),
        (dict(relay="nope"), "relay", "no relay named 'nope'"),
        (dict(idempotency_key=42), "idempotency_key", "must be a string, not int"),
        (dict(idempotency_key=""), "idempotency_key", "1 to 255 characters"),
        (dict(metadata=["a"]), "metadata", "must be a JSON object (a dict), not list"),
        (dict(metadata="tag=x"), "metadata", "not str"),
        (dict(metadata={"when": dt.datetime.now(dt.UTC)}), "metadata", "is a datetime"),
        (dict(metadata={"s": {1, 2}}), "metadata", "metadata['s'] is a set, which is not JSON"),
        (dict(metadata={1: "x"}), "metadata", "keys must be strings, not int"),
        (dict(metadata={"x": float("nan")}), "metadata", "nan, which JSON cannot hold"),
        (dict(metadata={"x": float("inf")}), "metadata", "inf, which JSON cannot hold"),
        (dict(metadata={"x": 10**5000}), "metadata", "4300 digits"),
        (dict(metadata={"x": "a\x00b"}), "metadata", "metadata['x'] holds a NUL character"),
        (dict(metadata={"x": "\ud800"}), "metadata", "not valid Unicode"),
        (dict(metadata=_nested(33)), "metadata", "nested deeper than 32 levels"),
        (dict(metadata=_nested(100_000)), "metadata", "nested deeper than 32 levels"),
        (dict(metadata=_cyclic()), "metadata", "nested deeper than 32 levels"),
        (dict(metadata={"x": "y" * 65_536}), "metadata", "over the 65536-byte limit"),
        (dict(metadata={"x": [0] * 40_000}), "metadata", "over the 65536-byte limit"),
        (dict(metadata={"x": "é" * 33_000}), "metadata", "over the 65536-byte limit"),
        (dict(metadata={"tag": "t" * 256}), "metadata", "at most 255 characters"),
        (dict(metadata={"tag": ["a"]}), "metadata", "metadata['tag'] must be a string"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(stack, options, field, says):
    msg = Message(sender="a@example.com", to="x@example.com", text="t")
    error = _refused(field, mailqueue.enqueue, msg, **options)
    assert says in error.reason
    if set(options) <= {"send_at", "relay"}:
        error = _refused(field, mailqueue.enqueue_many, [msg], **options)
        assert says in error.reason
    assert counts(stack) == (0, 0)
    assert broker_depth(stack) == 0


def test_metadata_at_the_limits_reads_back_as_given(stack):
    """32 levels, just under 64 KiB, a 255-character tag: stored and indexed
    on both databases (PostgreSQL indexes ``meta ->> 'tag'``)."""
    from mailqueue.api import METADATA_MAX_BYTES

    deep = _nested(31)  # 31 objects under the top one: 32 levels
    filler = "é" * ((METADATA_MAX_BYTES - 1000) // 2)
    metadata = {"tag": "t" * 255, "deep": deep, "filler": filler, "list": [1, 2.5, None, True]}
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", text="t"), metadata=metadata
    )
    with stack.engine.connect() as conn:
        assert conn.execute(sa.select(M.c.meta).where(M.c.id == uuid.UUID(mid))).scalar() == (
            metadata
        )


@pytest.mark.parametrize(
    "bug",
    [
        IndexError("string index out of range"),
        AttributeError("'NoneType' object has no attribute 'local_part'"),
        TypeError("expected str"),
        UnicodeEncodeError("ascii", "é", 0, 1, "ordinal not in range(128)"),
        LookupError("unknown encoding: x"),
        KeyError("charset"),
        ValueError("Header values may not contain linefeed or carriage return characters"),
    ],
)
def test_a_composing_bug_is_a_refusal_not_a_crash(stack, monkeypatch, bug):
    """Whatever ``build_envelope`` raises by mistake reaches the caller as
    ``InvalidMessageError`` (field None) carrying the original words, with no
    chained traceback; nothing is written."""
    from mailqueue import api

    def broken(message, **_options):
        raise bug

    monkeypatch.setattr(api, "build_envelope", broken)
    msg = Message(sender="a@example.com", to="x@example.com", text="t")
    for call in (mailqueue.enqueue, mailqueue.send_now):
        error = _refused(None, call, msg)
        assert str(bug) in error.reason and type(bug).__name__ in error.reason
        assert error.__cause__ is None and error.__suppress_context__
    error = _refused(None, mailqueue.enqueue_many, [msg])
    assert error.reason.startswith("message #0: could not compose the message")
    assert counts(stack) == (0, 0)


@pytest.mark.parametrize("address", ["to@", "@", "a@b@", "<>", "to@[", '"', "a@exa mple.com"])
def test_malformed_addresses_are_refused_not_crashed_on(stack, address):
    """``to@`` used to raise a bare ``IndexError`` from the ``email`` package."""
    with pytest.raises(InvalidMessageError):
        mailqueue.enqueue(Message(sender="a@example.com", to=[address], text="t"))
    assert counts(stack) == (0, 0)


def test_rows_commit_with_the_callers_session_and_dispatch_after_commit(stack):
    engine = stack.engine
    with Session(engine) as session:
        mailqueue.enqueue(
            Message(sender="a@example.com", to="x@example.com", subject="s", text="t"),
            session=session,
        )
        session.rollback()
    assert counts(stack) == (0, 0)
    assert broker_depth(stack) == 0  # a rolled-back order sends no mail

    with Session(engine) as session:
        mid = mailqueue.enqueue(
            Message(sender="a@example.com", to="x@example.com", subject="s", text="t"),
            session=session,
        )
        assert broker_depth(stack) == 0  # not before the commit
        session.commit()
    assert counts(stack) == (1, 1)
    assert broker_depth(stack) == 1
    assert mailqueue.get_status(mid).status == "queued"


def test_core_connection_leaves_dispatch_to_the_scheduler(stack):
    from mailqueue.scheduler import Scheduler

    with stack.engine.begin() as conn:
        mid = mailqueue.enqueue(
            Message(sender="a@example.com", to="x@example.com", subject="s", text="t"), session=conn
        )
    assert broker_depth(stack) == 0
    assert Scheduler(stack.settings).tick().dispatched == 1
    assert broker_depth(stack) == 1
    assert Scheduler(stack.settings).tick().dispatched == 0  # not twice while in flight
    assert mailqueue.get_status(mid).status == "queued"


def test_send_at_in_the_future_waits_for_the_scheduler(stack):
    from mailqueue.scheduler import Scheduler

    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", subject="s", text="t"), send_at=later
    )
    assert broker_depth(stack) == 0
    assert Scheduler(stack.settings).tick().dispatched == 0


def test_idempotency_key_enqueues_once(stack):
    msg = Message(sender="a@example.com", to="x@example.com", subject="s", text="t")
    first = mailqueue.enqueue(msg, idempotency_key="order-42")
    second = mailqueue.enqueue(msg, idempotency_key="order-42")
    assert first == second
    assert counts(stack) == (1, 1)


def test_a_single_enqueue_stores_every_field_as_given(stack):
    """enqueue() takes its own fast path on PostgreSQL (one statement on the driver):
    metadata, a send_at in another time zone, the key and recipients read back as given."""
    paris = dt.timezone(dt.timedelta(hours=2))
    send_at = dt.datetime.now(paris).replace(microsecond=0) + dt.timedelta(hours=3)
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", cc="y@example.com", text="t"),
        send_at=send_at,
        idempotency_key="invoice-7",
        metadata={"tag": "invoice", "n": 7, "nested": {"ok": True}},
    )
    with stack.engine.connect() as conn:
        row = conn.execute(sa.select(M).where(M.c.id == uuid.UUID(mid))).one()
        rcpts = conn.execute(sa.select(R.c.address, R.c.kind, R.c.status)).all()
    assert row.meta == {"tag": "invoice", "n": 7, "nested": {"ok": True}}
    assert row.next_attempt_at == send_at and row.next_attempt_at.tzinfo is not None
    assert (row.idempotency_key, row.status, row.dispatched_at) == ("invoice-7", "queued", None)
    assert sorted(rcpts) == [("x@example.com", "to", "pending"), ("y@example.com", "cc", "pending")]


def test_a_key_taken_meanwhile_is_refused_as_an_integrity_error(stack):
    """The race behind idempotency keys: the key was free when looked up, taken at insert.
    The store raises SQLAlchemy's IntegrityError (enqueue() then returns the first id)
    and leaves nothing half-written."""
    from mailqueue import api
    from mailqueue.store.models import utcnow

    msg = Message(sender="a@example.com", to="x@example.com", subject="s", text="t")
    first = mailqueue.enqueue(msg, idempotency_key="race-1")
    again = api._prepare(
        msg, relay=None, send_at=None, idempotency_key="race-1", metadata=None, now=utcnow()
    )
    with pytest.raises(sa.exc.IntegrityError):
        api._store().insert([again])
    assert counts(stack) == (1, 1)
    assert mailqueue.enqueue(msg, idempotency_key="race-1") == first
    # The pooled connection is still usable after the refusal.
    assert mailqueue.enqueue(msg) != first and counts(stack) == (2, 2)


def test_enqueue_many_reports_progress_in_chunks(stack):
    seen: list[int] = []
    ids = mailqueue.enqueue_many(
        (
            Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
            for i in range(25)
        ),
        chunk_size=10,
        progress=seen.append,
    )
    assert len(set(ids)) == 25
    assert seen == [10, 20, 25]
    assert counts(stack) == (25, 25)


def test_a_bulk_write_keeps_metadata_and_refuses_a_taken_key_whole(stack):
    """Store.insert of 25 messages (COPY on PostgreSQL, in binary): metadata and keys
    read back as given; a chunk with one key already taken writes nothing."""
    from mailqueue import api
    from mailqueue.store.models import utcnow

    def prepared(i: int, key: str) -> object:
        msg = Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
        return api._prepare(
            msg, relay=None, send_at=None, idempotency_key=key, metadata={"n": i}, now=utcnow()
        )

    api._store().insert([prepared(i, f"bulk-{i}") for i in range(25)])
    with stack.engine.connect() as conn:
        rows = conn.execute(sa.select(M.c.idempotency_key, M.c.meta)).all()
    assert sorted(rows, key=lambda r: r.meta["n"]) == [(f"bulk-{i}", {"n": i}) for i in range(25)]

    again = [prepared(100 + i, f"new-{i}") for i in range(24)] + [prepared(999, "bulk-3")]
    with pytest.raises(sa.exc.IntegrityError):
        api._store().insert(again)
    assert counts(stack) == (25, 25)


def test_a_big_enqueue_many_writes_the_same_rows_as_enqueue(stack):
    """Chunks of 20+ messages go in with COPY on PostgreSQL: same rows, same bytes."""
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    msgs = [
        Message(
            sender="Shop <shop@example.com>",
            to=[f"r{i}@example.com", "Same Person <same@example.com>"],
            bcc="audit@example.com",
            subject=f"order {i}",
            text=f"line one\nline {i}",
            html=f"<p>{i}</p>",
        )
        for i in range(30)
    ]
    ids = mailqueue.enqueue_many(msgs, send_at=later)
    one = mailqueue.enqueue(msgs[0], send_at=later)
    with stack.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(M))}
        rcpts = conn.execute(sa.select(R.c.message_id, R.c.address, R.c.kind, R.c.status)).all()
    assert len(rows) == 31 and len(rcpts) == 93
    for i, mid in enumerate(ids):
        row = rows[uuid.UUID(mid)]
        assert (row.status, row.mail_from, row.subject) == (
            "queued",
            "shop@example.com",
            f"order {i}",
        )
        assert row.next_attempt_at == later and row.expires_at > later
        assert row.dispatched_at is None  # not due yet: the scheduler dispatches it
        assert row.size == len(row.content) and f"line {i}".encode() in row.content
        assert b"audit@example.com" not in row.content
    single = rows[uuid.UUID(one)]
    first = rows[uuid.UUID(ids[0])]
    for column in ("status", "relay", "mail_from", "smtputf8", "eightbit", "attempts", "meta"):
        assert getattr(first, column) == getattr(single, column), column
    kinds = sorted((a, k, s) for m, a, k, s in rcpts if m == first.id)
    assert kinds == [
        ("audit@example.com", "bcc", "pending"),
        ("r0@example.com", "to", "pending"),
        ("same@example.com", "to", "pending"),
    ]


def test_status_to_dict_is_json_ready_all_the_way_down(stack):
    import json

    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to=["x@example.com", "y@example.com"], text="t")
    )
    data = mailqueue.get_status(mid).to_dict()
    json.dumps(data)  # no datetime left anywhere, recipients included
    assert all(isinstance(r["updated_at"], str) for r in data["recipients"])


def test_enqueue_returns_before_the_hand_off_and_many_calls_share_tasks(stack, monkeypatch):
    """The broker is woken from a background thread: enqueue() returns after its
    commit, and ids committed while a hand-off is under way go out together."""
    from mailqueue.worker import app as worker_app

    sent: list[int] = []
    release = threading.Event()
    real = worker_app.dispatch

    def slow_dispatch(ids, *, settings=None, priority=1):
        release.wait(60)  # the broker hangs until the test lets it go
        sent.append(len(ids))
        return real(ids, settings=settings, priority=priority)

    monkeypatch.setattr(
        worker_app._handoff, "_send", lambda ids, s, p: slow_dispatch(ids, settings=s, priority=p)
    )
    ids = [
        mailqueue.enqueue(Message(sender="a@example.com", to=f"u{i}@example.com", text="x"))
        for i in range(5)
    ]
    assert sent == []  # every call returned while the broker still hung: nobody waited for it
    assert all(mailqueue.get_status(i).status == "queued" for i in ids)  # committed
    release.set()
    assert broker_depth(stack) in (1, 2)  # the first alone, then the 4 that piled up
    assert sum(sent) == 5 and len(sent) <= 2


def test_inline_dispatch_wakes_the_broker_inside_the_call(stack):
    stack.reconfigure(dispatch="inline")
    from mailqueue.worker.app import _handoff

    mailqueue.enqueue(Message(sender="a@example.com", to="b@example.com", text="x"))
    assert not _handoff._pending and not _handoff._busy  # nothing went through the thread
    assert broker_depth(stack) == 1


def test_a_script_that_exits_right_after_enqueue_still_wakes_the_broker(stack, tmp_path):
    """The hand-off thread is flushed at exit, broker imports included (a first
    dispatch during interpreter shutdown cannot import redis-py)."""
    import subprocess
    import sys

    script = tmp_path / "enqueue_and_exit.py"
    script.write_text(
        "import mailqueue\n"
        "mailqueue.enqueue(mailqueue.Message(sender='a@example.com', to='b@example.com', "
        "text='x'))\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], env=stack.env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "broker unreachable" not in out.stderr, out.stderr
    assert broker_depth(stack) == 1


def test_a_key_with_a_control_character_and_a_send_at_past_the_calendar_are_refused(stack):
    """Both reached the database before (a DataError on PostgreSQL, an OverflowError
    adding the lifetime); both are the caller's input, refused whole."""
    msg = Message(sender="a@example.com", to="x@example.com", text="t")
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    for kwargs, field in (
        ({"idempotency_key": "k\0"}, "idempotency_key"),
        ({"send_at": far}, "send_at"),
    ):
        with pytest.raises(InvalidMessageError) as caught:
            mailqueue.enqueue(msg, **kwargs)
        assert caught.value.field == field
    assert counts(stack) == (0, 0)


# ------------------------------------------- after the commit, nothing raises (invariant 10)

BROKER_PASSWORD = "br0ker-Pa55"


def _unreachable_broker(stack, tmp_path) -> str:
    """A broker URL of the stack's kind that cannot be reached: Redis on a closed port
    (with a password, to check it is never shown), or a SQLite broker file that cannot
    be created (its directory is a regular file)."""
    if stack.name == "postgres":
        return f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/15"
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return f"sqla+sqlite:///{blocker}/broker.db"


@pytest.mark.parametrize("dispatch", ["background", "inline"])
def test_a_broker_that_cannot_be_reached_after_the_commit_is_logged_not_raised(
    stack, smtp_server, tmp_path, caplog, dispatch
):
    """SQL is the promise: enqueue() returns the id, the row waits for the scheduler,
    which sends it once the broker is back; a WARNING names the broker (no password)."""
    from mailqueue.scheduler import Scheduler
    from mailqueue.worker.app import flush_dispatch

    from .contrib_helpers import deliver

    good = stack.settings
    bad_url = _unreachable_broker(stack, tmp_path)
    stack.reconfigure(broker_url=bad_url, dispatch=dispatch)
    caplog.set_level("WARNING")
    mid = mailqueue.enqueue(
        Message(sender="a@example.com", to="x@example.com", subject="later", text="t")
    )
    assert flush_dispatch(timeout=60)
    assert mailqueue.get_status(mid).status == "queued"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("scheduler will pick" in w and hide_password(bad_url) in w for w in warnings), (
        warnings
    )
    assert not any(BROKER_PASSWORD in w for w in warnings), warnings

    stack.reconfigure(**{"broker_url": good.broker_url, "dispatch": good.dispatch})
    assert Scheduler(stack.settings).tick().dispatched == 1  # flagged: the very next tick
    report = deliver(stack, [mid])
    assert report.claimed == 1
    assert [m.rcpt_tos for m in smtp_server.messages] == [("x@example.com",)]
    assert mailqueue.get_status(mid).status == "sent"
    assert Scheduler(stack.settings).tick().dispatched == 0  # delivered once, not again


def test_a_broker_that_fails_after_a_session_commit_does_not_make_commit_raise(
    stack, tmp_path, caplog
):
    """With the caller's ORM session the broker is woken in its ``after_commit``: a
    failure there must not surface from ``commit()``, which already committed."""
    stack.reconfigure(broker_url=_unreachable_broker(stack, tmp_path), dispatch="inline")
    caplog.set_level("WARNING")
    with Session(stack.engine) as session:
        mid = mailqueue.enqueue(
            Message(sender="a@example.com", to="x@example.com", text="t"), session=session
        )
        session.commit()
    assert mailqueue.get_status(mid).status == "queued"
    assert any("scheduler will pick" in r.getMessage() for r in caplog.records)
    with stack.engine.connect() as conn:
        dispatched_at = conn.execute(
            sa.select(M.c.dispatched_at).where(M.c.id == uuid.UUID(mid))
        ).scalar()
    assert dispatched_at is None  # the scheduler sends it at its next tick


def test_send_with_a_broker_transport_that_cannot_import_exits_0_and_queues_once(
    pg_stack, tmp_path
):
    """Issue #19 item 4: ``kombu.transport.redis`` failed to import (``packaging``
    missing) after the row was committed, and ``mailqueue send`` exited 1 with a
    traceback: a caller that retried queued the mail twice."""
    import subprocess
    import sys

    missing = tmp_path / "no-packaging" / "packaging"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'packaging'\", name='packaging')\n"
    )
    env = pg_stack.env(
        PYTHONPATH=str(missing.parent),
        MAILQUEUE_BROKER_URL=f"redis://:{BROKER_PASSWORD}@127.0.0.1:6379/15",
    )
    out = subprocess.run(
        [sys.executable, "-m", "mailqueue", "send", "--from", "a@example.com"]
        + ["--to", "x@example.com", "--subject", "s", "--text", "t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    mid = out.stdout.strip()
    assert mailqueue.get_status(mid).status == "queued"
    assert counts(pg_stack) == (1, 1)
    assert "Traceback" not in out.stderr, out.stderr
    assert "packaging" in out.stderr and "scheduler will pick" in out.stderr, out.stderr
    assert "redis://:***@127.0.0.1:6379/15" in out.stderr and BROKER_PASSWORD not in out.stderr


def test_a_broker_that_accepts_but_never_answers_does_not_hold_enqueue(pg_stack, caplog):
    """A Redis that takes the connection and then says nothing (a dead host behind
    NAT, a stuck server) held a publish forever: inline, enqueue() never returned;
    in the background, the process's exit waited for it. The socket timeout bounds it."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_stay_silent() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_stay_silent, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        pg_stack.reconfigure(broker_url=f"redis://127.0.0.1:{port}/15", dispatch="inline")
        caplog.set_level("WARNING")
        mid = mailqueue.enqueue(Message(sender="a@example.com", to="x@example.com", text="t"))
        assert held  # it did reach the silent broker
        assert mailqueue.get_status(mid).status == "queued"
        assert any("scheduler will pick" in r.getMessage() for r in caplog.records)
    finally:
        listener.close()
        for conn in held:
            conn.close()
