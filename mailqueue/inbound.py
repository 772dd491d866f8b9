"""Reports coming back in: one report, a Maildir, an mbox. The service every
bounce face (``mailqueue bounces ingest``, ``mailqueue bounces serve``) calls.

Each report is parsed (``bounces.parse``, which never raises), recorded and
applied (``store.bounces``). Mailboxes are read in batches of ``BATCH``
reports per transaction; a file is moved out of the way (Maildir ``new/`` →
``cur/``, flagged seen; an mbox's messages → ``<mbox>.done``) only after its
batch committed, so a crash reads it again instead of losing it (a report
read twice is recorded twice; its effect is applied once, since the update
is guarded by the recipient's status).
"""

from __future__ import annotations

import json
import mailbox
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics as _metrics
from .bounces.parse import MAX_BYTES, Kind, RecipientReport, Report, Verdict, parse_report
from .config import Settings, get_settings
from .errors import InvalidMessageError
from .store import Store, get_engine
from .store.bounces import BounceInfo, BounceRecord, Incoming, list_reports, record_reports

__all__ = [
    "BATCH",
    "MAX_EVENTS",
    "IngestReport",
    "ingest",
    "ingest_events",
    "ingest_maildir",
    "ingest_mbox",
    "reports",
]

BATCH = 200
"""Reports recorded per transaction when reading a mailbox."""

READ_LIMIT = 4 * MAX_BYTES
"""Bytes of one mailbox file read; the parser looks at the first ``MAX_BYTES``."""


@dataclass
class IngestReport:
    """What a mailbox run did, for the CLI to print."""

    read: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    """Recipients changed, by the status they got (``bounced``, ``complained``)."""
    unmatched: int = 0
    unparsed: int = 0

    def add(self, records: Sequence[BounceRecord]) -> None:
        for record in records:
            self.read += 1
            if record.effect:
                self.applied[record.effect] = self.applied.get(record.effect, 0) + 1
            if record.kind == "unparsed":
                self.unparsed += 1
            elif record.recipient_id is None:
                self.unmatched += 1


def _record(batch: Sequence[Incoming], settings: Settings) -> list[BounceRecord]:
    engine = get_engine(settings.database_url)
    suppress = (
        Store(engine, fold_local_case=settings.suppression_local_case_insensitive)
        if settings.bounce_suppress
        else None
    )
    records = record_reports(
        engine,
        batch,
        bounce_domain=settings.bounce_domain,
        secret=settings.bounce_secret,
        suppress=suppress,
    )
    _metrics.bounces_recorded(records)
    if settings.on_terminal:
        from .worker.hooks import notify_changed

        store = suppress or Store(engine)
        for message_id in dict.fromkeys(r.message_id for r in records if r.effect):
            assert message_id is not None
            notify_changed(settings.on_terminal, store, message_id)
    return records


def _incoming(raw: bytes, source: str, envelope_to: str | None, size: int) -> Incoming:
    return Incoming(parse_report(raw), raw, source, envelope_to, raw_size=size)


def ingest(
    raw: bytes, *, source: str, envelope_to: str | None = None, settings: Settings | None = None
) -> BounceRecord:
    """Parse, record and apply one report as received (``envelope_to``: its RCPT TO)."""
    settings = settings or get_settings()
    (record,) = _record([_incoming(raw, source, envelope_to, len(raw))], settings)
    return record


def _read_capped(path: Path) -> tuple[bytes, int]:
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        return f.read(READ_LIMIT), size


def ingest_maildir(
    directory: str | os.PathLike[str], *, settings: Settings | None = None
) -> IngestReport:
    """Read every report in ``directory/new``, then move each to ``cur`` (seen)."""
    settings = settings or get_settings()
    root = Path(directory)
    new, cur = root / "new", root / "cur"
    if not new.is_dir() or not cur.is_dir():
        raise FileNotFoundError(
            f"{root} is not a Maildir (it needs new/ and cur/): give the folder the MTA "
            "delivers bounces into"
        )
    outcome = IngestReport()
    for names in _chunks(sorted(os.listdir(new)), BATCH):
        batch, done = [], []
        for name in names:
            if name.startswith("."):
                continue
            try:
                raw, size = _read_capped(new / name)
            except FileNotFoundError:
                continue  # another reader took it
            batch.append(_incoming(raw, "maildir", None, size))
            done.append(name)
        outcome.add(_record(batch, settings))
        for name in done:
            base = name.split(":", 1)[0]
            os.replace(new / name, cur / f"{base}:2,S")
    return outcome


