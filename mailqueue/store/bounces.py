"""Record a report that came back, tie it to its recipient row, apply what it says.

One transaction per batch of reports (one report from the SMTP endpoint, up
to ``inbound.BATCH`` from a mailbox):

1. the return path's VERP token (the SMTP envelope recipient, else the
   report's own ``Delivered-To``/``To``, else the return path the report
   quotes) names a recipient row; the token must verify for exactly that row
   (message id, recipient id, address) or the report stays unmatched. An
   event from the authenticated JSON API may name its row by message id and
   address instead;
2. the report's result for that recipient is picked (by address, original
   address, or the only result there is);
3. the effect, guarded by the row's current status in the UPDATE itself:

   ====================  ==========================  =====================
   result                recipient now               becomes
   ====================  ==========================  =====================
   hard (5.x.x failed)   ``sent``                    ``bounced``
   complaint             ``sent`` or ``bounced``     ``complained``
   anything else         any                         unchanged (recorded)
   any                   never sent (pending, ...)   unchanged, unmatched
   ====================  ==========================  =====================

   A change adds an ``mq_attempt`` row, so the history keeps the ``sent``
   and what came after it.

Every report is kept in ``mq_bounce``, whatever happened to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..bounces.parse import Kind, RecipientReport, Report, Verdict
from ..bounces.verp import Token, read_token, verifies
from ..statuses import ErrorWord, SuppressionReason
from .models import ATTEMPTS, BOUNCES, RECIPIENTS, RecipientStatus, utcnow
from .record import rederive_statuses
from .suppression import NewSuppression, SuppressionStatements

__all__ = [
    "RAW_KEPT",
    "BounceInfo",
    "BounceRecord",
    "Incoming",
    "list_reports",
    "record_report",
    "record_reports",
]

RAW_KEPT = 64 * 1024
"""Bytes of each report kept in ``mq_bounce.raw`` for a human to read."""


@dataclasses.dataclass(frozen=True)
class BounceRecord:
    """What became of one report: its ``mq_bounce`` row, as stored."""

    id: int
    kind: str
    verdict: str | None
    address: str | None
    recipient_id: int | None
    message_id: uuid.UUID | None
    effect: str | None
    reason: str | None
    suppressed: bool = False
    """Its address was put on the suppression list."""


@dataclasses.dataclass
class _Match:
    recipient_id: int | None = None
    message_id: uuid.UUID | None = None
    result: RecipientReport | None = None
    effect: str | None = None
    reason: str | None = None
    address: str | None = None
    """The row's address (the one a suppression is for)."""
    suppressed: bool = False


@dataclasses.dataclass(frozen=True)
class Incoming:
    """One report to record: as parsed, as received, and where it came from."""

    report: Report
    raw: bytes
    source: str
    envelope_to: str | None = None
    raw_size: int | None = None
    """The whole report's size when ``raw`` holds only its start."""
    message_id: uuid.UUID | None = None
    """For events from an authenticated caller (``POST /api/v1/events``): the
    message the report names, matched with the recipient's address instead of
    a VERP token."""


def record_report(
    engine: sa.Engine,
    incoming: Incoming,
    *,
    bounce_domain: str | None,
    secret: bytes,
    suppress: SuppressionStatements | None = None,
    now: dt.datetime | None = None,
) -> BounceRecord:
    """Store one report (its first ``RAW_KEPT`` bytes too); apply its effect.

    With ``suppress`` (a ``Store``), a recipient turned ``bounced`` or
    ``complained`` also puts its address on the suppression list (everywhere,
    reason ``bounced``/``complained``), in the same transaction.
    """
    (record,) = record_reports(
        engine, [incoming], bounce_domain=bounce_domain, secret=secret, suppress=suppress, now=now
    )
    return record


