"""ESMTP PIPELINING (RFC 2920) against the real dev server, which advertises it here.

Every reply is still judged per recipient: the same outcomes as the one-by-one
path, from one write of MAIL, RCPT… and DATA.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mailqueue
from mailqueue import Message
from mailqueue.config import RelayConfig
from mailqueue.devserver import DevServer
from mailqueue.smtp.delivery import deliver
from mailqueue.smtp.pipelining import send_pipelined
from mailqueue.smtp.pool import Pool
from mailqueue.worker.loop import new_event_loop
from mailqueue.worker.service import Deliverer

DATA = b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on asyncio's loop and on uvloop's (the worker's default), whose
    transports cache the protocol's ``data_received`` that the pipeline swaps."""
    monkeypatch.setenv("MAILQUEUE_EVENT_LOOP", request.param)
    if request.param == "uvloop":
        pytest.importorskip("uvloop")  # a dependency on every platform but Windows
    return request.param


def run_on_loop(coro):
    """``asyncio.run`` on the loop the worker would use (see ``worker.loop``)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        loop = runner.get_loop()
        wanted = os.environ["MAILQUEUE_EVENT_LOOP"]  # set by ``event_loop_kind``
        assert ("uvloop" in type(loop).__module__) == (wanted == "uvloop")
        return runner.run(coro)


@pytest.fixture
def smtp_server() -> Iterator[DevServer]:
    """Overrides conftest's: this server says PIPELINING (so ``stack`` relays to it too)."""
    server = DevServer(pipelining=True, reject=["bad*@*"], defer=["later*@*"]).start()
    try:
        yield server
    finally:
        server.stop()


def relay(server: DevServer, **kw: object) -> RelayConfig:
    return RelayConfig(
        url=server.url, connect_timeout_s=5, command_timeout_s=5, data_timeout_s=5, **kw
    )


def run_deliveries(server: DevServer, envelopes: list[tuple[str, list[str], bytes]]):
    """Deliver envelopes one after another through one pool; return results and pool stats."""

    async def go():
        pool = Pool(relay(server, pool_size=1))
        try:
            return [await deliver(pool, f, r, d) for f, r, d in envelopes], pool.stats
        finally:
            await pool.aclose()

    return run_on_loop(go())


def test_dev_server_advertises_pipelining_only_when_asked(smtp_server):
    async def offers(port: int) -> bool:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        try:
            return smtp.supports_extension("pipelining")
        finally:
            await smtp.quit()

    assert run_on_loop(offers(smtp_server.port)) is True
    with DevServer() as plain:
        assert run_on_loop(offers(plain.port)) is False


def test_commands_go_out_in_one_write_and_every_reply_is_read(smtp_server):
    writes: list[bytes] = []

    async def go():
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_server.port, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        protocol = smtp.protocol
        real_write = protocol.write

        def spy(data: bytes) -> None:  # observe the real writes, change nothing
            writes.append(bytes(data))
            real_write(data)

        protocol.write = spy
        replies = await send_pipelined(
            smtp, "a@example.com", ["x@example.org", "y@example.org"], DATA, timeout=5
        )
        del protocol.write
        # The session is still in step: a plain command after the pipeline works.
        noop = await smtp.noop()
        await smtp.quit()
        return replies, noop

    replies, noop = run_on_loop(go())
    assert writes[0] == (
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.org>\r\n"
        b"RCPT TO:<y@example.org>\r\nDATA\r\n"
    )
    assert replies.mail.code == 250
    assert [r.code for r in replies.rcpt] == [250, 250]
    assert replies.data_start.code == 354
    assert replies.data is not None and replies.data.code == 250
    assert noop.code == 250
    [received] = smtp_server.messages
    assert received.rcpt_tos == ("x@example.org", "y@example.org")
    assert received.data == DATA


def test_all_accepted_through_the_pool_on_one_connection(smtp_server):
    envelopes = [
        ("a@example.com", [f"u{i}@example.org", f"v{i}@example.org"], DATA) for i in range(5)
    ]
    results, stats = run_deliveries(smtp_server, envelopes)
    for result in results:
        assert [r.status for r in result.recipients] == ["sent", "sent"]
        assert result.data_code == 250 and result.error is None
    assert len(smtp_server.messages) == 5
    assert stats.opened == 1  # the pipelined session stayed usable across messages


