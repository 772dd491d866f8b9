"""Read one bounce or complaint into plain data. ``parse_report`` never raises.

Formats, tried in this order:

1. ``multipart/report; report-type=delivery-status`` (RFC 3464; also
   ``message/global-delivery-status``, RFC 6533): one :class:`RecipientReport`
   per per-recipient field group (Final-Recipient, Original-Recipient,
   Action, Status, Diagnostic-Code, Remote-MTA).
2. ``multipart/report; report-type=feedback-report`` (ARF, RFC 5965): a
   complaint; the recipient is ``Original-Rcpt-To``, else the ``To`` of the
   returned headers.
3. The text bounces real MTAs still send: Exim's and Gmail's
   ``X-Failed-Recipients``, Exchange's ``addr #550 5.1.1 ... ##``, the
   ``<addr>: host ... said: 550 5.1.1`` lines of Postfix and qmail-likes. The
   enhanced status code (RFC 3463) found next to each address is the judge;
   an address with no code near it is not a result.

Anything else is kind ``unparsed`` with a reason: kept and shown, never
dropped, never an exception.

Hostile input, and an ``email`` package that lacks security fixes on the
interpreters this runs on (3.11.7, 3.12.1), are handled by what is never
asked of it:

- at most ``max_bytes`` are read (the report parts come before the returned
  message, so a cut report still reads); the rest is never looked at;
- before the parser runs, a pre-scan refuses input with too many
  ``Content-Type`` headers (bounds part count and nesting depth, so the
  parser's boundary stack and generator nesting stay small) or an overlong
  one (``email.message._parseparam`` is quadratic in a header's length on
  these versions, and the parser calls it for every boundary);
- the ``compat32`` policy: header values stay raw strings; the structured
  header parser (``email._header_value_parser``) and ``getaddresses`` (which
  mis-splits crafted addresses before CVE-2023-27043's fix) are never used:
  addresses are matched by one strict pattern here;
- only ``text/*`` and report parts are decoded, each capped; attachments
  (zip, gzip, anything ``application/*``) are never decoded or opened.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from enum import StrEnum
from typing import Any

__all__ = [
    "MAX_BYTES",
    "Kind",
    "RecipientReport",
    "Report",
    "Verdict",
    "parse_report",
]

MAX_BYTES = 1_000_000
"""Bytes of a report read by default; DSNs return at most ~50 kB of the original."""

MAX_CONTENT_TYPES = 64
"""``Content-Type`` headers in one report: a DSN has 4 to 10."""

MAX_CONTENT_TYPE_CHARS = 1000
"""Length of one ``Content-Type`` header, folded lines together."""

MAX_DEPTH = 6
"""MIME nesting walked: report → returned message → its parts."""

MAX_HEADERS = 500
"""Header fields in one part before it is refused."""

MAX_RECIPIENTS = 100
"""Recipient results kept from one report."""

MAX_TEXT = 200_000
"""Characters of one decoded text part looked at."""

MAX_FIELD = 1000
"""Characters kept of one field (a diagnostic, an address)."""


class Kind(StrEnum):
    """What a report turned out to be. Stored in ``mq_bounce.kind``; never renamed."""

    DSN = "dsn"
    """An RFC 3464 delivery status notification."""
    COMPLAINT = "complaint"
    """An ARF feedback report (RFC 5965)."""
    TEXT = "text"
    """A non-standard text bounce, judged by the enhanced status codes in it."""
    EVENT = "event"
    """A normalized event posted to the JSON API (an ESP's webhook, translated)."""
    UNPARSED = "unparsed"
    """Not read: the reason says why. Kept and shown."""


class Verdict(StrEnum):
    """What one recipient's result means for its row."""

    HARD = "hard"
    """Failed for good: ``Action: failed`` with a 5.x.x status."""
    SOFT = "soft"
    """Failed with a 4.x.x or no status: recorded, the row is not changed."""
    DELAYED = "delayed"
    """``Action: delayed``: recorded, the row is not changed."""
    DELIVERED = "delivered"
    """``delivered``, ``relayed`` or ``expanded``: recorded."""
    COMPLAINT = "complaint"
    """The recipient reported the message as spam (or fraud, virus...)."""


@dataclass(frozen=True)
class RecipientReport:
    """One recipient's result in a report."""

    address: str
    """Final-Recipient (or the failed address of a text bounce), without ``rfc822;``."""
    verdict: Verdict
    action: str = ""
    """The DSN ``Action`` word, lower case, or the one implied by the status."""
    status: str = ""
    """Enhanced status code, ``5.1.1``; empty when none was given."""
    diagnostic: str = ""
    """``Diagnostic-Code`` without its type (or the text-bounce line), capped."""
    original_address: str = ""
    remote_mta: str = ""


@dataclass(frozen=True)
class Report:
    """What one report says. Plain data: stored, shown, matched to rows."""

    kind: Kind
    recipients: tuple[RecipientReport, ...] = ()
    reason: str = ""
    """Why it was not read (unparsed), or a note (``cut at 1000000 bytes``)."""
    feedback_type: str = ""
    """ARF ``Feedback-Type`` (``abuse``, ``fraud``...), lower case."""
    reporting_mta: str = ""
    original_message_id: str = ""
    """``Message-ID`` of the returned message or headers, with its brackets."""
    original_envelope_from: tuple[str, ...] = ()
    """Return paths the report names: ARF ``Original-Mail-From``, the returned
    ``Return-Path``. A VERP token in one of them ties the report to a row."""
    addressed_to: tuple[str, ...] = ()
    """Where the report itself was sent, from its headers (``Delivered-To``,
    ``X-Original-To``, ``Envelope-To``, ``To``): a Maildir has no envelope."""
    truncated: bool = False
    subject: str = ""
    from_: str = ""


_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
# Deliberately narrow: no quoted local parts, no comments. A report naming an
# address this cannot read is unmatched, never guessed.
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?"
)
_CONTENT_TYPE_LINE = re.compile(rb"(?im)^content-type[ \t]*:")
_DAEMON_FROM = re.compile(r"(?i)mailer-daemon|postmaster|mail delivery|mail administrator")
_BOUNCE_SUBJECT = re.compile(
    r"(?i)undeliver|delivery status|delivery failure|delivery has failed|failure notice"
    r"|returned mail|mail delivery failed|non.?delivery|could not be delivered|rejected"
)
_ACTIONS = {"failed", "delayed", "delivered", "relayed", "expanded"}
_COMPLAINT_TYPES = {"abuse", "fraud", "virus", "other"}

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def parse_report(data: bytes, *, max_bytes: int = MAX_BYTES) -> Report:
    """Read ``data`` (one whole message as received) into a :class:`Report`.

    Never raises: every failure, including the ``email`` package's own, is a
    ``Kind.UNPARSED`` report whose ``reason`` says what was wrong.
    """
    truncated = len(data) > max_bytes
    if truncated:
        data = data[:max_bytes]
    refusal = _prescan(data)
    if refusal:
        return Report(Kind.UNPARSED, reason=refusal, truncated=truncated)
    try:
        msg = _PARSER.parsebytes(data)
        report = _read(msg)
    except (RecursionError, MemoryError):
        return Report(Kind.UNPARSED, reason="nested too deep to read", truncated=truncated)
    except Exception as exc:  # noqa: BLE001 - the parser must never crash the endpoint
        return Report(
            Kind.UNPARSED,
            reason=f"the email parser failed: {type(exc).__name__}",
            truncated=truncated,
        )
    if truncated:
        note = f"cut at {max_bytes} bytes"
        reason = f"{report.reason}; {note}" if report.reason else note
        return dataclasses.replace(report, reason=reason, truncated=True)
    return report