def ingest_mbox(path: str | os.PathLike[str], *, settings: Settings | None = None) -> IngestReport:
    """Read every report in the mbox ``path``, append them to ``<path>.done``, empty it.

    The mbox is locked (dot-lock and ``flock``, as MTAs lock it) for the run.
    """
    settings = settings or get_settings()
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} is not a file: give the mbox the MTA delivers bounces into"
        )
    box = mailbox.mbox(source, create=False)
    done = mailbox.mbox(f"{source}.done")
    outcome = IngestReport()
    box.lock()
    try:
        keys = list(box.keys())
        for chunk in _chunks(keys, BATCH):
            batch = []
            for key in chunk:
                raw = box.get_bytes(key)
                batch.append(_incoming(raw[:READ_LIMIT], "mbox", None, len(raw)))
            outcome.add(_record(batch, settings))
            done.lock()
            try:
                for key in chunk:
                    done.add(box.get_message(key))
                done.flush()
            finally:
                done.unlock()
        for key in keys:
            box.discard(key)
        box.flush()
    finally:
        box.unlock()
        box.close()
        done.close()
    return outcome


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def reports(
    *, unmatched: bool = False, limit: int = 50, before: int | None = None
) -> list[BounceInfo]:
    """Stored reports, newest first; ``unmatched``: only those tied to no row."""
    engine = get_engine(get_settings().database_url)
    return list_reports(engine, unmatched=unmatched, limit=limit, before=before)


MAX_EVENTS = 1000
"""Events in one ``POST /api/v1/events`` request."""

_EVENT_VERDICTS = {
    "bounced": Verdict.HARD,
    "complained": Verdict.COMPLAINT,
    "deferred": Verdict.DELAYED,
    "delivered": Verdict.DELIVERED,
}
_EVENT_FIELDS = {"event", "recipient", "message_id", "return_path", "status", "diagnostic"}
_PLAIN_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"\\@]{1,64}@[^\s<>()\[\],;:\"\\@]{1,255}")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _event(raw: object, where: str) -> Incoming:
    if not isinstance(raw, dict):
        raise InvalidMessageError("must be an object", field=where)
    unknown = sorted(set(raw) - _EVENT_FIELDS)
    if unknown:
        raise InvalidMessageError(
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_EVENT_FIELDS))}",
            field=where,
        )
    for name in _EVENT_FIELDS:
        if name in raw and not isinstance(raw[name], str):
            raise InvalidMessageError("must be a string", field=f"{where}.{name}")
    event = raw.get("event", "")
    if event not in _EVENT_VERDICTS:
        raise InvalidMessageError(
            f"must be one of {', '.join(sorted(_EVENT_VERDICTS))}", field=f"{where}.event"
        )
    recipient = raw.get("recipient", "")
    if not _PLAIN_ADDRESS.fullmatch(recipient):
        raise InvalidMessageError("must be one plain address", field=f"{where}.recipient")
    status = raw.get("status", "")
    if status and not _STATUS.fullmatch(status):
        raise InvalidMessageError(
            "must be an enhanced status code like 5.1.1", field=f"{where}.status"
        )
    diagnostic = raw.get("diagnostic", "")
    if len(diagnostic) > 1000 or any(c in diagnostic for c in "\r\n\0"):
        raise InvalidMessageError(
            "must be one line of at most 1000 characters", field=f"{where}.diagnostic"
        )
    message_id = None
    if "message_id" in raw:
        try:
            message_id = uuid.UUID(raw["message_id"])
        except ValueError:
            raise InvalidMessageError(
                "must be a mailqueue message id", field=f"{where}.message_id"
            ) from None
    return_path = raw.get("return_path", "")
    if message_id is None and not return_path:
        raise InvalidMessageError(
            "needs message_id (the id enqueue returned) or return_path (the VERP address)",
            field=where,
        )
    verdict = _EVENT_VERDICTS[event]
    if verdict == Verdict.HARD and status.startswith("4."):
        verdict = Verdict.SOFT
    actions = {"bounced": "failed", "complained": "complaint", "deferred": "delayed"}
    action = actions.get(event) or str(event)
    report = Report(
        Kind.EVENT,
        recipients=(RecipientReport(recipient, verdict, action, status, diagnostic),),
        original_envelope_from=(return_path,) if return_path else (),
    )
    data = json.dumps(raw, sort_keys=True).encode()
    return Incoming(report, data, "api", message_id=message_id)


def ingest_events(body: object, *, settings: Settings | None = None) -> list[BounceRecord]:
    """Record and apply normalized events (``{"events": [...]}``), all or none.

    Each event: ``event`` (``bounced``, ``complained``, ``deferred``,
    ``delivered``), ``recipient``, and ``message_id`` (the id ``enqueue``
    returned) or ``return_path`` (the VERP address, checked like a bounce's);
    optional ``status`` (``5.1.1``) and ``diagnostic``. Bad input raises
    ``InvalidMessageError`` naming the field, and nothing is written.
    """
    settings = settings or get_settings()
    if not isinstance(body, dict) or set(body) != {"events"}:
        raise InvalidMessageError('must be {"events": [...]}', field="body")
    events = body["events"]
    if not isinstance(events, list) or not events:
        raise InvalidMessageError("must be a non-empty list", field="events")
    if len(events) > MAX_EVENTS:
        raise InvalidMessageError(f"at most {MAX_EVENTS} events per request", field="events")
    batch = [_event(raw, f"events[{i}]") for i, raw in enumerate(events)]
    return _record(batch, settings)
