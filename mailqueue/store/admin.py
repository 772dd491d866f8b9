"""What operators read and steer: status, listings, counts, retry, cancel."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, func, select, update

from ..priority import priority_word
from .models import ATTEMPTS, MESSAGES, RECIPIENTS, MessageStatus, RecipientStatus, utcnow
from .record import rederive_statuses

__all__ = [
    "MessageInfo",
    "RecipientInfo",
    "get_status",
    "list_messages",
    "stats",
    "retry",
    "cancel",
    "by_priority",
]

M = MESSAGES
R = RECIPIENTS
A = ATTEMPTS


@dataclass(frozen=True)
class RecipientInfo:
    address: str
    kind: str
    status: str
    attempts: int
    smtp_code: int | None
    enhanced_code: str | None
    reply: str | None
    error: str | None
    updated_at: dt.datetime
    sent_at: dt.datetime | None


@dataclass(frozen=True)
class MessageInfo:
    id: str
    status: str
    mail_from: str
    subject: str
    relay: str
    size: int
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    next_attempt_at: dt.datetime | None
    expires_at: dt.datetime
    last_error: str | None
    last_reply: str | None
    recipients: tuple[RecipientInfo, ...] = ()
    priority: str = "normal"
    """Its lane: ``high``, ``normal`` or ``bulk`` (``mailqueue.priority``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 strings."""

        def conv(value: Any) -> Any:
            if isinstance(value, dt.datetime):
                return value.isoformat()
            if isinstance(value, list | tuple):
                return [conv(v) for v in value]
            if isinstance(value, dict):
                return {k: conv(v) for k, v in value.items()}
            return value

        return conv(asdict(self))


_MESSAGE_COLUMNS = (
    M.c.id,
    M.c.status,
    M.c.mail_from,
    M.c.subject,
    M.c.relay,
    M.c.size,
    M.c.attempts,
    M.c.created_at,
    M.c.updated_at,
    M.c.next_attempt_at,
    M.c.expires_at,
    M.c.last_error,
    M.c.last_reply,
    M.c.priority,
)


def _info(row: Any, recipients: Sequence[RecipientInfo] = ()) -> MessageInfo:
    waiting = row.status in (MessageStatus.QUEUED, MessageStatus.DEFERRED)
    return MessageInfo(
        id=str(row.id),
        status=row.status,
        mail_from=row.mail_from,
        subject=row.subject,
        relay=row.relay,
        size=row.size,
        attempts=row.attempts,
        created_at=row.created_at,
        updated_at=row.updated_at,
        next_attempt_at=row.next_attempt_at if waiting else None,
        expires_at=row.expires_at,
        last_error=row.last_error,
        last_reply=row.last_reply,
        recipients=tuple(recipients),
        priority=priority_word(row.priority),
    )


def by_priority(engine: Engine, ids: Sequence[uuid.UUID]) -> list[tuple[int, list[uuid.UUID]]]:
    """``ids`` grouped by their rows' priority lane, highest lane first (for dispatch)."""
    lanes: dict[int, list[uuid.UUID]] = {}
    if not ids:
        return []
    with engine.connect() as conn:
        for start in range(0, len(ids), 1000):
            chunk = list(ids[start : start + 1000])
            for mid, priority in conn.execute(
                select(M.c.id, M.c.priority).where(M.c.id.in_(chunk))
            ):
                lanes.setdefault(priority, []).append(mid)
    return sorted(lanes.items())


def parse_id(message_id: str | uuid.UUID) -> uuid.UUID:
    from ..errors import NotFoundError

    if isinstance(message_id, uuid.UUID):
        return message_id
    try:
        return uuid.UUID(str(message_id))
    except ValueError:
        raise NotFoundError(str(message_id)) from None


def get_status(engine: Engine, message_id: str | uuid.UUID) -> MessageInfo:
    """One message and each recipient's latest outcome."""
    from ..errors import NotFoundError

    mid = parse_id(message_id)
    with engine.connect() as conn:
        row = conn.execute(select(*_MESSAGE_COLUMNS).where(M.c.id == mid)).one_or_none()
        if row is None:
            raise NotFoundError(str(message_id))
        recipients = [
            RecipientInfo(
                address=r.address,
                kind=r.kind,
                status=r.status,
                attempts=r.attempts,
                smtp_code=r.smtp_code,
                enhanced_code=r.enhanced_code,
                reply=r.reply,
                error=r.error,
                updated_at=r.updated_at,
                sent_at=r.sent_at,
            )
            for r in conn.execute(select(R).where(R.c.message_id == mid).order_by(R.c.id))
        ]
    return _info(row, recipients)


def list_messages(
    engine: Engine,
    *,
    status: str | None = None,
    limit: int = 50,
    before: str | None = None,
) -> list[MessageInfo]:
    """Newest first; ``before`` (an id from the previous page) pages by keyset."""
    stmt = select(*_MESSAGE_COLUMNS).order_by(M.c.created_at.desc(), M.c.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(M.c.status == status)
    with engine.connect() as conn:
        if before:
            anchor = conn.execute(
                select(M.c.created_at, M.c.id).where(M.c.id == parse_id(before))
            ).one_or_none()
            if anchor is not None:
                stmt = stmt.where(
                    (M.c.created_at < anchor.created_at)
                    | ((M.c.created_at == anchor.created_at) & (M.c.id < anchor.id))
                )
        return [_info(row) for row in conn.execute(stmt)]


def stats(engine: Engine) -> dict[str, dict[str, int]]:
    """Counts per message status and per recipient status (every word present)."""
    with engine.connect() as conn:
        by_message = select(M.c.status, func.count()).group_by(M.c.status)
        by_recipient = select(R.c.status, func.count()).group_by(R.c.status)
        messages: dict[str, int] = {s: n for s, n in conn.execute(by_message)}
        recipients: dict[str, int] = {s: n for s, n in conn.execute(by_recipient)}
    return {
        "messages": {s: int(messages.get(s, 0)) for s in MessageStatus.ALL},
        "recipients": {s: int(recipients.get(s, 0)) for s in RecipientStatus.ALL},
    }


def retry(
    engine: Engine,
    message_ids: Sequence[uuid.UUID] | None = None,
    *,
    lifetime_s: float,
) -> list[uuid.UUID]:
    """Requeue failed and deferred recipients (never sent ones); returns message ids.

    ``message_ids=None`` means every message that has a failed recipient.
    Messages a worker is sending right now are left alone. The message gets
    a fresh lifetime, so an expired message can be tried again.
    """
    now = utcnow()
    retryable = (RecipientStatus.FAILED, RecipientStatus.DEFERRED)
    with engine.begin() as conn:
        candidates = select(R.c.message_id).where(R.c.status.in_(retryable)).distinct()
        if message_ids is not None:
            candidates = candidates.where(R.c.message_id.in_(list(message_ids)))
        chosen = list(
            conn.execute(
                select(M.c.id).where(
                    M.c.id.in_(candidates.scalar_subquery()), M.c.status != MessageStatus.SENDING
                )
            ).scalars()
        )
        if not chosen:
            return []
        conn.execute(
            update(R)
            .where(R.c.message_id.in_(chosen), R.c.status.in_(retryable))
            .values(status=RecipientStatus.PENDING, updated_at=now)
        )
        conn.execute(
            update(M)
            .where(M.c.id.in_(chosen))
            .values(
                status=MessageStatus.QUEUED,
                next_attempt_at=now,
                dispatched_at=None,
                updated_at=now,
            )
        )
        conn.execute(
            update(M)
            .where(M.c.id.in_(chosen), M.c.expires_at < now + dt.timedelta(seconds=lifetime_s))
            .values(expires_at=now + dt.timedelta(seconds=lifetime_s))
        )
    return chosen


def cancel(engine: Engine, message_id: str | uuid.UUID) -> MessageInfo:
    """Cancel the recipients not yet sent; a message being sent right now may still go out."""
    mid = parse_id(message_id)
    now = utcnow()
    with engine.begin() as conn:
        exists = conn.execute(select(M.c.status).where(M.c.id == mid)).scalar()
        if exists is None:
            from ..errors import NotFoundError

            raise NotFoundError(str(message_id))
        conn.execute(
            update(R)
            .where(R.c.message_id == mid, R.c.status.in_(RecipientStatus.OPEN))
            .values(status=RecipientStatus.CANCELLED, updated_at=now)
        )
        if exists != MessageStatus.SENDING:
            rederive_statuses(conn, [mid], updated_at=now, dispatched_at=None)
    return get_status(engine, mid)


@dataclass(frozen=True)
class AttemptInfo:
    """One recipient's result in one attempt (``mq_attempt``)."""

    address: str
    status: str
    smtp_code: int | None
    enhanced_code: str | None
    reply: str | None
    error: str | None
    worker: str | None
    at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


def get_attempts(engine: Engine, message_id: str | uuid.UUID) -> list[AttemptInfo]:
    """Every attempt's result for every recipient of a message, oldest first."""
    mid = parse_id(str(message_id))
    query = (
        select(
            R.c.address,
            A.c.status,
            A.c.smtp_code,
            A.c.enhanced_code,
            A.c.reply,
            A.c.error,
            A.c.worker,
            A.c.at,
        )
        .join(R, R.c.id == A.c.recipient_id)
        .where(A.c.message_id == mid)
        .order_by(A.c.id)
    )
    with engine.connect() as conn:
        return [AttemptInfo(*row) for row in conn.execute(query)]
