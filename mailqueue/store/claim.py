"""``claim`` and the lease: a worker takes due messages, keeps them, gives them back.

One statement for both backends: ``UPDATE … WHERE id IN (SELECT … FOR UPDATE
SKIP LOCKED) RETURNING …`` on PostgreSQL; SQLite serializes writers (its
``BEGIN IMMEDIATE``, see ``db``), so the same statement without the lock clause.
The lease is ``lease_owner`` and ``lease_until``: ``renew`` extends it,
``release`` gives the messages back untried, ``record`` (``record.py``) ends it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    null,
    select,
    update,
)

from ..statuses import ErrorWord
from .models import ATTEMPTS, MESSAGES, RECIPIENTS, MessageStatus, RecipientStatus, utcnow
from .schedule import due
from .suppression import address_key, describe, first_match, scopes_for, suppressed_in

__all__ = ["ClaimedMessage", "ClaimedRecipient", "ClaimStatements"]

INLINE_CONTENT_MAX = 1024 * 1024
"""Contents up to this size may come with the claim; bigger ones via ``load_content``."""
CLAIM_CONTENT_BUDGET = 32 * 1024 * 1024
"""Most content bytes one claim brings: the inline limit is this shared by the batch
(64 KB each for 500 ids), so a big batch of big messages cannot fill the worker."""
CONTENT_SLICE = 4 * 1024 * 1024

M = MESSAGES
R = RECIPIENTS


@dataclass(frozen=True)
class ClaimedRecipient:
    id: int
    address: str
    status: str


@dataclass(frozen=True)
class ClaimedMessage:
    """A message a worker now holds the lease on, with all its recipients."""

    id: uuid.UUID
    mail_from: str
    content: bytes | None
    """None for a message bigger than the claim's inline limit: ``Store.load_content`` it."""
    smtputf8: bool
    eightbit: bool
    relay: str
    attempts: int
    expires_at: dt.datetime
    recipients: tuple[ClaimedRecipient, ...]
    size: int = 0
    suppressed: int = 0
    """Recipients this claim found on the suppression list (now ``suppressed``)."""

    @property
    def open_recipients(self) -> list[ClaimedRecipient]:
        return [r for r in self.recipients if r.status in RecipientStatus.OPEN]


def _held_by(ids: Sequence[uuid.UUID], owner: str) -> Any:
    """The messages among ``ids`` that ``owner`` has claimed and is still sending."""
    return and_(
        M.c.id.in_(list(ids)), M.c.lease_owner == owner, M.c.status == MessageStatus.SENDING
    )