def _prescan(data: bytes) -> str:
    """A refusal reason for input the ``email`` parser should not be given, or ``""``."""
    starts = [m.start() for m in _CONTENT_TYPE_LINE.finditer(data)]
    if len(starts) > MAX_CONTENT_TYPES:
        return f"refused: more than {MAX_CONTENT_TYPES} Content-Type headers"
    for start in starts:
        end = start
        # The header's logical line: continuation lines start with space or tab.
        while True:
            nl = data.find(b"\n", end)
            if nl < 0 or nl + 1 >= len(data) or data[nl + 1] not in b" \t":
                end = len(data) if nl < 0 else nl
                break
            end = nl + 1
            if end - start > MAX_CONTENT_TYPE_CHARS:
                break
        if end - start > MAX_CONTENT_TYPE_CHARS:
            return f"refused: a Content-Type header longer than {MAX_CONTENT_TYPE_CHARS} characters"
    return ""


def _read(msg: Message) -> Report:
    common: dict[str, Any] = {
        "subject": _cap(_header(msg, "Subject")),
        "from_": _cap(_header(msg, "From")),
        "addressed_to": _addressed_to(msg),
    }
    if len(msg.keys()) > MAX_HEADERS:
        return Report(Kind.UNPARSED, reason=f"refused: more than {MAX_HEADERS} header fields")
    parts = list(_walk(msg, 0))
    if any(len(p.keys()) > MAX_HEADERS for p, _ in parts):
        return Report(
            Kind.UNPARSED, reason=f"refused: a part with more than {MAX_HEADERS} header fields"
        )
    original_id, original_from = _returned_headers(parts)
    report_type = (msg.get_param("report-type", "") or "") if _is_report(msg) else ""
    report_type = str(report_type).lower()
    if report_type == "feedback-report" or _find(parts, "message/feedback-report"):
        return _read_arf(parts, original_id, original_from, common)
    status_part = _find(parts, "message/delivery-status") or _find(
        parts, "message/global-delivery-status"
    )
    if status_part is not None:
        dsn = _read_dsn(status_part, original_id, original_from, common)
        if dsn.recipients:
            return dsn
    text = _read_text_bounce(msg, parts, original_id, original_from, common)
    if text is not None:
        return text
    if status_part is not None:
        return Report(
            Kind.UNPARSED,
            reason="a delivery-status part with no recipient result",
            original_message_id=original_id,
            original_envelope_from=original_from,
            **common,
        )
    return Report(
        Kind.UNPARSED,
        reason=f"not a bounce or complaint this reads ({msg.get_content_type()})",
        original_message_id=original_id,
        original_envelope_from=original_from,
        **common,
    )


