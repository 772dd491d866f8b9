"""The suppression list: addresses never sent to, and the claim's one lookup.

A suppression is an address key and a scope: ``''`` (everywhere),
``domain:<sender domain>`` (messages whose envelope sender is at that domain)
or ``list:<list id>`` (messages enqueued with that ``list_id``). A bare scope
is refused: an RFC 2919 list id such as ``example.com`` is also a domain, and
guessing which was meant would withhold mail the operator did not name.

It is checked when a worker claims a message (``ClaimStatements.claim`` calls
``suppressed_in``), not at enqueue, so an entry added while a message waits
still stops it: one indexed query per claimed batch, whatever its size.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import idna
from sqlalchemy import ARRAY, Connection, Engine, String, bindparam, delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite

from ..statuses import SuppressionReason
from .models import SUPPRESSIONS, utcnow

__all__ = [
    "EVERYWHERE",
    "NewSuppression",
    "SuppressionInfo",
    "SuppressionStatements",
    "address_key",
    "count_by_reason",
    "scopes_for",
    "sender_domain_scope",
]

S = SUPPRESSIONS
EVERYWHERE = ""
DOMAIN_SCOPE = "domain:"
LIST_SCOPE = "list:"

_CHUNK = 5000
"""Rows per INSERT of an import: big enough to amortise the round trip."""


@functools.lru_cache(maxsize=4096)
def _domain_key(domain: str) -> str:
    """A domain as compared: lower-case ASCII (IDNA), so ``BÜCHER.example`` and
    ``xn--bcher-kva.example`` are one key. An address literal stays as written."""
    lowered = domain.lower()
    if lowered.isascii() or lowered.startswith("["):
        return lowered
    try:
        return idna.encode(lowered, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return lowered


def address_key(address: str, *, fold_local: bool = False) -> str:
    """What an address is compared by: the local part exactly (lower-cased only with
    ``fold_local``, ``MAILQUEUE_SUPPRESSION_LOCAL_CASE_INSENSITIVE``; RFC 5321 leaves
    its case to the receiving host), ``@``, the domain case-folded and IDNA-ASCII."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower() if fold_local else address
    return f"{local.lower() if fold_local else local}@{_domain_key(domain)}"


def sender_domain_scope(mail_from: str) -> str:
    """The ``domain:`` scope a message's envelope sender falls under (``''`` for ``<>``)."""
    _, at, domain = mail_from.rpartition("@")
    return f"{DOMAIN_SCOPE}{_domain_key(domain)}" if at and domain else EVERYWHERE


def scopes_for(mail_from: str, list_id: str | None) -> frozenset[str]:
    """Every scope whose suppressions apply to a message from ``mail_from`` in ``list_id``."""
    scopes = {EVERYWHERE, sender_domain_scope(mail_from)}
    if list_id:
        scopes.add(f"{LIST_SCOPE}{list_id.lower()}")
    return frozenset(scopes)


def describe(reason: str, scope: str) -> str:
    """The reply a suppressed recipient shows: which entry stopped it."""
    return f"suppressed: {reason} ({scope or 'everywhere'})"


@dataclass(frozen=True)
class NewSuppression:
    """A validated entry ready to be written (``address_key`` computed, scope normalised)."""

    address: str
    address_key: str
    reason: str
    scope: str = EVERYWHERE
    note: str | None = None


@dataclass(frozen=True)
class SuppressionInfo:
    id: int
    address: str
    address_key: str
    reason: str
    scope: str
    created_at: dt.datetime
    note: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "address_key": self.address_key,
            "reason": self.reason,
            "scope": self.scope,
            "created_at": self.created_at.isoformat(),
            "note": self.note,
        }


_COLUMNS = (S.c.id, S.c.address, S.c.address_key, S.c.reason, S.c.scope, S.c.created_at, S.c.note)

# SQLite: the keys as one JSON text, so the statement has one parameter whatever the
# batch (SQLite caps parameters at 32766); ``IN (SELECT …)`` still probes the index.
_SQLITE_MATCHES = text(
    f"SELECT address_key, scope, reason FROM {S.name} "
    "WHERE address_key IN (SELECT value FROM json_each(:keys))"
)
# PostgreSQL: one array parameter, so one prepared plan for every batch size.
_PG_MATCHES = text(
    f"SELECT address_key, scope, reason FROM {S.name} WHERE address_key = ANY(:keys)"
).bindparams(bindparam("keys", type_=ARRAY(String())))


