"""The bounded SMTP pool against the real dev server: bound, reuse, expiry, broken links."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest

import mailqueue
from mailqueue import Message
from mailqueue.config import RelayConfig
from mailqueue.smtp.delivery import deliver
from mailqueue.smtp.pool import Pool
from mailqueue.worker.service import Deliverer

DATA = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: t\r\n\r\nhello\r\n"


def relay_for(server, **options) -> RelayConfig:
    return RelayConfig(
        url=server.url, connect_timeout_s=5, command_timeout_s=5, data_timeout_s=5, **options
    )


def send_many(pool: Pool, count: int, concurrency: int) -> list:
    async def go():
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                return await deliver(pool, "a@example.com", [f"r{i}@example.com"], DATA)

        try:
            return await asyncio.gather(*(one(i) for i in range(count)))
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_pool_of_two_never_opens_more_than_two_and_reuses_them(sqlite_stack, smtp_server):
    """The issue's bar: pool size 2, 50 messages, all sent at once by the worker code."""
    sqlite_stack.reconfigure(relay_pool_size=2)
    ids = mailqueue.enqueue_many(
        Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
        for i in range(50)
    )

    async def go():
        deliverer = Deliverer(sqlite_stack.settings, sqlite_stack.store)
        try:
            await deliverer.deliver_batch([uuid.UUID(i) for i in ids])
            return deliverer.pool_for("default").stats
        finally:
            await deliverer.aclose()

    stats = asyncio.run(go())
    assert len(smtp_server.messages) == 50
    assert smtp_server.connections_peak <= 2
    assert smtp_server.connections_total <= 2  # reused for all 50, never reopened
    assert stats.peak_open <= 2
    assert stats.waits > 0  # 50 concurrent deliveries really queued for the 2 connections
    assert all(mailqueue.get_status(i).status == "sent" for i in ids)


def test_connections_close_after_their_message_quota(smtp_server):
    pool = Pool(relay_for(smtp_server, pool_size=1, max_messages_per_connection=5))
    results = send_many(pool, 12, concurrency=1)
    assert all(r.accepted for r in results)
    assert smtp_server.connections_total == 3  # 5 + 5 + 2
    assert pool.stats.opened == 3


def test_idle_connections_expire(smtp_server):
    async def go():
        pool = Pool(relay_for(smtp_server, pool_size=1, idle_timeout_s=0.2))
        await deliver(pool, "a@example.com", ["x@example.com"], DATA)
        await asyncio.sleep(0.4)  # the idle timer closes it
        closed_by_timer = pool.open_count == 0
        await deliver(pool, "a@example.com", ["y@example.com"], DATA)
        await pool.aclose()
        return closed_by_timer

    assert asyncio.run(go()) is True
    assert smtp_server.connections_total == 2
    assert len(smtp_server.messages) == 2


def test_a_connection_the_server_dropped_is_replaced_not_reused(smtp_server):
    """A 421 closes the session; the next message goes over a fresh connection."""
    smtp_server.faults.close_421_after = 2

    async def go():
        pool = Pool(relay_for(smtp_server, pool_size=1, check_after_idle_s=3600))
        results = [
            await deliver(pool, "a@example.com", [f"r{i}@example.com"], DATA) for i in range(5)
        ]
        await pool.aclose()
        return results, pool.stats

    results, stats = asyncio.run(go())
    assert all(r.accepted for r in results), [r.error for r in results]
    assert len(smtp_server.messages) == 5
    assert stats.opened >= 3


def test_drop_after_data_defers_without_retrying_inline(smtp_server):
    """After DATA the relay may have the message: defer, never resend at once."""
    smtp_server.faults.drop_in_data = 1

    async def go():
        pool = Pool(relay_for(smtp_server, pool_size=1))
        first = await deliver(pool, "a@example.com", ["x@example.com"], DATA)
        second = await deliver(pool, "a@example.com", ["y@example.com"], DATA)
        await pool.aclose()
        return first, second

    first, second = asyncio.run(go())
    assert [r.status for r in first.recipients] == ["deferred"]
    assert first.error is not None and type(first.error).__name__ == "ConnectError"
    assert "may have been delivered" in str(first.error)
    assert second.accepted == ["y@example.com"]  # the broken connection was not reused
    assert smtp_server.connections_total == 2


def test_rcpt_failed_report_lists_each_refusal(smtp_server):
    smtp_server.reject = ["bad@*"]
    smtp_server.defer = ["slow@*"]

    async def go():
        pool = Pool(relay_for(smtp_server))
        result = await deliver(
            pool, "a@example.com", ["ok@example.com", "bad@example.com", "slow@example.com"], DATA
        )
        await pool.aclose()
        return result

    result = asyncio.run(go())
    assert result.accepted == ["ok@example.com"]
    assert {(r.address, r.status, r.code) for r in result.rcpt_failed} == {
        ("bad@example.com", "failed", 550),
        ("slow@example.com", "deferred", 450),
    }


@pytest.mark.parametrize("size", [0])
def test_pool_size_must_be_positive(size):
    with pytest.raises(ValueError):
        Pool(replace(RelayConfig(), pool_size=size))
