"""Shared by the Django and Flask integration tests: deliver in-process, read what arrived."""

from __future__ import annotations

import asyncio
import email
import email.policy
import uuid
from email.message import EmailMessage

import sqlalchemy as sa

from mailqueue.store.admin import MessageInfo
from mailqueue.worker.service import BatchReport, Deliverer

terminal_calls: list[MessageInfo] = []


def record_terminal(info: MessageInfo) -> None:
    """A ``MAILQUEUE_ON_TERMINAL`` target for the tests."""
    terminal_calls.append(info)


def deliver(stack, ids) -> BatchReport:
    """Run one batch exactly as a Celery task does, with its own pools, then close them."""

    async def go() -> BatchReport:
        deliverer = Deliverer(stack.settings, stack.store)
        try:
            return await deliverer.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await deliverer.aclose()

    return asyncio.run(go())


def all_ids(stack) -> list[str]:
    with stack.engine.connect() as conn:
        return [str(i) for i in conn.execute(sa.text("SELECT id FROM mq_message")).scalars()]


def row_count(stack, table: str) -> int:
    with stack.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def parsed(envelope) -> EmailMessage:
    """A message the dev server received, parsed back by the standard library."""
    return email.message_from_bytes(envelope.data, policy=email.policy.default)
