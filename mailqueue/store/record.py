"""``record``: each attempt's per-recipient outcomes, written in one transaction.

The same rules on both backends, in the same four statements whatever the
batch: the recipients' UPDATE, the history's INSERT, the statuses read back,
the messages' UPDATE. PostgreSQL reads each statement's rows from ``unnest`` of
parameter arrays, SQLite from one JSON text (``json_each``); the statements
are built from one text each (``_record_recipients``, ``_record_history``,
``_record_messages``), so the rules live once.

SQLite: ``UPDATE … FROM`` needs 3.33 and the JSON functions; every SQLite
mailqueue runs on has both, since ``claim``'s ``UPDATE … RETURNING`` needs 3.35
and the schema's tag index (migration 0003) is on ``json_extract``.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, text, update

from .models import (
    ATTEMPTS,
    MESSAGES,
    RECIPIENTS,
    MessageStatus,
    RecipientStatus,
    UTCDateTime,
    utcnow,
)

__all__ = [
    "RecipientOutcome",
    "MessageOutcome",
    "RecordStatements",
    "derive_status",
    "rederive_statuses",
]

M = MESSAGES
R = RECIPIENTS


@dataclass(frozen=True)
class RecipientOutcome:
    recipient_id: int
    status: str
    code: int | None
    enhanced_code: str | None
    reply: str | None
    error: str | None


@dataclass(frozen=True)
class MessageOutcome:
    """The result of one attempt on one claimed message."""

    message_id: uuid.UUID
    next_attempt_at: dt.datetime | None
    """When to try the still-open recipients again (None: none are open)."""
    recipients: Sequence[RecipientOutcome] = field(default_factory=tuple)
    last_error: str | None = None
    last_reply: str | None = None
    final: bool = True
    """False: only these recipients' results, written as soon as they are known (a
    message sent one transaction per recipient); the message row and its lease are
    left alone, and the attempt's final outcome follows without these recipients."""


def derive_status(statuses: Iterable[str]) -> str:
    """A message's status from its recipients' (see ``models``)."""
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    if counts.get(RecipientStatus.DEFERRED):
        return MessageStatus.DEFERRED
    if counts.get(RecipientStatus.PENDING):
        return MessageStatus.QUEUED
    total = sum(counts.values())
    # A complaint came from a mailbox the mail reached: delivered. A bounce did not
    # reach one: it counts as failed (below), so a message that bounced is not "sent".
    sent = counts.get(RecipientStatus.SENT, 0) + counts.get(RecipientStatus.COMPLAINED, 0)
    if total and sent == total:
        return MessageStatus.SENT
    if sent:
        return MessageStatus.PARTIAL
    if total and counts.get(RecipientStatus.CANCELLED, 0) == total:
        return MessageStatus.CANCELLED
    if counts.get(RecipientStatus.SUPPRESSED) and not counts.get(RecipientStatus.FAILED):
        # Withheld by the list, not refused: "failed" would page someone for nothing.
        return MessageStatus.SUPPRESSED
    return MessageStatus.FAILED


def rederive_statuses(conn: Connection, message_ids: Iterable[uuid.UUID], **values: Any) -> None:
    """Set each message's status from its recipients' as they are now, in ``conn``'s
    transaction, with ``values`` (``updated_at``, ...), after their recipients changed
    outside a delivery (a cancel, a bounce)."""
    ids = list(message_ids)
    if not ids:
        return
    statuses: dict[uuid.UUID, list[str]] = {}
    for mid, status in conn.execute(
        select(R.c.message_id, R.c.status).where(R.c.message_id.in_(ids))
    ):
        statuses.setdefault(mid, []).append(status)
    for mid, words in statuses.items():
        conn.execute(update(M).where(M.c.id == mid).values(status=derive_status(words), **values))


# ``record``'s statements, PostgreSQL's and SQLite's (``_record_pg``,
# ``_record_sqlite``). ``sent`` always wins; anything else only
# overwrites a recipient that is still open. The rows are found by joining on
# ``v.id`` alone: on PostgreSQL an extra ``id = ANY(:ids)`` made the planner
# expect one row and re-run ``unnest`` for each (a nested loop, quadratic in
# the batch: ~90 µs per message at 70 a commit).
def _record_recipients(source: str) -> Any:
    """The recipients' UPDATE for ``record``, reading its rows ``v(id, status, code,
    enhanced, reply, error)`` from ``source``: the status rules live here only."""
    sent, open_ = RecipientStatus.SENT, ", ".join(f"'{s}'" for s in RecipientStatus.OPEN)
    return text(
        f"""
        UPDATE {R.name} AS r SET
            status = v.status, smtp_code = v.code, enhanced_code = v.enhanced,
            reply = v.reply, error = v.error, attempts = r.attempts + 1, updated_at = :now,
            sent_at = CASE WHEN v.status = '{sent}' THEN :now ELSE r.sent_at END
        FROM {source}
        WHERE r.id = v.id AND (
            (v.status = '{sent}' AND r.status <> '{sent}')
            OR (v.status <> '{sent}' AND r.status IN ({open_}))
        )
        """
    ).bindparams(bindparam("now", type_=UTCDateTime()))


