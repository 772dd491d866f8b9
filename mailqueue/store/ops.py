"""Operator queries beyond ``admin``: search, time series, queue depth, bulk actions.

Everything here is built to stay fast on a table of millions of messages:
listings page by keyset over ``(created_at, id)`` and each filter has an
index that starts with its column and ends with ``created_at`` (migration
0003); the time series and the queue depth read narrow index ranges.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import cast as _typing_cast

from sqlalchemy import (
    BigInteger,
    Engine,
    Integer,
    Table,
    cast,
    delete,
    func,
    literal_column,
    select,
    update,
)

from .admin import _MESSAGE_COLUMNS, MessageInfo, _info, parse_id
from .models import TERMINAL_MESSAGE, MessageRow, MessageStatus, RecipientRow, RecipientStatus
from .models import utcnow as _utcnow
from .record import rederive_statuses

__all__ = [
    "Filters",
    "search",
    "tag_expression",
    "series",
    "queue_depth",
    "failed_since",
    "cancel_relay",
    "purge",
    "parse_duration",
    "message_meta",
    "make_paused_due",
    "ids_by_metadata",
    "mark_undispatched",
    "id_by_key",
    "ping",
]

M = _typing_cast(Table, MessageRow.__table__)
R = _typing_cast(Table, RecipientRow.__table__)

TAG_KEY = "tag"
"""The metadata key the list filters on (``enqueue(..., metadata={"tag": "welcome"})``)."""


def tag_expression(dialect: str) -> Any:
    """The metadata ``tag`` exactly as the tag index of migration 0003 is built on it."""
    if dialect == "postgresql":
        return literal_column("(mq_message.meta ->> 'tag')")
    if dialect == "sqlite":
        return func.json_extract(M.c.meta, literal_column("'$.tag'"))
    return M.c.meta[TAG_KEY].as_string()


@dataclass(frozen=True)
class Filters:
    """What the list can be narrowed by; every field is optional."""

    status: str | None = None
    relay: str | None = None
    sender: str | None = None
    recipient: str | None = None
    tag: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def as_query(self) -> dict[str, str]:
        out = {}
        for key, value in self.__dict__.items():
            if value:
                out[key] = value.isoformat() if isinstance(value, dt.datetime) else str(value)
        return out


def search_statement(
    engine: Engine, filters: Filters, *, limit: int = 50, anchor: Any = None
) -> Any:
    """The SELECT behind ``search`` (``anchor``: the ``(created_at, id)`` to page after)."""
    stmt = select(*_MESSAGE_COLUMNS).order_by(M.c.created_at.desc(), M.c.id.desc()).limit(limit)
    if filters.status:
        stmt = stmt.where(M.c.status == filters.status)
    if filters.relay:
        stmt = stmt.where(M.c.relay == filters.relay)
    if filters.sender:
        stmt = stmt.where(M.c.mail_from == filters.sender.strip())
    if filters.tag:
        stmt = stmt.where(tag_expression(engine.dialect.name) == filters.tag)
    if filters.recipient:
        stmt = stmt.where(
            M.c.id.in_(select(R.c.message_id).where(R.c.address == filters.recipient.strip()))
        )
    if filters.since:
        stmt = stmt.where(M.c.created_at >= filters.since)
    if filters.until:
        stmt = stmt.where(M.c.created_at < filters.until)
    if anchor is not None:
        stmt = stmt.where(
            (M.c.created_at < anchor.created_at)
            | ((M.c.created_at == anchor.created_at) & (M.c.id < anchor.id))
        )
    return stmt


def search(
    engine: Engine, filters: Filters, *, limit: int = 50, before: str | None = None
) -> list[MessageInfo]:
    """Newest first, narrowed by ``filters``; ``before`` (an id) pages by keyset."""
    with engine.connect() as conn:
        anchor = None
        if before:
            anchor = conn.execute(
                select(M.c.created_at, M.c.id).where(M.c.id == parse_id(before))
            ).one_or_none()
        stmt = search_statement(engine, filters, limit=limit, anchor=anchor)
        return [_info(row) for row in conn.execute(stmt)]


def series(
    engine: Engine, *, window_s: int = 86400, bucket_s: int = 3600, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Recipients accepted and failed per time bucket over the last ``window_s``.

    Returns ``{"bucket_s", "start", "buckets": [{"t", "sent", "failed", "failure_rate"}]}``
    with every bucket present (zeros included), oldest first.
    """
    now = now or _utcnow()
    end = int(now.timestamp()) // bucket_s + 1
    start = end - max(1, window_s // bucket_s)
    since = dt.datetime.fromtimestamp(start * bucket_s, dt.UTC)
    counts: dict[str, dict[int, int]] = {"sent": {}, "failed": {}}
    with engine.connect() as conn:
        for name, column, where in (
            ("sent", R.c.sent_at, R.c.sent_at >= since),
            (
                "failed",
                R.c.updated_at,
                (R.c.status == RecipientStatus.FAILED) & (R.c.updated_at >= since),
            ),
        ):
            if engine.dialect.name == "sqlite":
                epoch = cast(func.strftime("%s", column), Integer)
            else:
                epoch = cast(func.floor(func.extract("epoch", column)), BigInteger)
            key = epoch // bucket_s  # integer division: one row per bucket
            rows = conn.execute(select(key.label("b"), func.count()).where(where).group_by("b"))
            for b, n in rows:
                counts[name][int(b)] = counts[name].get(int(b), 0) + int(n)
    buckets = []
    for b in range(start, end):
        sent, failed = counts["sent"].get(b, 0), counts["failed"].get(b, 0)
        total = sent + failed
        buckets.append(
            {
                "t": dt.datetime.fromtimestamp(b * bucket_s, dt.UTC).isoformat(),
                "sent": sent,
                "failed": failed,
                "failure_rate": round(failed / total, 4) if total else 0.0,
            }
        )
    return {"bucket_s": bucket_s, "start": since.isoformat(), "buckets": buckets}


@dataclass(frozen=True)
class RelayDepth:
    relay: str
    waiting: int
    """Messages queued or deferred (not yet terminal, not being sent)."""
    due: int
    """Of those, how many are due now."""
    oldest_due_age_s: float
    """How long the longest-waiting due message has been due (0 when none is)."""


def queue_depth(engine: Engine, *, now: dt.datetime | None = None) -> list[RelayDepth]:
    """Per relay: messages waiting, those due, and the age of the oldest due one."""
    now = now or _utcnow()
    waiting = (MessageStatus.QUEUED, MessageStatus.DEFERRED)
    with engine.connect() as conn:
        totals: dict[str, int] = dict(
            conn.execute(
                select(M.c.relay, func.count()).where(M.c.status.in_(waiting)).group_by(M.c.relay)
            ).all()
        )
        due_rows = conn.execute(
            select(M.c.relay, func.count(), func.min(M.c.next_attempt_at))
            .where(M.c.status.in_(waiting), M.c.next_attempt_at <= now)
            .group_by(M.c.relay)
        ).all()
    due = {relay: (int(n), oldest) for relay, n, oldest in due_rows}
    out = []
    for relay in sorted(set(totals) | set(due)):
        n_due, oldest = due.get(relay, (0, None))
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.UTC)
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        out.append(RelayDepth(relay, int(totals.get(relay, 0)), n_due, age))
    return out