def _is_report(msg: Message) -> bool:
    return msg.get_content_type() == "multipart/report"


def _walk(part: Message, depth: int) -> list[tuple[Message, int]]:
    """Parts to ``MAX_DEPTH``, each with its depth; message/rfc822 counts as a level."""
    found: list[tuple[Message, int]] = [(part, depth)]
    if depth >= MAX_DEPTH or not part.is_multipart():
        return found
    payload = part.get_payload()
    if not isinstance(payload, list):
        return found
    if part.get_content_type() in ("message/delivery-status",):
        return found  # its "parts" are field groups, read by _read_dsn
    for sub in payload:
        if isinstance(sub, Message):
            found.extend(_walk(sub, depth + 1))
    return found


def _find(parts: list[tuple[Message, int]], content_type: str) -> Message | None:
    for part, _ in parts:
        if part.get_content_type() == content_type:
            return part
    return None


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return _unfold(str(value)) if value is not None else ""


def _unfold(text: str) -> str:
    return re.sub(r"\r?\n[ \t]+", " ", text).strip()


def _cap(text: str) -> str:
    return text[:MAX_FIELD]


def _addressed_to(msg: Message) -> tuple[str, ...]:
    found: list[str] = []
    for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To"):
        for value in msg.get_all(name, [])[:10]:
            for address in _ADDRESS.findall(_unfold(str(value))[:MAX_FIELD]):
                if address not in found:
                    found.append(address)
    return tuple(found[:20])


def _text_of(part: Message) -> str:
    """A non-multipart part's text, decoded from its transfer encoding, capped."""
    if part.is_multipart():
        return ""
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = raw[: MAX_TEXT * 4].decode(charset, errors="replace")
    except LookupError:
        text = raw[: MAX_TEXT * 4].decode("utf-8", errors="replace")
    return text[:MAX_TEXT]