def _record_messages(source: str) -> Any:
    """The messages' UPDATE for ``record``, rows ``v(id, status, next, lerr, lreply)``
    from ``source``; only the lease's owner may write its message."""
    return text(
        f"""
        UPDATE {M.name} AS m SET
            status = v.status, next_attempt_at = v.next, last_error = v.lerr,
            last_reply = v.lreply, lease_owner = NULL, lease_until = NULL,
            dispatched_at = NULL, worker = :worker, updated_at = :now
        FROM {source}
        WHERE m.id = v.id AND m.lease_owner = :owner
        """
    ).bindparams(bindparam("now", type_=UTCDateTime()))


def _record_history(source: str) -> Any:
    """The history's INSERT for ``record``: one ``mq_attempt`` row per result, rows
    ``v(mid, id, status, code, enhanced, reply, error)`` from ``source``, whatever the
    status rules decided."""
    return text(
        f"""
    INSERT INTO {ATTEMPTS.name}
        (message_id, recipient_id, status, smtp_code, enhanced_code, reply, error, worker, at)
    SELECT v.mid, v.id, v.status, v.code, v.enhanced, v.reply, v.error, :worker, :now
    FROM {source}
    """
    ).bindparams(bindparam("now", type_=UTCDateTime()))


# -- PostgreSQL: rows from ``unnest`` of parameter arrays ---------------------------------

_PG_RECORD_RECIPIENTS = _record_recipients(
    """unnest(
        CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:codes AS int[]),
        CAST(:enhanced AS text[]), CAST(:replies AS text[]), CAST(:errors AS text[])
    ) AS v(id, status, code, enhanced, reply, error)"""
)
_PG_RECORD_HISTORY = _record_history(
    """unnest(
        CAST(:mids AS uuid[]), CAST(:ids AS bigint[]), CAST(:statuses AS text[]),
        CAST(:codes AS int[]), CAST(:enhanced AS text[]), CAST(:replies AS text[]),
        CAST(:errors AS text[])
    ) AS v(mid, id, status, code, enhanced, reply, error)"""
)
_PG_RECORD_MESSAGES = _record_messages(
    """unnest(
        CAST(:mids AS uuid[]), CAST(:statuses AS text[]), CAST(:nexts AS timestamptz[]),
        CAST(:lerrs AS text[]), CAST(:lreplies AS text[])
    ) AS v(id, status, next, lerr, lreply)"""
)


# Each id looked up on its own (LATERAL … OFFSET 0 keeps the planner from
# flattening it into a hash join): ``= ANY(:mids)`` in a prepared statement's
# generic plan cannot see the array's length and scanned all of mq_recipient,
# and so did a plain join to ``unnest`` while the table had no statistics yet.
_PG_RECIPIENT_STATUSES = text(
    f"""
    SELECT v.id, x.status FROM unnest(CAST(:mids AS uuid[])) AS v(id)
    CROSS JOIN LATERAL (SELECT r.status FROM {R.name} AS r WHERE r.message_id = v.id OFFSET 0) x
    """
)


# -- SQLite: each table's rows as one JSON array, read with ``json_each`` -----------------


def _json_columns(*names: str) -> str:
    return ", ".join(f"json_extract(value, '$[{i}]') AS {n}" for i, n in enumerate(names))


# Each recipient's result: [id, status, code, enhanced, reply, error, message id].
_SQLITE_RESULTS = (
    f"(SELECT {_json_columns('id', 'status', 'code', 'enhanced', 'reply', 'error', 'mid')}"
    " FROM json_each(:rows)) AS v"
)
_SQLITE_RECORD_RECIPIENTS = _record_recipients(_SQLITE_RESULTS)
_SQLITE_RECORD_HISTORY = _record_history(_SQLITE_RESULTS)
# One row back, whatever the batch: each row a step of its own would let the
# process's busy event-loop thread take the GIL back between steps.
_SQLITE_RECIPIENT_STATUSES = text(
    f"""
    SELECT json_group_object(message_id, statuses) FROM (
        SELECT message_id, group_concat(status) AS statuses FROM {R.name}
        WHERE message_id IN (SELECT value FROM json_each(:mids)) GROUP BY message_id
    )
    """
)
_SQLITE_RECORD_MESSAGES = _record_messages(
    f"""(SELECT {_json_columns("id", "status", "next", "lerr", "lreply")}
        FROM json_each(:messages)) AS v"""
)


