"""Record a report that came back, tie it to its recipient row, apply what it says.

One transaction per report:

1. the return path's VERP token (the SMTP envelope recipient, else the
   report's own ``Delivered-To``/``To``, else the return path the report
   quotes) names a recipient row; the token must verify for exactly that row
   (message id, recipient id, address) or the report stays unmatched;
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
from ..bounces.verp import read_token, verifies
from ..statuses import ErrorWord, SuppressionReason
from .models import ATTEMPTS, BOUNCES, RECIPIENTS, RecipientStatus, utcnow
from .suppression import NewSuppression, SuppressionStatements

__all__ = ["RAW_KEPT", "BounceRecord", "Incoming", "record_report", "record_reports"]

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
    """``record_report`` for many reports in one transaction (a Maildir's worth)."""
    now = now or utcnow()
    with engine.begin() as conn:
        return [_record(conn, item, bounce_domain, secret, suppress, now) for item in batch]


def _record(
    conn: sa.Connection,
    incoming: Incoming,
    bounce_domain: str | None,
    secret: bytes,
    suppress: SuppressionStatements | None,
    now: dt.datetime,
) -> BounceRecord:
    report, envelope_to = incoming.report, incoming.envelope_to
    match = _match(conn, report, envelope_to, bounce_domain, secret)
    if match.recipient_id is not None and match.result is not None:
        _apply(conn, match, f"bounces:{incoming.source}", now)
        if match.effect and suppress is not None and match.address:
            entry = NewSuppression(
                address=match.address,
                address_key=suppress.key_of(match.address),
                reason=_SUPPRESSION_REASON[match.effect],
                note=_cap_note(match),
            )
            suppress._upsert(conn, [entry], now)
            match.suppressed = True
    result = match.result or (report.recipients[0] if report.recipients else None)
    reason = match.reason or (report.reason or None)
    values: dict[str, Any] = {
        "received_at": now,
        "source": incoming.source[:16],
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
        "reason": reason,
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
        "raw_size": incoming.raw_size if incoming.raw_size is not None else len(incoming.raw),
        "raw": incoming.raw[:RAW_KEPT],
    }
    row_id = conn.execute(sa.insert(BOUNCES).values(**values)).inserted_primary_key
    assert row_id is not None
    return BounceRecord(
        id=int(row_id[0]),
        kind=values["kind"],
        verdict=values["verdict"],
        address=values["address"],
        recipient_id=match.recipient_id,
        message_id=match.message_id,
        effect=match.effect,
        reason=reason,
        suppressed=match.suppressed,
    )


_SUPPRESSION_REASON: dict[str, str] = {
    RecipientStatus.BOUNCED: SuppressionReason.BOUNCED,
    RecipientStatus.COMPLAINED: SuppressionReason.COMPLAINED,
}


def _cap_note(match: _Match) -> str:
    assert match.result is not None
    words = " ".join(filter(None, [match.result.status, match.result.diagnostic]))
    return f"{match.effect} report: {words}"[:500]


def _match(
    conn: sa.Connection,
    report: Report,
    envelope_to: str | None,
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
    candidates = [envelope_to or "", *report.addressed_to, *report.original_envelope_from]
    token = next(
        (t for t in (read_token(c, domain=bounce_domain) for c in candidates if c) if t), None
    )
    if token is None:
        return _Match(reason=f"unmatched: no b+<token>@{bounce_domain} return path in the report")
    query = sa.select(RECIPIENTS.c.message_id, RECIPIENTS.c.address, RECIPIENTS.c.status).where(
        RECIPIENTS.c.id == token.recipient_id
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
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


def _apply(conn: sa.Connection, match: _Match, worker: str, now: dt.datetime) -> None:
    assert match.result is not None and match.recipient_id is not None
    effect = _EFFECTS.get(match.result.verdict)
    if effect is None:
        return  # delayed, soft, delivered: recorded, nothing changes
    status, before, error = effect
    diagnostic = match.result.diagnostic or None
    code = re.match(r"([245]\d\d)[ -]", diagnostic or "")
    values = {
        "status": status,
        "smtp_code": int(code.group(1)) if code else None,
        "enhanced_code": match.result.status or None,
        "reply": diagnostic,
        "error": error,
    }
    changed = conn.execute(
        sa.update(RECIPIENTS)
        .where(RECIPIENTS.c.id == match.recipient_id, RECIPIENTS.c.status.in_(before))
        .values(updated_at=now, **values)
    ).rowcount
    if not changed:
        match.reason = f"recorded; the recipient is already {status} or was not {before[0]}"
        return
    match.effect = status
    conn.execute(
        sa.insert(ATTEMPTS).values(
            message_id=match.message_id,
            recipient_id=match.recipient_id,
            worker=worker,
            at=now,
            **values,
        )
    )