def _field_groups(part: Message) -> list[dict[str, str]]:
    """The field groups of a delivery-status or feedback-report part (RFC 3464 §2.1)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        # compat32 splits message/delivery-status into one Message per group.
        groups = []
        for block in payload[: MAX_RECIPIENTS + 1]:
            if isinstance(block, Message):
                groups.append({k.lower(): _cap(_unfold(str(v))) for k, v in block.items()})
        return groups
    return _blocks(_text_of(part))


def _blocks(text: str) -> list[dict[str, str]]:
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines()[:5000]:
        if not line.strip():
            if current:
                groups.append(current)
                current, last = {}, ""
            continue
        if line[0] in " \t" and last:
            current[last] = _cap(current[last] + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            continue
        last = name.strip().lower()
        current.setdefault(last, _cap(value.strip()))
    if current:
        groups.append(current)
    return groups[: MAX_RECIPIENTS + 1]


def _typed_address(value: str) -> str:
    """``rfc822; <a@b>`` → ``a@b``; ``utf-8;`` and bare addresses alike."""
    _, sep, rest = value.partition(";")
    text = rest if sep else value
    text = text.strip().strip("<>").strip()
    return text[:MAX_FIELD]


def _enhanced(text: str) -> str:
    match = _ENHANCED.search(text)
    return ".".join(match.groups()) if match else ""


def _verdict(action: str, status: str) -> Verdict:
    if action == "delayed":
        return Verdict.DELAYED
    if action in ("delivered", "relayed", "expanded"):
        return Verdict.DELIVERED
    if status.startswith("5."):
        return Verdict.HARD
    return Verdict.SOFT


def _implied_action(status: str) -> str:
    return {"5": "failed", "4": "delayed", "2": "delivered"}.get(status[:1], "")


def _read_dsn(
    part: Message,
    original_id: str,
    original_from: tuple[str, ...],
    common: dict[str, Any],
) -> Report:
    groups = _field_groups(part)
    per_message = groups[0] if groups and "final-recipient" not in groups[0] else {}
    results: list[RecipientReport] = []
    for group in groups:
        final = group.get("final-recipient", "")
        if not final:
            continue
        status = _enhanced(group.get("status", ""))
        diagnostic = group.get("diagnostic-code", "")
        _, sep, words = diagnostic.partition(";")
        diagnostic = (words if sep else diagnostic).strip()
        if not status:
            status = _enhanced(diagnostic)
        action = group.get("action", "").strip().lower().split(" ")[0]
        if action not in _ACTIONS:
            action = _implied_action(status)
        results.append(
            RecipientReport(
                address=_typed_address(final),
                verdict=_verdict(action, status),
                action=action,
                status=status,
                diagnostic=_cap(diagnostic),
                original_address=_typed_address(group.get("original-recipient", "")),
                remote_mta=_typed_address(group.get("remote-mta", "")),
            )
        )
        if len(results) >= MAX_RECIPIENTS:
            break
    for address in _ADDRESS.findall(per_message.get("x-postfix-sender", "")):
        if address not in original_from:
            original_from = (address, *original_from)
    return Report(
        Kind.DSN,
        recipients=tuple(results),
        reporting_mta=_typed_address(per_message.get("reporting-mta", "")),
        original_message_id=original_id,
        original_envelope_from=original_from,
        **common,
    )


def _read_arf(
    parts: list[tuple[Message, int]],
    original_id: str,
    original_from: tuple[str, ...],
    common: dict[str, Any],
) -> Report:
    part = _find(parts, "message/feedback-report")
    groups = _field_groups(part) if part is not None else []
    fields = groups[0] if groups else {}
    feedback_type = fields.get("feedback-type", "").strip().lower()
    envelope_from = list(original_from)
    for address in _ADDRESS.findall(fields.get("original-mail-from", "")):
        if address not in envelope_from:
            envelope_from.insert(0, address)
    recipients = _ADDRESS.findall(fields.get("original-rcpt-to", ""))
    # Original-Rcpt-To may repeat; _blocks keeps the first, so read the rest too.
    for group in groups[1:]:
        recipients.extend(_ADDRESS.findall(group.get("original-rcpt-to", "")))
    if not recipients:
        recipients = _returned_to(parts)
    # not-spam, auth-failure, dmarc...: recorded, not a complaint.
    complaint = not feedback_type or feedback_type in _COMPLAINT_TYPES
    results = tuple(
        RecipientReport(address=a, verdict=Verdict.COMPLAINT, action="complaint")
        for a in dict.fromkeys(recipients)
        if complaint
    )[:MAX_RECIPIENTS]
    return Report(
        Kind.COMPLAINT,
        recipients=results,
        feedback_type=_cap(feedback_type),
        reason="" if complaint else f"feedback type {feedback_type!r} is not a complaint",
        reporting_mta=_cap(fields.get("reporting-mta", "") or fields.get("user-agent", "")),
        original_message_id=original_id,
        original_envelope_from=tuple(envelope_from[:10]),
        **common,
    )


def _returned_parts(parts: list[tuple[Message, int]]) -> list[Message]:
    """The returned message's headers: a message/rfc822 child, or text/rfc822-headers."""
    found: list[Message] = []
    for part, _ in parts:
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found.append(payload[0])
        elif kind in ("text/rfc822-headers", "message/global-headers"):
            found.append(_PARSER.parsebytes(_text_of(part).encode("utf-8", "replace")))
    return found


