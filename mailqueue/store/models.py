"""The two tables that are the queue's truth: messages and their recipients.

Their status words are the enums of ``mailqueue.statuses``, imported here for
the store's modules.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import false

from ..statuses import TERMINAL_MESSAGE, MessageStatus, RecipientStatus

__all__ = [
    "Base",
    "BounceRow",
    "MessageRow",
    "RecipientRow",
    "MessageStatus",
    "RecipientStatus",
    "TERMINAL_MESSAGE",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC in Python on every backend (SQLite keeps naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


BigId = BigInteger().with_variant(Integer(), "sqlite")


class MessageRow(Base):
    """One message: its bytes, envelope sender and scheduling state."""

    __tablename__ = "mq_message"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))
    relay: Mapped[str] = mapped_column(String(64), default="default")
    mail_from: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    smtputf8: Mapped[bool] = mapped_column(Boolean, default=False)
    eightbit: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    """When the message is next due; for ``sending`` rows, meaningless."""
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """Last time its id was handed to the broker; NULL when it needs a dispatch."""
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Which worker (host:pid) made the latest attempt."""
    list_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    """The mailing list it belongs to (RFC 2919 id, no angle brackets): a
    ``list:<id>`` suppression applies to it (migration 0006)."""
    priority: Mapped[int] = mapped_column(SmallInteger, default=1, server_default=text("1"))
    """The lane: 0 high, 1 normal, 2 bulk (``mailqueue.priority``); lower goes first."""
    unsubscribe: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Each recipient's copy gets a one-click List-Unsubscribe header (migration 0008,
    ``unsubscribe.py``); the worker sends it one transaction per recipient."""

    __table_args__ = (
        # serves the scheduler's "what is due" and the per-status counts
        Index("ix_mq_message_status_due", "status", "next_attempt_at"),
        Index("ix_mq_message_created_at", "created_at"),
    )


class RecipientRow(Base):
    """One recipient of one message and everything its last attempt said."""

    __tablename__ = "mq_recipient"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("mq_message.id", ondelete="CASCADE")
    )
    address: Mapped[str] = mapped_column(String(320))
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    smtp_code: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    enhanced_code: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("message_id", "address"),
        # status queries use ix_mq_recipient_status_updated (migration 0003, 0005)
        Index("ix_mq_recipient_address", "address"),
    )


class RelayRow(Base):
    """A relay that refused our credentials or TLS: paused until ``paused_until``.

    Auth and TLS failures are the relay's (or our configuration's), not the
    message's: they pause the relay with backoff instead of spending every
    message's attempts, and show here for ``mailqueue relays``/``stats``.
    """

    __tablename__ = "mq_relay"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    paused_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


# The tables, typed as Core tables for the statements in queue.py, admin.py, relays.py.
MESSAGES = cast(Table, MessageRow.__table__)
RECIPIENTS = cast(Table, RecipientRow.__table__)
RELAYS = cast(Table, RelayRow.__table__)


class AttemptRow(Base):
    """One recipient's result in one attempt: the history behind ``RecipientRow``'s last word."""

    __tablename__ = "mq_attempt"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("mq_message.id", ondelete="CASCADE")
    )
    recipient_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("mq_recipient.id", ondelete="CASCADE")
    )
    status: Mapped[str] = mapped_column(String(16))
    smtp_code: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    enhanced_code: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_mq_attempt_message", "message_id", "id"),)


ATTEMPTS = cast(Table, AttemptRow.__table__)


class BounceRow(Base):
    """One report that came back (a bounce or a complaint), matched or not.

    Every report is kept, whatever it turned out to be: ``kind`` ``unparsed``
    and ``recipient_id`` NULL ("unmatched") rows are shown with their
    ``reason``, never dropped. ``raw`` keeps its first bytes for a human to
    read; the VERP secret is never here (tokens are checked, not stored).
    """

    __tablename__ = "mq_bounce"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    source: Mapped[str] = mapped_column(String(16))
    """``smtp`` (``mailqueue bounces serve``), ``maildir``, ``mbox``."""
    envelope_to: Mapped[str | None] = mapped_column(String(320), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    address: Mapped[str | None] = mapped_column(String(320), nullable=True)
    """The recipient the report is about, as the report names it."""
    enhanced_code: Mapped[str | None] = mapped_column(String(16), nullable=True)
    diagnostic: Mapped[str | None] = mapped_column(Text, nullable=True)
    feedback_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    message_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("mq_message.id", ondelete="SET NULL"), nullable=True
    )
    recipient_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("mq_recipient.id", ondelete="SET NULL"), nullable=True
    )
    """The row it was applied to or recorded against; NULL: unmatched."""
    effect: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """The status it gave the recipient (``bounced``, ``complained``), or NULL: none."""
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why it was not read, not matched or not applied."""
    results: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    """Every recipient result the report holds."""
    raw_size: Mapped[int] = mapped_column(Integer)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    """The report's first ``RAW_KEPT`` bytes."""

    __table_args__ = (
        Index("ix_mq_bounce_received_at", "received_at"),
        Index("ix_mq_bounce_recipient_id", "recipient_id"),
    )


BOUNCES = cast(Table, BounceRow.__table__)


class SuppressionRow(Base):
    """An address that must not be sent to, everywhere or within one scope.

    ``address_key`` is what a recipient is compared with (``suppression.address_key``:
    the local part as written, the domain lower-cased and IDNA-ASCII); ``scope``
    is ``''`` (everywhere), ``domain:<sender domain>`` or ``list:<list id>``.
    The unique (key, scope) index serves the claim's one lookup per batch.
    """

    __tablename__ = "mq_suppression"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    address: Mapped[str] = mapped_column(String(320))
    address_key: Mapped[str] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(262), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("address_key", "scope", name="uq_mq_suppression_key_scope"),
        Index("ix_mq_suppression_created", "created_at", "id"),
    )


SUPPRESSIONS = cast(Table, SuppressionRow.__table__)