class RecordStatements:
    """``Store.record`` (see ``queue.Store``)."""

    engine: Engine
    is_postgres: bool

    def record(self, outcomes: Sequence[MessageOutcome], *, owner: str) -> None:
        """Write the outcomes of finished attempts in one transaction.

        ``sent`` always wins (it is the truth about the relay); any other
        result only overwrites a recipient that is still open, so a
        recipient cancelled meanwhile stays cancelled.
        """
        if not outcomes:
            return
        now = utcnow()
        if self.is_postgres:
            self._record_pg(outcomes, owner=owner, now=now)
        else:
            self._record_sqlite(outcomes, owner=owner, now=now)

    def _record_pg(
        self, outcomes: Sequence[MessageOutcome], *, owner: str, now: dt.datetime
    ) -> None:
        """``record`` on PostgreSQL: the same rules in four statements, whatever the size.

        Each row as its own execution (executemany) costs a server round of
        parse/bind/execute per recipient and dominated the worker's time; here
        each table gets one statement over ``unnest`` of parameter arrays, so
        a group commit of N messages is BEGIN, 4 statements, COMMIT.
        """
        worker = owner.rsplit(":", 1)[0]
        rows = [(o.message_id, r) for o in outcomes for r in o.recipients]
        outcomes = [o for o in outcomes if o.final]
        ids = [o.message_id for o in outcomes]
        with self.engine.begin() as conn:
            if rows:
                columns = {
                    "ids": [r.recipient_id for _, r in rows],
                    "statuses": [r.status for _, r in rows],
                    "codes": [r.code for _, r in rows],
                    "enhanced": [r.enhanced_code for _, r in rows],
                    "replies": [r.reply for _, r in rows],
                    "errors": [r.error for _, r in rows],
                    "now": now,
                }
                conn.execute(_PG_RECORD_RECIPIENTS, columns)
                # The history keeps every result, whatever the status rules decided.
                mids = [mid for mid, _ in rows]
                conn.execute(_PG_RECORD_HISTORY, {**columns, "mids": mids, "worker": worker})
            if not ids:
                return  # early results only (``MessageOutcome.final``)
            # Derived from what the rows say now (see ``record``).
            statuses: dict[uuid.UUID, list[str]] = {mid: [] for mid in ids}
            for mid, status in conn.execute(_PG_RECIPIENT_STATUSES, {"mids": ids}):
                statuses[mid].append(status)
            conn.execute(
                _PG_RECORD_MESSAGES,
                {
                    "mids": ids,
                    "statuses": [derive_status(statuses[o.message_id]) for o in outcomes],
                    "nexts": [o.next_attempt_at or now for o in outcomes],
                    "lerrs": [o.last_error for o in outcomes],
                    "lreplies": [o.last_reply for o in outcomes],
                    "owner": owner,
                    "worker": worker,
                    "now": now,
                },
            )

    def _record_sqlite(
        self, outcomes: Sequence[MessageOutcome], *, owner: str, now: dt.datetime
    ) -> None:
        """``record`` on SQLite: the same rules in four statements, whatever the size.

        SQLite's write lock is the whole database's, and Python's sqlite3
        releases the GIL at every step of a statement (each row of an
        executemany, each row fetched). In a worker whose event loop keeps the
        GIL busy, the recording thread waited up to 5 ms (the switch
        interval) to take it back at each step, holding the lock all along:
        50 outcomes took 6 ms alone, 1.4 s beside a busy thread (measured),
        and the other processes queued for the lock. Here each table's rows
        are one JSON text: the results' built before the transaction begins,
        the messages' inside it, from the statuses the rows have then.
        """
        worker = owner.rsplit(":", 1)[0]
        dialect = self.engine.dialect
        # The stored forms SQLAlchemy writes (ids as 32 hex digits, times as text).
        uid = M.c.id.type.dialect_impl(dialect).bind_processor(dialect)
        stamp = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
        assert uid is not None and stamp is not None
        keys = [uid(o.message_id) for o in outcomes]
        results = json.dumps(
            [
                [
                    r.recipient_id,
                    r.status,
                    r.code,
                    r.enhanced_code,
                    r.reply,
                    r.error,
                    mid,
                ]
                for o, mid in zip(outcomes, keys, strict=True)
                for r in o.recipients
            ]
        )
        finals = [(o, mid) for o, mid in zip(outcomes, keys, strict=True) if o.final]
        mids = json.dumps([mid for _, mid in finals])
        with self.engine.begin() as conn:
            if results != "[]":
                conn.execute(_SQLITE_RECORD_RECIPIENTS, {"rows": results, "now": now})
                conn.execute(
                    _SQLITE_RECORD_HISTORY, {"rows": results, "now": now, "worker": worker}
                )
            if not finals:
                return  # early results only (``MessageOutcome.final``)
            found = json.loads(
                conn.execute(_SQLITE_RECIPIENT_STATUSES, {"mids": mids}).scalar_one()
            )
            messages = json.dumps(
                [
                    [
                        mid,
                        derive_status(found.get(mid, "").split(",")),
                        stamp(o.next_attempt_at or now),
                        o.last_error,
                        o.last_reply,
                    ]
                    for o, mid in finals
                ]
            )
            conn.execute(
                _SQLITE_RECORD_MESSAGES,
                {"messages": messages, "owner": owner, "worker": worker, "now": now},
            )