def _returned_headers(parts: list[tuple[Message, int]]) -> tuple[str, tuple[str, ...]]:
    for returned in _returned_parts(parts):
        message_id = _header(returned, "Message-ID")
        return_path = tuple(_ADDRESS.findall(_header(returned, "Return-Path")))
        if message_id or return_path:
            match = re.search(r"<[^<>\s]{1,250}>", message_id)
            return (match.group(0) if match else _cap(message_id)), return_path[:2]
    return "", ()


def _returned_to(parts: list[tuple[Message, int]]) -> list[str]:
    for returned in _returned_parts(parts):
        found = _ADDRESS.findall(_header(returned, "To"))
        if found:
            return found
    return []


# Text bounces: an address, then (within this many characters) an enhanced code.
_NEAR = 600


def _read_text_bounce(
    msg: Message,
    parts: list[tuple[Message, int]],
    original_id: str,
    original_from: tuple[str, ...],
    common: dict[str, Any],
) -> Report | None:
    failed_header = [
        a for v in msg.get_all("X-Failed-Recipients", [])[:10] for a in _ADDRESS.findall(str(v))
    ]
    looks_like_bounce = bool(
        failed_header
        or _DAEMON_FROM.search(_header(msg, "From"))
        or _BOUNCE_SUBJECT.search(_header(msg, "Subject"))
        or _is_report(msg)
    )
    if not looks_like_bounce:
        return None
    text = ""
    for part, _ in parts:
        if part.get_content_type() == "text/plain":
            text = _text_of(part)
            if text.strip():
                break
    if not text.strip():
        for part, _ in parts:
            if part.get_content_type() == "text/html":
                text = re.sub(r"<[^>]{0,2000}>", " ", _text_of(part))
                text = re.sub(r"&lt;", "<", re.sub(r"&gt;", ">", text))
                break
    # The returned message is not the bounce: stop before it.
    for marker in (
        "------ This is a copy of the message",
        "----- Original message -----",
        "Original message headers:",
        "------- Returned Message --------",
        "----- Forwarded message -----",
    ):
        cut = text.find(marker)
        if cut > 0:
            text, tail = text[:cut], text[cut:]
            if not original_id:
                found = re.search(r"(?im)^message-id:[ \t]*(<[^<>\s]{1,250}>)", tail)
                original_id = found.group(1) if found else ""
            if not original_from:
                found = re.search(r"(?im)^return-path:[ \t]*<?([^<>\s]{1,320})>?", tail)
                original_from = tuple(_ADDRESS.findall(found.group(1))) if found else ()
    own = {a.lower() for a in original_from} | {
        a.lower() for a in _ADDRESS.findall(_header(msg, "From"))
    }
    candidates = list(dict.fromkeys(failed_header))
    for address in _ADDRESS.findall(text):
        if address.lower() not in own and address not in candidates:
            candidates.append(address)
    results: list[RecipientReport] = []
    for address in candidates[:MAX_RECIPIENTS]:
        status, line = _code_after(text, address)
        if not status:
            continue
        action = _implied_action(status)
        results.append(
            RecipientReport(
                address=address,
                verdict=_verdict(action, status),
                action=action,
                status=status,
                diagnostic=_cap(line),
            )
        )
    if not results:
        return None
    return Report(
        Kind.TEXT,
        recipients=tuple(results),
        original_message_id=original_id,
        original_envelope_from=original_from,
        **common,
    )


def _code_after(text: str, address: str) -> tuple[str, str]:
    """The first enhanced code within ``_NEAR`` characters after an address mention."""
    start = 0
    while True:
        at = text.find(address, start)
        if at < 0:
            return "", ""
        window = text[at + len(address) : at + len(address) + _NEAR]
        # Another address's paragraph starts: the code there is not this one's.
        nxt = next(
            (m for m in _ADDRESS.finditer(window) if m.group(0).lower() != address.lower()),
            None,
        )
        match = _ENHANCED.search(window)
        if match and (nxt is None or match.start() < nxt.start()):
            offset = at + len(address)
            line_start = text.rfind("\n", 0, offset + match.start()) + 1
            line_end = text.find("\n", offset + match.end())
            line = text[line_start : line_end if line_end >= 0 else len(text)]
            return ".".join(match.groups()), " ".join(line.split())
        start = at + len(address)
