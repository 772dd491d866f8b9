"""VERP return paths (issue #18): signed per-recipient envelope senders.

Unit tests hold the token to its promises (verifies for its row only, forgery
and replay fail, fits a local part, case-insensitive); the delivery tests
check what the dev SMTP server received with and without a bounce domain.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import mailqueue
from mailqueue import Message
from mailqueue.bounces.verp import make_return_path, read_token, verifies
from mailqueue.config import Settings
from mailqueue.store.models import RecipientRow
from mailqueue.worker.service import Deliverer

SECRET = b"s" * 32
DOMAIN = "bounce.example.com"
MID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def path_for(rid: int, address: str = "user@example.net", mid: uuid.UUID = MID) -> str:
    return make_return_path(
        secret=SECRET, domain=DOMAIN, message_id=mid, recipient_id=rid, address=address
    )


def check(path: str, rid: int, address: str = "user@example.net", mid: uuid.UUID = MID) -> bool:
    token = read_token(path, domain=DOMAIN)
    return token is not None and verifies(
        token, secret=SECRET, message_id=mid, recipient_id=rid, address=address
    )


@settings(max_examples=200)
@given(st.integers(0, 2**63 - 1))
def test_a_token_verifies_for_its_row_and_fits_a_local_part(rid: int) -> None:
    path = path_for(rid)
    local, _, domain = path.partition("@")
    assert domain == DOMAIN and local.startswith("b+") and len(local) <= 32
    assert check(path, rid)
    assert check(path.upper().replace(DOMAIN.upper(), DOMAIN), rid)  # MTAs may change case
    assert read_token(path, domain=DOMAIN).recipient_id == rid  # type: ignore[union-attr]


def test_a_token_cannot_be_replayed_onto_another_row() -> None:
    path = path_for(41)
    assert not check(path, 42)  # another recipient
    assert not check(path, 41, mid=uuid.uuid4())  # another message
    assert not check(path, 41, address="other@example.net")  # another address
    assert check(path, 41, address="USER@example.net")  # same address, other case
    # Rewriting the id in the token keeps the MAC of row 41: it fails for row 42.
    forged = path.replace("b+15-", "b+16-")
    token = read_token(forged, domain=DOMAIN)
    assert token is not None and token.recipient_id == 42
    assert not check(forged, 42)


def test_a_token_made_with_another_secret_does_not_verify() -> None:
    other = make_return_path(
        secret=b"t" * 32, domain=DOMAIN, message_id=MID, recipient_id=7, address="user@example.net"
    )
    assert not check(other, 7)


@pytest.mark.parametrize(
    "address",
    [
        "b+7-abcdefghijklmnop@elsewhere.example",  # another domain
        "bounce@bounce.example.com",
        "b+7-abcdefghijklmno@bounce.example.com",  # short MAC
        "b+7-abcdefghijklmnop1@bounce.example.com",  # 1 is not base 32
        "b+-abcdefghijklmnop@bounce.example.com",
        "",
        "b+7-abcdefghijklmnop",
    ],
)
def test_addresses_without_a_token(address: str) -> None:
    assert read_token(address, domain=DOMAIN) is None


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        make_return_path(
            secret=b"short", domain=DOMAIN, message_id=MID, recipient_id=1, address="a@b.example"
        )


def test_a_bounce_domain_without_a_secret_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("MAILQUEUE_BOUNCE_SECRET", raising=False)
    with pytest.raises(ValueError, match="MAILQUEUE_BOUNCE_SECRET must be too"):
        Settings(bounce_domain=DOMAIN)
    monkeypatch.setenv("MAILQUEUE_BOUNCE_SECRET", "x" * 32)
    assert "x" * 32 not in repr(Settings(bounce_domain=DOMAIN))
    with pytest.raises(ValueError, match="must be a plain domain name"):
        Settings(bounce_domain="bounce.example.com>")


def deliver(stack, ids) -> None:
    async def go() -> None:
        deliverer = Deliverer(stack.settings, stack.store)
        try:
            await deliverer.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await deliverer.aclose()

    asyncio.run(go())


def recipient_ids(stack, mid) -> dict[str, int]:
    table = RecipientRow.__table__
    with stack.engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.address, table.c.id).where(table.c.message_id == uuid.UUID(str(mid)))
        )
        return {address: rid for address, rid in rows}


@pytest.mark.both_paths
def test_with_a_bounce_domain_each_recipient_gets_its_own_signed_return_path(
    sqlite_stack, smtp_server, monkeypatch
):
    monkeypatch.setenv("MAILQUEUE_BOUNCE_SECRET", SECRET.decode())
    sqlite_stack.reconfigure(bounce_domain=DOMAIN)
    smtp_server.reject = ["refused@*"]
    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["one@example.net", "two@example.net", "refused@example.net"],
            subject="verp",
            text="hello",
        )
    )
    deliver(sqlite_stack, [mid])

    ids = recipient_ids(sqlite_stack, mid)
    for address in ("one@example.net", "two@example.net"):
        (got,) = smtp_server.received_for(address)
        assert list(got.rcpt_tos) == [address]
        assert check_row(got.mail_from, mid, ids[address], address)
        assert not check_row(
            got.mail_from,
            mid,
            ids["two@example.net" if address.startswith("one") else "one@example.net"],
            address,
        )
    by = {r.address: r.status for r in mailqueue.get_status(mid).recipients}
    assert by == {
        "one@example.net": "sent",
        "two@example.net": "sent",
        "refused@example.net": "failed",
    }


def check_row(path: str, mid, rid: int, address: str) -> bool:
    token = read_token(path, domain=DOMAIN)
    return token is not None and verifies(
        token, secret=SECRET, message_id=uuid.UUID(str(mid)), recipient_id=rid, address=address
    )


@pytest.mark.both_paths
def test_without_a_bounce_domain_nothing_changes(sqlite_stack, smtp_server):
    mid = mailqueue.enqueue(
        Message(
            sender="app@example.com",
            to=["one@example.net", "two@example.net"],
            subject="plain",
            text="hello",
        )
    )
    deliver(sqlite_stack, [mid])
    (got,) = smtp_server.messages
    assert got.mail_from == "app@example.com"
    assert sorted(got.rcpt_tos) == ["one@example.net", "two@example.net"]


def test_a_failure_after_an_accepted_transaction_keeps_that_recipient_sent(
    sqlite_stack, smtp_server, monkeypatch
):
    """Fault injection: the second transaction's connection fails its AUTH (as a
    fresh pooled connection can). The first recipient, already accepted, must be
    recorded ``sent`` (never sent again); the second is deferred, the relay paused, and
    it is sent once the relay is resumed."""
    from mailqueue.errors import AuthError
    from mailqueue.store.models import MessageRow
    from mailqueue.worker import service

    monkeypatch.setenv("MAILQUEUE_BOUNCE_SECRET", SECRET.decode())
    sqlite_stack.reconfigure(bounce_domain=DOMAIN)
    real = service.deliver
    calls = []

    async def second_fails(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise AuthError("535 5.7.8 authentication failed", code=535)
        return await real(*args, **kwargs)

    monkeypatch.setattr(service, "deliver", second_fails)
    mid = mailqueue.enqueue(
        Message(sender="app@example.com", to=["a@example.net", "b@example.net"], text="x")
    )
    deliver(sqlite_stack, [mid])
    by = {r.address: r.status for r in mailqueue.get_status(mid).recipients}
    assert by == {"a@example.net": "sent", "b@example.net": "deferred"}

    # An auth failure pauses the relay (as for one transaction); the operator resumes it.
    assert [r["name"] for r in mailqueue.api.relays() if r["paused"]] == ["default"]
    assert mailqueue.api.resume_relay("default")
    monkeypatch.setattr(service, "deliver", real)
    table = MessageRow.__table__
    with sqlite_stack.engine.begin() as conn:
        conn.execute(sa.update(table).values(next_attempt_at=table.c.created_at))
    deliver(sqlite_stack, [mid])
    assert {r.address: r.status for r in mailqueue.get_status(mid).recipients} == {
        "a@example.net": "sent",
        "b@example.net": "sent",
    }
    assert len(smtp_server.received_for("a@example.net")) == 1
    assert len(smtp_server.received_for("b@example.net")) == 1