def test_one_refused_and_one_deferred_in_a_pipelined_batch(smtp_server):
    rcpts = ["ok1@example.org", "bad1@example.org", "later1@example.org", "ok2@example.org"]
    (result, again), stats = run_deliveries(
        smtp_server, [("a@example.com", rcpts, DATA), ("a@example.com", ["ok3@example.org"], DATA)]
    )
    by = {r.address: r for r in result.recipients}
    assert by["ok1@example.org"].status == "sent"
    assert by["ok2@example.org"].status == "sent"
    assert (by["bad1@example.org"].status, by["bad1@example.org"].code) == ("failed", 550)
    assert by["bad1@example.org"].enhanced_code == "5.1.1"
    assert by["bad1@example.org"].error == "RecipientError"
    assert (by["later1@example.org"].status, by["later1@example.org"].code) == ("deferred", 450)
    assert "try again later" in (by["later1@example.org"].reply or "")
    assert [m.rcpt_tos for m in smtp_server.messages[:1]] == [
        ("ok1@example.org", "ok2@example.org")
    ]
    assert [r.status for r in again.recipients] == ["sent"]
    assert stats.opened == 1


def test_sender_refused(smtp_server):
    smtp_server.on_sender = lambda addr: not addr.startswith("blocked")
    (refused, after), stats = run_deliveries(
        smtp_server,
        [
            ("blocked@example.com", ["x@example.org", "y@example.org"], DATA),
            ("fine@example.com", ["z@example.org"], DATA),
        ],
    )
    assert [(r.status, r.code, r.error) for r in refused.recipients] == [
        ("failed", 553, "SenderError"),
        ("failed", 553, "SenderError"),
    ]
    assert type(refused.error).__name__ == "SenderError"
    assert [r.status for r in after.recipients] == ["sent"]  # RSET left the session clean
    assert [m.mail_from for m in smtp_server.messages] == ["fine@example.com"]
    assert stats.opened == 1


def test_every_recipient_refused_sends_no_content(smtp_server):
    (result,), _ = run_deliveries(
        smtp_server, [("a@example.com", ["bad1@example.org", "later2@example.org"], DATA)]
    )
    assert [(r.status, r.code) for r in result.recipients] == [("failed", 550), ("deferred", 450)]
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    "reply, status", [("554 5.6.0 Rejected", "failed"), ("451 4.3.0 Busy", "deferred")]
)
def test_data_refused(smtp_server, reply, status):
    smtp_server.faults.data_reply = reply
    (result,), _ = run_deliveries(
        smtp_server, [("a@example.com", ["x@example.org", "bad9@example.org"], DATA)]
    )
    by = {r.address: r for r in result.recipients}
    code = int(reply[:3])
    assert (by["x@example.org"].status, by["x@example.org"].code) == (status, code)
    assert by["x@example.org"].error == "DeliveryError"
    assert (by["bad9@example.org"].status, by["bad9@example.org"].code) == ("failed", 550)
    assert result.data_code == code
    smtp_server.faults.data_reply = None
    (ok,), _ = run_deliveries(smtp_server, [("a@example.com", ["y@example.org"], DATA)])
    assert [r.status for r in ok.recipients] == ["sent"]


def test_dropped_after_the_content_defers_and_is_not_retried_in_line(smtp_server):
    smtp_server.faults.drop_in_data = 1
    (result,), stats = run_deliveries(smtp_server, [("a@example.com", ["x@example.org"], DATA)])
    [r] = result.recipients
    assert (r.status, r.error) == ("deferred", "ConnectError")
    assert "may have been delivered" in (r.reply or "")
    assert stats.opened == 1  # no in-line retry after the content went out


def test_big_content_with_leading_dots_arrives_byte_for_byte(smtp_server):
    lines = [b".starts with a dot", b"..two dots", b"plain line " * 5, b"."] * 12000
    data = b"Subject: dots\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(data) > 3 * 256 * 1024  # several slices
    (result,), _ = run_deliveries(smtp_server, [("a@example.com", ["x@example.org"], data)])
    assert [r.status for r in result.recipients] == ["sent"]
    assert smtp_server.messages[0].data == data


def test_queue_end_to_end_records_each_recipient(stack, smtp_server):
    """The worker's batch code over a pipelining relay, on both stacks."""
    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["ok@example.org", "bad@example.org"],
            cc=["later@example.org"],
            subject="pipelined",
            text="hello",
        )
    )

    async def go():
        deliverer = Deliverer(stack.settings, stack.store)
        try:
            return await deliverer.deliver_batch([uuid.UUID(mid)])
        finally:
            await deliverer.aclose()

    report = run_on_loop(go())
    assert report.claimed == 1
    info = mailqueue.get_status(mid)
    by = {r.address: r for r in info.recipients}
    assert by["ok@example.org"].status == "sent"
    assert (by["bad@example.org"].status, by["bad@example.org"].smtp_code) == ("failed", 550)
    assert (by["later@example.org"].status, by["later@example.org"].smtp_code) == ("deferred", 450)
    assert info.status == "deferred"
    assert [m.rcpt_tos for m in smtp_server.messages] == [("ok@example.org",)]