def failed_since(engine: Engine, since: dt.datetime | None) -> list[uuid.UUID]:
    """Ids of messages with a failed or deferred recipient updated at or after ``since``."""
    stmt = (
        select(R.c.message_id)
        .where(R.c.status.in_((RecipientStatus.FAILED, RecipientStatus.DEFERRED)))
        .distinct()
    )
    if since is not None:
        stmt = stmt.where(R.c.updated_at >= since)
    with engine.connect() as conn:
        return list(conn.execute(stmt).scalars())


def cancel_relay(engine: Engine, relay: str, *, chunk: int = 500) -> int:
    """Cancel the unsent recipients of every waiting message on ``relay``; returns messages.

    Messages a worker is sending right now are left alone (as ``admin.cancel``
    would leave their status): cancel again once they settle.
    """
    now = _utcnow()
    waiting = (MessageStatus.QUEUED, MessageStatus.DEFERRED)
    with engine.connect() as conn:
        ids = list(
            conn.execute(
                select(M.c.id).where(M.c.relay == relay, M.c.status.in_(waiting))
            ).scalars()
        )
    done = 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        with engine.begin() as conn:
            # re-check inside the transaction: a worker may have claimed some meanwhile
            part = list(
                conn.execute(select(M.c.id).where(M.c.id.in_(part), M.c.status.in_(waiting)))
                .scalars()
                .all()
            )
            if not part:
                continue
            conn.execute(
                update(R)
                .where(R.c.message_id.in_(part), R.c.status.in_(RecipientStatus.OPEN))
                .values(status=RecipientStatus.CANCELLED, updated_at=now)
            )
            rederive_statuses(conn, part, updated_at=now, dispatched_at=None)
            done += len(part)
    return done