def suppressed_in(
    conn: Connection, keys: Iterable[str], *, is_postgres: bool
) -> dict[str, list[tuple[str, str]]]:
    """The entries for ``keys``: key -> [(scope, reason)], in one indexed query."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    if is_postgres:
        rows = conn.execute(_PG_MATCHES, {"keys": wanted})
    else:
        rows = conn.execute(_SQLITE_MATCHES, {"keys": json.dumps(wanted)})
    found: dict[str, list[tuple[str, str]]] = {}
    for key, scope, reason in rows:
        found.setdefault(key, []).append((scope, reason))
    return found


def first_match(
    entries: Sequence[tuple[str, str]], scopes: frozenset[str]
) -> tuple[str, str] | None:
    """The entry (scope, reason) among ``entries`` that applies, the widest scope first."""
    hits = sorted((e for e in entries if e[0] in scopes), key=lambda e: (e[0] != EVERYWHERE, e[0]))
    return hits[0] if hits else None


def count_by_reason(engine: Engine) -> dict[str, int]:
    """Entries per reason, every reason present (zeros included): for stats and metrics."""
    with engine.connect() as conn:
        counts: dict[str, int] = {
            reason: n
            for reason, n in conn.execute(select(S.c.reason, func.count()).group_by(S.c.reason))
        }
    return {r: int(counts.get(r, 0)) for r in SuppressionReason.ALL}


class SuppressionStatements:
    """``Store``'s suppression list statements (see ``queue.Store``)."""

    engine: Engine
    is_postgres: bool
    fold_local_case: bool

    def key_of(self, address: str) -> str:
        return address_key(address, fold_local=self.fold_local_case)

    def _upsert(self, conn: Connection, rows: Sequence[NewSuppression], now: dt.datetime) -> None:
        """Insert ``rows``; an entry already there for (key, scope) takes the new reason
        and note (the latest word about an address wins) and keeps its ``created_at``."""
        values = [
            {
                "address": r.address,
                "address_key": r.address_key,
                "reason": r.reason,
                "scope": r.scope,
                "created_at": now,
                "note": r.note,
            }
            for r in rows
        ]
        dialect_insert: Any = postgresql.insert if self.is_postgres else sqlite.insert
        stmt = dialect_insert(S)
        stmt = stmt.on_conflict_do_update(
            index_elements=[S.c.address_key, S.c.scope],
            set_={
                "address": stmt.excluded.address,
                "reason": stmt.excluded.reason,
                "note": stmt.excluded.note,
            },
        )
        conn.execute(stmt, values)

    def add_suppressions(
        self,
        rows: Sequence[NewSuppression],
        *,
        progress: Any = None,
    ) -> int:
        """Write ``rows`` in one transaction (all or none), ``_CHUNK`` at a time;
        ``progress(n)`` after each chunk. Returns how many rows were given."""
        now = utcnow()
        done = 0
        with self.engine.begin() as conn:
            for start in range(0, len(rows), _CHUNK):
                chunk = rows[start : start + _CHUNK]
                self._upsert(conn, chunk, now)
                done += len(chunk)
                if progress is not None:
                    progress(done)
        return done

    def remove_suppression(self, key: str, scope: str) -> bool:
        with self.engine.begin() as conn:
            gone = conn.execute(
                delete(S).where(S.c.address_key == key, S.c.scope == scope)
            ).rowcount
        return bool(gone)

    def list_suppressions(
        self,
        *,
        reason: str | None = None,
        scope: str | None = None,
        key: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[SuppressionInfo]:
        """Newest first; page with ``before=<last id>``."""
        query = select(*_COLUMNS).order_by(S.c.id.desc()).limit(limit)
        if reason is not None:
            query = query.where(S.c.reason == reason)
        if scope is not None:
            query = query.where(S.c.scope == scope)
        if key is not None:
            query = query.where(S.c.address_key == key)
        if before is not None:
            query = query.where(S.c.id < before)
        with self.engine.connect() as conn:
            return [SuppressionInfo(*row) for row in conn.execute(query)]

    def iter_suppressions(self) -> Iterator[SuppressionInfo]:
        """Every entry, oldest first, streamed (an export of millions holds one page)."""
        last = 0
        while True:
            with self.engine.connect() as conn:
                page = conn.execute(
                    select(*_COLUMNS).where(S.c.id > last).order_by(S.c.id).limit(_CHUNK)
                ).all()
            if not page:
                return
            for row in page:
                yield SuppressionInfo(*row)
            last = page[-1].id

    def count_suppressions(self) -> dict[str, int]:
        return count_by_reason(self.engine)

    def find_suppression(self, key: str, scopes: frozenset[str]) -> SuppressionInfo | None:
        """The entry that would stop ``key`` in a message with these ``scopes``."""
        with self.engine.connect() as conn:
            rows = [
                SuppressionInfo(*row)
                for row in conn.execute(
                    select(*_COLUMNS).where(S.c.address_key == key, S.c.scope.in_(sorted(scopes)))
                )
            ]
        rows.sort(key=lambda r: (r.scope != EVERYWHERE, r.scope))
        return rows[0] if rows else None