def test_big_message_is_read_in_slices_and_arrives_whole(stack, smtp_server, monkeypatch):
    """Over ``INLINE_CONTENT_MAX`` the claim leaves the content out; it is read in slices."""
    import os

    import sqlalchemy as sa

    from mailqueue import Attachment
    from mailqueue.store import claim as queue_mod

    monkeypatch.setattr(queue_mod, "CONTENT_SLICE", 256 * 1024)  # several slices, on both stacks
    payload = os.urandom(1536 * 1024)
    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["big@example.org"],
            subject="big",
            text="attached",
            attachments=[Attachment(filename="big.bin", content=payload)],
        )
    )
    [claimed] = stack.store.claim([uuid.UUID(mid)], owner="probe", lease_s=60)
    assert claimed.content is None and claimed.size > queue_mod.INLINE_CONTENT_MAX
    with stack.engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT content FROM mq_message WHERE id = :id"),
            {"id": uuid.UUID(mid) if stack.name == "postgres" else uuid.UUID(mid).hex},
        ).scalar_one()
    assert bytes(stack.store.load_content(claimed.id, claimed.size)) == bytes(stored)
    stack.store.release([claimed.id], owner="probe")

    async def go():
        deliverer = Deliverer(stack.settings, stack.store)
        try:
            return await deliverer.deliver_batch([uuid.UUID(mid)])
        finally:
            await deliverer.aclose()

    assert run_on_loop(go()).claimed == 1
    assert mailqueue.get_status(mid).status == "sent"
    [received] = smtp_server.messages
    assert received.data == bytes(stored)


@given(
    st.lists(st.sampled_from([b"a", b"b c", b".", b"..", b"\r", b"\n", b"\r\n", b"\xe9"])).map(
        b"".join
    )
)
@settings(max_examples=300, deadline=None)
def test_content_on_the_wire_is_what_aiosmtplib_would_send(data):
    """The pipeline's writer (fast path for ready content, slices otherwise) puts on
    the wire exactly aiosmtplib's DATA encoding: CRLF line ends, dot-stuffing, final dot."""
    from aiosmtplib.protocol import LINE_ENDINGS_REGEX, PERIOD_REGEX

    from mailqueue.smtp.pipelining import Pipeline

    expected = PERIOD_REGEX.sub(b"..", LINE_ENDINGS_REGEX.sub(b"\r\n", data))
    expected += (b"" if expected.endswith(b"\r\n") else b"\r\n") + b".\r\n"

    class Wire:
        def __init__(self):
            self.out = bytearray()

        def write(self, chunk):
            self.out += chunk

        async def _drain_helper(self):
            return None

    for payload in (data, bytearray(data)):
        wire = Wire()
        asyncio.run(Pipeline(None)._write_content(wire, payload))  # type: ignore[arg-type]
        assert bytes(wire.out) == expected


def test_a_batch_of_big_messages_holds_a_bounded_amount_of_content(stack, smtp_server, monkeypatch):
    """Every message of a batch starts at once; contents beyond the claim's share are
    read only while the process holds less than its budget, and all arrive whole."""
    import email

    from mailqueue import Attachment
    from mailqueue.store import claim as queue_mod
    from mailqueue.worker import service as service_mod

    monkeypatch.setattr(queue_mod, "CLAIM_CONTENT_BUDGET", 60 * 1024)  # 10 KB each for 6
    monkeypatch.setattr(service_mod, "BIG_CONTENT_BUDGET", 100 * 1024)  # one 55 KB at a time
    payloads = [os.urandom(40 * 1024) for _ in range(6)]
    ids = mailqueue.enqueue_many(
        Message(
            sender="app@example.com",
            to=[f"big{i}@example.org"],
            subject=f"big {i}",
            text="attached",
            attachments=[Attachment(filename="b.bin", content=p)],
        )
        for i, p in enumerate(payloads)
    )
    store = stack.store
    claimed = store.claim([uuid.UUID(i) for i in ids], owner="probe", lease_s=60)
    assert [c.content for c in claimed] == [None] * 6  # over the 10 KB share
    store.release([c.id for c in claimed], owner="probe")

    peak = 0

    async def go():
        nonlocal peak
        deliverer = Deliverer(stack.settings, store)
        load = store.load_content

        def watched(message_id, size):
            nonlocal peak
            peak = max(peak, deliverer._content_budget.used)
            return load(message_id, size)

        monkeypatch.setattr(store, "load_content", watched)
        try:
            return await deliverer.deliver_batch([uuid.UUID(i) for i in ids])
        finally:
            await deliverer.aclose()

    assert run_on_loop(go()).claimed == 6
    assert 40 * 1024 < peak <= 100 * 1024  # one content at a time, not six
    received = {
        m.rcpt_tos[0]: email.message_from_bytes(m.data).get_payload()[1].get_payload(decode=True)
        for m in smtp_server.messages
    }
    assert received == {f"big{i}@example.org": p for i, p in enumerate(payloads)}