def purge(engine: Engine, older_than: dt.datetime, *, chunk: int = 1000) -> int:
    """Delete terminal messages (and their recipients) last updated before ``older_than``."""
    total = 0
    while True:
        with engine.begin() as conn:
            ids: Sequence[uuid.UUID] = (
                conn.execute(
                    select(M.c.id)
                    .where(M.c.status.in_(TERMINAL_MESSAGE), M.c.updated_at < older_than)
                    .limit(chunk)
                )
                .scalars()
                .all()
            )
            if not ids:
                return total
            conn.execute(delete(R).where(R.c.message_id.in_(ids)))
            conn.execute(delete(M).where(M.c.id.in_(ids)))
            total += len(ids)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``1h``, ``30d``, ``2w`` (or plain seconds) as a timedelta."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else "s"
    number = value[:-1] if value[-1:] in _UNITS else value
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 1h, 30d") from None
    if amount < 0:
        raise ValueError(f"{text!r} is negative")
    return dt.timedelta(seconds=amount * _UNITS[unit])


def message_meta(engine: Engine, message_id: str) -> tuple[dict[str, Any] | None, bytes]:
    """A message's metadata and the header block of its stored content."""
    from ..errors import NotFoundError

    with engine.connect() as conn:
        row = conn.execute(
            select(M.c.meta, func.substr(M.c.content, 1, 65536).label("content")).where(
                M.c.id == parse_id(message_id)
            )
        ).one_or_none()
    if row is None:
        raise NotFoundError(message_id)
    content = bytes(row.content)
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    return row.meta, content[: end if end >= 0 else len(content)]


def make_paused_due(engine: Engine, relay: str, errors: Sequence[str]) -> None:
    """Make ``relay``'s messages deferred by one of ``errors`` due now (its pause was lifted)."""
    with engine.begin() as conn:
        conn.execute(
            update(M)
            .where(
                M.c.relay == relay,
                M.c.status == MessageStatus.DEFERRED,
                M.c.last_error.in_(tuple(errors)),
            )
            .values(next_attempt_at=_utcnow(), dispatched_at=None)
        )


def ids_by_metadata(engine: Engine, match: dict[str, str], *, limit: int) -> list[uuid.UUID]:
    """Ids of messages whose ``metadata`` has every ``match`` key with that string, newest first."""
    query = select(M.c.id).order_by(M.c.id.desc()).limit(limit)
    for key, value in match.items():
        query = query.where(M.c.meta[key].as_string() == str(value))
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def mark_undispatched(conn: Any, ids: Sequence[uuid.UUID]) -> None:
    """In the caller's transaction: these rows still need the broker (the scheduler sends them)."""
    conn.execute(update(M).where(M.c.id.in_(ids)).values(dispatched_at=None))


def id_by_key(conn: Any, key: str) -> uuid.UUID | None:
    """The id of the message queued with idempotency ``key``, read in the caller's transaction."""
    return conn.execute(select(M.c.id).where(M.c.idempotency_key == key)).scalar()


def ping(engine: Engine) -> None:
    """One round trip to the database; raises what the driver raises."""
    from sqlalchemy import text

    with engine.connect() as conn:
        conn.execute(text("select 1"))