def record_reports(
    engine: sa.Engine,
    batch: Sequence[Incoming],
    *,
    bounce_domain: str | None,
    secret: bytes,
    suppress: SuppressionStatements | None = None,
    now: dt.datetime | None = None,
) -> list[BounceRecord]:
    """``record_report`` for many reports in one transaction (a Maildir's worth).

    Statements per batch, not per report: one SELECT of the rows the tokens
    name, one guarded UPDATE per verdict (its RETURNING says which rows still
    had a status it may change), one INSERT each for the attempt rows, the
    suppressions and the reports.
    """
    now = now or utcnow()
    with engine.begin() as conn:
        tokens = [_token(item, bounce_domain) for item in batch]
        rows = _rows(conn, {t.recipient_id for t in tokens if t is not None})
        named = _named_rows(conn, [item for item in batch if item.message_id is not None])
        matches = [
            _match_named(item, named)
            if item.message_id is not None
            else _match(item.report, token, rows, bounce_domain, secret)
            for item, token in zip(batch, tokens, strict=True)
        ]
        attempts: list[dict[str, Any]] = []
        entries: dict[tuple[str, str], NewSuppression] = {}
        sources = {id(m): item.source for item, m in zip(batch, matches, strict=True)}
        for verdict in (Verdict.HARD, Verdict.COMPLAINT):  # a complaint may follow a bounce
            group = [
                m
                for m in matches
                if m.recipient_id is not None
                and m.result is not None
                and m.result.verdict == verdict
            ]
            for match in _apply_many(conn, group, now):
                attempts.append(_attempt_row(match, f"bounces:{sources[id(match)]}", now))
                if suppress is not None and match.address:
                    entry = NewSuppression(
                        address=match.address,
                        address_key=suppress.key_of(match.address),
                        reason=_SUPPRESSION_REASON[str(match.effect)],
                        note=_cap_note(match),
                    )
                    entries[(entry.address_key, entry.scope)] = entry  # one per key: the last
                    match.suppressed = True
        if attempts:
            conn.execute(_INSERT_ATTEMPT, attempts)
            rederive_statuses(conn, {a["message_id"] for a in attempts}, updated_at=now)
        if entries and suppress is not None:
            suppress._upsert(conn, list(entries.values()), now)
        values = [
            _bounce_values(item, match, now) for item, match in zip(batch, matches, strict=True)
        ]
        ids = (
            conn.execute(
                sa.insert(BOUNCES).returning(BOUNCES.c.id, sort_by_parameter_order=True), values
            )
            .scalars()
            .all()
        )
    return [
        BounceRecord(
            id=int(row_id),
            kind=v["kind"],
            verdict=v["verdict"],
            address=v["address"],
            recipient_id=m.recipient_id,
            message_id=m.message_id,
            effect=m.effect,
            reason=v["reason"],
            suppressed=m.suppressed,
        )
        for row_id, v, m in zip(ids, values, matches, strict=True)
    ]


def _token(item: Incoming, bounce_domain: str | None) -> Token | None:
    """The first VERP token among the addresses the report was sent to or names."""
    report = item.report
    if bounce_domain is None or report.kind == Kind.UNPARSED or not report.recipients:
        return None
    for candidate in (item.envelope_to, *report.addressed_to, *report.original_envelope_from):
        if candidate:
            token = read_token(candidate, domain=bounce_domain)
            if token is not None:
                return token
    return None


def _rows(conn: sa.Connection, ids: set[int]) -> dict[int, Any]:
    """The recipient rows the tokens name (locked until commit on PostgreSQL)."""
    if not ids:
        return {}
    query = sa.select(
        RECIPIENTS.c.id, RECIPIENTS.c.message_id, RECIPIENTS.c.address, RECIPIENTS.c.status
    ).where(RECIPIENTS.c.id.in_(sorted(ids)))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return {row.id: row for row in conn.execute(query)}


def _named_rows(conn: sa.Connection, items: list[Incoming]) -> dict[tuple[Any, str], Any]:
    """Rows of the messages events name, by (message id, lower-case address)."""
    ids = {item.message_id for item in items}
    if not ids:
        return {}
    query = sa.select(
        RECIPIENTS.c.id, RECIPIENTS.c.message_id, RECIPIENTS.c.address, RECIPIENTS.c.status
    ).where(RECIPIENTS.c.message_id.in_(sorted(ids, key=str)))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return {(row.message_id, row.address.lower()): row for row in conn.execute(query)}