class ClaimStatements:
    """``Store.claim``, ``load_content``, ``renew`` and ``release`` (see ``queue.Store``)."""

    engine: Engine
    is_postgres: bool
    fold_local_case: bool

    def _among(self, column: Any, ids: Sequence[uuid.UUID]) -> Any:
        """``column IN ids``; on PostgreSQL as ``= ANY(array)``: one parameter instead of
        one per id, so the statement text (and its prepared plan) is the same for every
        batch size, and nothing is rendered per id."""
        if self.is_postgres:
            return column == any_(bindparam(None, list(ids), type_=ARRAY(Uuid())))
        return column.in_(list(ids))

    def claim(
        self, ids: Sequence[uuid.UUID], *, owner: str, lease_s: float
    ) -> list[ClaimedMessage]:
        """Take the due ones among ``ids`` for ``owner``; others are left alone.

        A message is due (``schedule.due``) when it is queued or deferred and its
        time has come, or when another worker's lease on it has expired. Messages already
        sent, or held by a live lease, are skipped: this is what makes a task
        delivered twice by the broker send once.

        In the same transaction, open recipients on the suppression list become
        ``suppressed`` (``_suppress``) and come back so, not open: the worker
        never sends them, and a message left with none open is recorded
        terminal by the worker's usual path, without a connection.
        """
        if not ids:
            return []
        now = utcnow()
        inline_max = min(INLINE_CONTENT_MAX, CLAIM_CONTENT_BUDGET // len(ids))
        pick = select(M.c.id).where(self._among(M.c.id, ids), due(now))
        if self.is_postgres:
            pick = pick.with_for_update(skip_locked=True)
        stmt = (
            update(M)
            .where(M.c.id.in_(pick.scalar_subquery()))
            .values(
                status=MessageStatus.SENDING,
                lease_owner=owner,
                lease_until=now + dt.timedelta(seconds=lease_s),
                attempts=M.c.attempts + 1,
                dispatched_at=None,
                updated_at=now,
            )
            .returning(
                M.c.id,
                M.c.mail_from,
                # Big contents are read later, in slices (``load_content``): a whole
                # 34 MB row through the driver's text protocol costs several copies.
                case((M.c.size <= inline_max, M.c.content), else_=null()).label("content"),
                M.c.size,
                M.c.smtputf8,
                M.c.eightbit,
                M.c.relay,
                M.c.attempts,
                M.c.expires_at,
                M.c.list_id,
            )
        )
        with self.engine.begin() as conn:
            rows = conn.execute(stmt).all()
            if not rows:
                return []
            by_message: dict[uuid.UUID, list[ClaimedRecipient]] = {row.id: [] for row in rows}
            for rid, mid, address, status in conn.execute(
                select(R.c.id, R.c.message_id, R.c.address, R.c.status)
                .where(self._among(R.c.message_id, list(by_message)))
                .order_by(R.c.id)
            ):
                by_message[mid].append(ClaimedRecipient(rid, address, status))
            newly = self._suppress(conn, rows, by_message, owner=owner, now=now)
        return [
            ClaimedMessage(
                id=row.id,
                mail_from=row.mail_from,
                content=row.content,
                size=row.size,
                smtputf8=row.smtputf8,
                eightbit=row.eightbit,
                relay=row.relay,
                attempts=row.attempts,
                expires_at=row.expires_at,
                recipients=tuple(by_message[row.id]),
                suppressed=newly.get(row.id, 0),
            )
            for row in rows
        ]

    def _suppress(
        self,
        conn: Connection,
        messages: Sequence[Any],
        by_message: dict[uuid.UUID, list[ClaimedRecipient]],
        *,
        owner: str,
        now: dt.datetime,
    ) -> dict[uuid.UUID, int]:
        """Mark the claimed batch's open recipients that the suppression list names
        ``suppressed`` (with a history row saying which entry), in ``by_message`` too.

        One indexed query for the whole batch; the recipients' keys are computed
        here, not stored, so an entry added at any time is seen at the next claim.
        Returns how many were suppressed per message.
        """
        fold = self.fold_local_case
        keyed = [
            (row, rcpt, address_key(rcpt.address, fold_local=fold))
            for row in messages
            for rcpt in by_message[row.id]
            if rcpt.status in RecipientStatus.OPEN
        ]
        found = suppressed_in(conn, (k for _, _, k in keyed), is_postgres=self.is_postgres)
        if not found:
            return {}
        hits: list[tuple[uuid.UUID, int, str]] = []
        scopes: dict[uuid.UUID, frozenset[str]] = {}
        for row, rcpt, key in keyed:
            entries = found.get(key)
            if not entries:
                continue
            if row.id not in scopes:
                scopes[row.id] = scopes_for(row.mail_from, row.list_id)
            match = first_match(entries, scopes[row.id])
            if match is not None:
                hits.append((row.id, rcpt.id, describe(match[1], match[0])))
        if not hits:
            return {}
        suppressed = RecipientStatus.SUPPRESSED
        conn.execute(
            update(R)
            .where(R.c.id == bindparam("rid"))
            .values(
                status=suppressed,
                error=ErrorWord.SUPPRESSED,
                reply=bindparam("why"),
                updated_at=now,
            ),
            [{"rid": rid, "why": why} for _, rid, why in hits],
        )
        worker = owner.rsplit(":", 1)[0]
        conn.execute(
            insert(ATTEMPTS),
            [
                {
                    "message_id": mid,
                    "recipient_id": rid,
                    "status": suppressed,
                    "reply": why,
                    "error": ErrorWord.SUPPRESSED,
                    "worker": worker,
                    "at": now,
                }
                for mid, rid, why in hits
            ],
        )
        done = {rid for _, rid, _ in hits}
        newly: dict[uuid.UUID, int] = {}
        for mid, _, _ in hits:
            newly[mid] = newly.get(mid, 0) + 1
        for mid in newly:
            by_message[mid] = [
                ClaimedRecipient(r.id, r.address, suppressed) if r.id in done else r
                for r in by_message[mid]
            ]
        return newly

    def load_content(self, message_id: uuid.UUID, size: int) -> bytearray:
        """A claimed message's content, read ``CONTENT_SLICE`` bytes at a time.

        The result is filled in place, so the peak is the content plus one slice,
        not the several whole copies a single fetch makes (hex text, result
        buffer, bytes object).
        """
        out = bytearray(size)  # allocated once: no growth by reallocation
        done = 0
        with self.engine.connect() as conn:
            while done < size:
                piece = conn.execute(
                    select(func.substr(M.c.content, done + 1, CONTENT_SLICE)).where(
                        M.c.id == message_id
                    )
                ).scalar_one()
                if not piece:
                    break
                out[done : done + len(piece)] = piece
                done += len(piece)
                del piece
        if done != size:
            raise RuntimeError(f"message {message_id}: read {done} of {size} bytes")
        return out

    def renew(self, ids: Sequence[uuid.UUID], *, owner: str, lease_s: float) -> int:
        """Extend ``owner``'s leases while it is still working on them."""
        if not ids:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(
                update(M)
                .where(_held_by(ids, owner))
                .values(lease_until=utcnow() + dt.timedelta(seconds=lease_s))
            ).rowcount

    def release(
        self,
        ids: Sequence[uuid.UUID],
        *,
        owner: str,
        due_at: dt.datetime | None = None,
        error: str | None = None,
        reply: str | None = None,
    ) -> int:
        """Give back claimed messages untried, without counting an attempt.

        At shutdown they are due again at once; when their relay is paused
        (``due_at``), they wait for it, deferred, with the relay's error shown.
        """
        if not ids:
            return 0
        now = utcnow()
        values: dict[str, Any] = dict(
            status=MessageStatus.QUEUED if due_at is None else MessageStatus.DEFERRED,
            attempts=M.c.attempts - 1,
            lease_owner=None,
            lease_until=None,
            next_attempt_at=due_at or now,
            dispatched_at=None,
            updated_at=now,
        )
        if error is not None:
            values.update(last_error=error, last_reply=reply)
        with self.engine.begin() as conn:
            return conn.execute(update(M).where(_held_by(ids, owner)).values(**values)).rowcount