def _match_named(item: Incoming, named: dict[tuple[Any, str], Any]) -> _Match:
    report = item.report
    if not report.recipients:
        return _Match(reason="no recipient result to apply")
    result = report.recipients[0]
    row = named.get((item.message_id, result.address.lower()))
    if row is None:
        return _Match(
            reason=f"unmatched: message {item.message_id} has no recipient {result.address}"
        )
    if row.status not in (RecipientStatus.SENT, *RecipientStatus.AFTER_SENT):
        return _Match(
            result=result, reason=f"unmatched: the recipient was never sent (it is {row.status})"
        )
    return _Match(
        recipient_id=row.id, message_id=row.message_id, result=result, address=row.address
    )


def _bounce_values(item: Incoming, match: _Match, now: dt.datetime) -> dict[str, Any]:
    report, envelope_to = item.report, item.envelope_to
    result = match.result or (report.recipients[0] if report.recipients else None)
    return {
        "received_at": now,
        "source": item.source[:16],
        "envelope_to": envelope_to[:320] if envelope_to else None,
        "kind": str(report.kind),
        "verdict": str(result.verdict) if result else None,
        "address": result.address[:320] if result else None,
        "enhanced_code": (result.status or None) if result else None,
        "diagnostic": (result.diagnostic or None) if result else None,
        "feedback_type": report.feedback_type[:32] or None,
        "message_id": match.message_id,
        "recipient_id": match.recipient_id,
        "effect": match.effect,
        "reason": match.reason or (report.reason or None),
        "results": [
            {
                "address": r.address,
                "verdict": str(r.verdict),
                "action": r.action,
                "status": r.status,
                "diagnostic": r.diagnostic,
            }
            for r in report.recipients
        ]
        or None,
        "raw_size": item.raw_size if item.raw_size is not None else len(item.raw),
        "raw": item.raw[:RAW_KEPT],
    }


_SUPPRESSION_REASON: dict[str, str] = {
    RecipientStatus.BOUNCED: SuppressionReason.BOUNCED,
    RecipientStatus.COMPLAINED: SuppressionReason.COMPLAINED,
}


def _cap_note(match: _Match) -> str:
    assert match.result is not None
    words = " ".join(filter(None, [match.result.status, match.result.diagnostic]))
    return f"{match.effect} report: {words}"[:500]


def _match(
    report: Report,
    token: Token | None,
    rows: dict[int, Any],
    bounce_domain: str | None,
    secret: bytes,
) -> _Match:
    if report.kind == Kind.UNPARSED:
        return _Match()
    if not report.recipients:
        return _Match(reason=report.reason or "no recipient result to apply")
    if bounce_domain is None:
        return _Match(
            reason="unmatched: MAILQUEUE_BOUNCE_DOMAIN is not set, so no return path names a row"
        )
    if token is None:
        return _Match(reason=f"unmatched: no b+<token>@{bounce_domain} return path in the report")
    row = rows.get(token.recipient_id)
    if row is None or not verifies(
        token,
        secret=secret,
        message_id=row.message_id,
        recipient_id=token.recipient_id,
        address=row.address,
    ):
        return _Match(
            reason="unmatched: the return path's token does not verify "
            "(forged, for a deleted row, or made with another MAILQUEUE_BOUNCE_SECRET)"
        )
    result = _result_for(report, row.address)
    if result is None:
        return _Match(reason=f"unmatched: the report has no result for {row.address}")
    if row.status not in (RecipientStatus.SENT, *RecipientStatus.AFTER_SENT):
        return _Match(
            result=result,
            reason=f"unmatched: the recipient was never sent (it is {row.status})",
        )
    return _Match(
        recipient_id=token.recipient_id,
        message_id=row.message_id,
        result=result,
        address=row.address,
    )


def _result_for(report: Report, address: str) -> RecipientReport | None:
    wanted = address.lower()
    for result in report.recipients:
        if wanted in (result.address.lower(), result.original_address.lower()):
            return result
    # Forwarding may rename the final recipient; one result is about the one row.
    return report.recipients[0] if len(report.recipients) == 1 else None


_EFFECTS: dict[Verdict, tuple[str, tuple[str, ...], str]] = {
    Verdict.HARD: (RecipientStatus.BOUNCED, (RecipientStatus.SENT,), ErrorWord.BOUNCED),
    Verdict.COMPLAINT: (
        RecipientStatus.COMPLAINED,
        (RecipientStatus.SENT, RecipientStatus.BOUNCED),
        ErrorWord.COMPLAINED,
    ),
}


_INSERT_ATTEMPT = sa.insert(ATTEMPTS)


def _change(match: _Match) -> dict[str, Any]:
    """The recipient columns a match's report sets."""
    assert match.result is not None
    status, _, error = _EFFECTS[match.result.verdict]
    diagnostic = match.result.diagnostic or None
    code = re.match(r"([245]\d\d)[ -]", diagnostic or "")
    return {
        "status": status,
        "smtp_code": int(code.group(1)) if code else None,
        "enhanced_code": match.result.status or None,
        "reply": diagnostic,
        "error": error,
    }


def _apply_many(conn: sa.Connection, group: list[_Match], now: dt.datetime) -> list[_Match]:
    """One guarded UPDATE for matches of one verdict; returns those that changed a row.

    Each row changes only from a status its verdict may change (``_EFFECTS``),
    checked in the UPDATE itself; RETURNING says which rows did. A row named
    twice in the group is changed once, by the first report.
    """
    if not group:
        return []
    status, before, error = _EFFECTS[group[0].result.verdict]  # type: ignore[union-attr]
    first: dict[int, _Match] = {}
    for match in group:
        assert match.recipient_id is not None
        first.setdefault(match.recipient_id, match)
    changes = {rid: _change(m) for rid, m in first.items()}

    def column(name: str) -> Any:
        kind = RECIPIENTS.c[name].type
        return sa.case(
            {rid: sa.literal(c[name], kind) for rid, c in changes.items()},
            value=RECIPIENTS.c.id,
        )

    changed = set(
        conn.execute(
            sa.update(RECIPIENTS)
            .where(RECIPIENTS.c.id.in_(list(changes)), RECIPIENTS.c.status.in_(before))
            .values(
                status=status,
                error=error,
                updated_at=now,
                smtp_code=column("smtp_code"),
                enhanced_code=column("enhanced_code"),
                reply=column("reply"),
            )
            .returning(RECIPIENTS.c.id)
        ).scalars()
    )
    done = []
    for match in group:
        rid = match.recipient_id
        if rid is not None and rid in changed and first[rid] is match:
            match.effect = status
            done.append(match)
        else:
            match.reason = f"recorded; the recipient is already {status} or was not {before[0]}"
    return done


def _attempt_row(match: _Match, worker: str, now: dt.datetime) -> dict[str, Any]:
    return {
        "message_id": match.message_id,
        "recipient_id": match.recipient_id,
        "worker": worker,
        "at": now,
        **_change(match),
    }


@dataclasses.dataclass(frozen=True)
class BounceInfo:
    """One stored report, as ``mailqueue bounces list`` shows it."""

    id: int
    received_at: dt.datetime
    source: str
    kind: str
    verdict: str | None
    address: str | None
    enhanced_code: str | None
    effect: str | None
    reason: str | None
    message_id: uuid.UUID | None
    recipient_id: int | None
    diagnostic: str | None

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["received_at"] = self.received_at.isoformat()
        data["message_id"] = str(self.message_id) if self.message_id else None
        return data


def list_reports(
    engine: sa.Engine, *, unmatched: bool = False, limit: int = 50, before: int | None = None
) -> list[BounceInfo]:
    """Stored reports, newest first (``before``: an id, for the next page).

    ``unmatched``: only those that changed no row and name none (unparsed ones too).
    """
    columns = [BOUNCES.c[f.name] for f in dataclasses.fields(BounceInfo)]
    query = sa.select(*columns).order_by(BOUNCES.c.id.desc()).limit(limit)
    if unmatched:
        query = query.where(BOUNCES.c.recipient_id.is_(None))
    if before is not None:
        query = query.where(BOUNCES.c.id < before)
    with engine.connect() as conn:
        return [BounceInfo(*row) for row in conn.execute(query)]
