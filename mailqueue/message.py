"""Composing a message and its envelope, refusing bad input before anything is written.

A ``Message`` says what the user wants (From, To/Cc/Bcc, subject, bodies,
attachments, headers). ``build_envelope`` turns it into what SMTP needs: the
MAIL FROM address, the de-duplicated recipients, and the RFC 5322 bytes with
CRLF line endings and **no Bcc header**. Every check that can fail does so
here, at enqueue time, with an ``InvalidMessageError`` naming the field.

Composition uses the standard library's ``email`` package, except for the
common simple message, which ``mime_direct`` writes directly (the same bytes
in meaning, about 20 times faster); address syntax is checked by
``email-validator``, with results cached per address.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.policy
import email.utils
import functools
import mimetypes
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email import errors
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.message import Message as _StdMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import cast

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, DOT_ATOM_TEXT

from .errors import InvalidMessageError
from .mime_direct import PHRASE, SMTP_7BIT, write_simple

__all__ = [
    "Attachment",
    "Message",
    "Recipient",
    "Envelope",
    "build_envelope",
    "extract_addresses",
    "validate_address",
]

# Header names we compute ourselves, or that the dedicated fields own.
_OWNED_HEADERS = {
    "from": "sender",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "sender": "sender_header",
    "subject": "subject",
    "content-type": "text/html/attachments",
    "content-transfer-encoding": "text/html/attachments",
    "mime-version": "(set automatically)",
}
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
_BCC_LINE = re.compile(rb"^(resent-)?bcc\s*:", re.IGNORECASE)
# Address strings that need no header parser: "a@b.c" and "Plain Name <a@b.c>".
_SPEC = r"[^\s<>(),;:\"@\[\]\\]+@[^\s<>(),;:\"@\[\]\\]+"
_SIMPLE_ADDRESS = re.compile(rf"\s*(?:({PHRASE}) <({_SPEC})>|({_SPEC}))\s*")

# Compose 7-bit-clean bodies (quoted-printable/base64): any relay can carry them.
_POLICY = SMTP_7BIT
_POLICY_UTF8 = email.policy.SMTPUTF8.clone(cte_type="7bit")

AddressInput = str | tuple[str, str]
Addresses = str | Sequence[AddressInput] | None


@dataclass(frozen=True, kw_only=True)
class Attachment:
    """A file carried by the message; ``inline=True`` makes it a ``cid:`` part of the HTML."""

    filename: str
    content: bytes
    content_type: str | None = None
    inline: bool = False
    content_id: str | None = None

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        inline: bool = False,
        content_id: str | None = None,
    ) -> Attachment:
        path = Path(path)
        return cls(
            filename=filename or path.name,
            content=path.read_bytes(),
            content_type=content_type,
            inline=inline,
            content_id=content_id,
        )

    @property
    def mime_type(self) -> str:
        if self.content_type:
            return self.content_type
        guessed, encoding = mimetypes.guess_type(self.filename, strict=False)
        if guessed is None or encoding is not None:
            return "application/octet-stream"
        return guessed


@dataclass(frozen=True, kw_only=True)
class Message:
    """One mail to send.

    Address fields take a string (parsed like a header, so
    ``"a@x.org, Bob <b@y.org>"`` is two addresses), a list of such strings, or
    ``(display_name, address)`` pairs. ``envelope_from``/``envelope_to`` set
    MAIL FROM / RCPT TO on their own (default: From and To+Cc+Bcc). ``eml``
    sends a ready-made RFC 5322 message (bytes, or an ``email.message.EmailMessage``
    of any nesting) as it is, apart from removing Bcc. ``text_subtype`` and
    ``charset`` set the text part's content type; ``preamble``/``epilogue``
    frame the top multipart.
    """

    sender: str | tuple[str, str] | None = None
    to: Addresses = ()
    cc: Addresses = ()
    bcc: Addresses = ()
    reply_to: Addresses = ()
    sender_header: str | tuple[str, str] | None = None
    subject: str = ""
    text: str | None = None
    html: str | None = None
    text_subtype: str = "plain"
    attachments: Sequence[Attachment] = ()
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = field(default_factory=tuple)
    charset: str = "utf-8"
    preamble: str | None = None
    epilogue: str | None = None
    envelope_from: str | None = None
    envelope_to: Addresses = None
    eml: bytes | _StdMessage | None = None


@dataclass(frozen=True)
class Recipient:
    address: str
    kind: str  # "to", "cc", "bcc"


@dataclass(frozen=True)
class Envelope:
    """What goes over SMTP: MAIL FROM, RCPT TO and the DATA bytes (CRLF, no Bcc)."""

    mail_from: str
    recipients: tuple[Recipient, ...]
    data: bytes
    subject: str
    smtputf8: bool
    eightbit: bool


# --------------------------------------------------------------------------- addresses


# CR, LF, NUL, and what Python's str.splitlines() also breaks lines at (the
# email package refuses those in headers with a bare ValueError).
_LINE_BREAKS = re.compile("[\r\n\0\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _no_newlines(value: str, field_name: str) -> None:
    if _LINE_BREAKS.search(value):
        raise InvalidMessageError(
            "contains a line break (CR/LF or another line separator) or NUL; "
            "header injection is refused",
            field=field_name,
        )


def _parse_header_addresses(value: str, field_name: str) -> list[Address]:
    """Parse an address-list header value: display names, quoted commas, groups, comments."""
    _no_newlines(value, field_name)
    header = email.policy.default.header_factory("To", value)
    defects = [d for d in header.defects if not _is_harmless(d)]
    if defects:
        raise InvalidMessageError(f"cannot parse {value!r}: {defects[0]}", field=field_name)
    return list(header.addresses)


def _is_harmless(defect: Exception) -> bool:
    # Obsolete-but-valid syntax is fine; a non-ASCII local part is a real
    # (RFC 6531) mailbox that needs SMTPUTF8, which validate_address decides.
    return isinstance(defect, errors.NonASCIILocalPartDefect) or "obsolete" in str(defect).lower()


def extract_addresses(value: str) -> list[str]:
    """Return the bare addresses in a header value, in order.

    >>> extract_addresses('you@there.com, "Bob, Jr" <bob@example.com>')
    ['you@there.com', 'bob@example.com']
    """
    return [a.addr_spec for a in _parse_header_addresses(value, "addresses") if a.addr_spec]


def validate_address(address: str, *, field_name: str = "address") -> tuple[str, bool]:
    """Check one bare address; return it normalised and whether it needs SMTPUTF8.

    Domains are IDNA-encoded when the local part is ASCII, so only genuinely
    internationalised mailboxes need the server's SMTPUTF8 extension. Special-use
    domains (``example.com``, ``.test``, ``localhost``) are allowed: they are
    what development and tests send to.
    """
    _no_newlines(address, field_name)
    normalised, needs_utf8, error = _validated(address)
    if error is not None:
        raise InvalidMessageError(f"{address!r} is not a valid address: {error}", field=field_name)
    return normalised, needs_utf8


@functools.lru_cache(maxsize=16384)
def _validated(address: str) -> tuple[str, bool, str | None]:
    """email-validator's verdict, remembered: a sender recurs in every message."""
    plain = _plain_ascii(address)
    if plain is not None:
        return plain, False, None
    return _validator_verdict(address)


def _plain_ascii(address: str) -> str | None:
    """The common address, ``dot.atom@domain`` in ASCII, decided without running the
    validator on it: its verdict splits into the local part's syntax (a regex) and
    the domain's (the validator's, remembered per domain). Recipients are mostly
    new addresses at a few domains; the full validator cost ~32 µs an address, most
    of the composition. None: ask the validator (``tests/test_message.py`` holds the
    two to the same answers)."""
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii() or not DOT_ATOM_TEXT.match(local):
        return None
    if local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:  # the validator lowercases these
        return None
    ascii_domain = _plain_domain(domain)
    if ascii_domain is None or len(local) + 1 + len(ascii_domain) > 254:
        return None
    return f"{local}@{ascii_domain}"


@functools.lru_cache(maxsize=1024)
def _plain_domain(domain: str) -> str | None:
    """The validator's ASCII form of an ASCII domain that only changes case, else None."""
    if not domain.isascii() or domain.startswith("["):
        return None
    normalised, needs_utf8, error = _validator_verdict(f"a@{domain}")
    ascii_domain = normalised.rpartition("@")[2]
    if error is not None or needs_utf8 or ascii_domain != domain.lower():
        return None
    return ascii_domain


def _validator_verdict(address: str) -> tuple[str, bool, str | None]:
    try:
        checked = validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=True,
            globally_deliverable=False,
            test_environment=True,
        )
    except EmailNotValidError as exc:
        return address, False, str(exc)
    if checked.ascii_email:
        return checked.ascii_email, False, None
    return checked.normalized, True, None


def _addresses(value: Addresses, field_name: str) -> list[Address]:
    if value is None:
        return []
    items: Iterable[AddressInput] = [value] if isinstance(value, str) else value
    result: list[Address] = []
    for item in items:
        if isinstance(item, tuple):
            name, addr = item
            _no_newlines(name, field_name)
            result.append(Address(display_name=name, addr_spec=_bare(addr, field_name)))
        elif isinstance(item, str) and (simple := _SIMPLE_ADDRESS.fullmatch(item)):
            name, named_spec, bare_spec = simple.groups()
            local, _, domain = (named_spec or bare_spec).rpartition("@")
            result.append(Address(display_name=name or "", username=local, domain=domain))
        elif isinstance(item, str):
            parsed = _parse_header_addresses(item, field_name)
            if not parsed or any(not a.addr_spec or "@" not in a.addr_spec for a in parsed):
                raise InvalidMessageError(f"{item!r} is not a valid address", field=field_name)
            result.extend(parsed)
        else:
            raise InvalidMessageError(
                f"expected a string or (name, address), got {type(item).__name__}",
                field=field_name,
            )
    return result


def _bare(addr: str, field_name: str) -> str:
    _no_newlines(addr, field_name)
    return addr.strip()


def _checked(addresses: list[Address], field_name: str) -> tuple[list[Address], bool]:
    """Validate each address; return them with normalised addr-specs and the SMTPUTF8 need."""
    out: list[Address] = []
    utf8 = False
    for a in addresses:
        normalised, needs_utf8 = validate_address(a.addr_spec, field_name=field_name)
        utf8 |= needs_utf8
        local, _, domain = normalised.rpartition("@")
        out.append(Address(display_name=a.display_name, username=local, domain=domain))
    return out, utf8


def _one_address(
    value: str | tuple[str, str] | None, field_name: str
) -> tuple[Address | None, bool]:
    if value is None or value == "":
        return None, False
    parsed = _addresses([value] if isinstance(value, tuple) else value, field_name)
    if len(parsed) != 1:
        raise InvalidMessageError("must be exactly one address", field=field_name)
    checked, utf8 = _checked(parsed, field_name)
    return checked[0], utf8


def _dedupe(groups: Iterable[tuple[str, list[Address]]]) -> tuple[Recipient, ...]:
    """One recipient per address (case-insensitive); the first kind named wins."""
    seen: set[str] = set()
    out: list[Recipient] = []
    for kind, addresses in groups:
        for a in addresses:
            key = a.addr_spec.lower()
            if key not in seen:
                seen.add(key)
                out.append(Recipient(a.addr_spec, kind))
    return tuple(out)


# --------------------------------------------------------------------------- headers


def _custom_headers(message: Message) -> list[tuple[str, str]]:
    items = (
        list(message.headers.items())
        if isinstance(message.headers, Mapping)
        else list(message.headers)
    )
    for name, value in items:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidMessageError(f"{name!r} is not a valid header name", field="headers")
        if not isinstance(value, str):
            raise InvalidMessageError(f"the value of {name} must be a string", field="headers")
        _no_newlines(value, "headers")
        owner = _OWNED_HEADERS.get(name.lower())
        if owner is not None:
            raise InvalidMessageError(
                f"{name} is set by the message itself; use {owner} instead", field="headers"
            )
    return items


# --------------------------------------------------------------------------- bodies


def _add_body(msg: EmailMessage, message: Message, later: dict[bytes, bytes]) -> None:
    """Set the bodies; attachments get a placeholder that ``_splice`` fills after serialising."""
    charset = message.charset
    inline = [a for a in message.attachments if a.inline]
    attached = [a for a in message.attachments if not a.inline]
    if inline and message.html is None:
        raise InvalidMessageError(
            "inline attachments are referenced with cid: from the HTML; there is no html",
            field="attachments",
        )
    try:
        if message.text is not None:
            msg.set_content(message.text, subtype=message.text_subtype, charset=charset)
            if message.html is not None:
                msg.add_alternative(message.html, subtype="html", charset=charset)
        elif message.html is not None:
            msg.set_content(message.html, subtype="html", charset=charset)
        else:
            msg.set_content("", charset=charset)
    except (LookupError, UnicodeError) as exc:
        raise InvalidMessageError(
            f"cannot encode the body as {charset}: {exc}", field="charset"
        ) from None

    if inline:
        html_part = msg.get_body(("html",))
        assert html_part is not None
        for a in inline:
            cid = a.content_id or a.filename
            _no_newlines(cid, "attachments")
            maintype, _, subtype = a.mime_type.partition("/")
            html_part.add_related(
                b"",
                maintype=maintype,
                subtype=subtype or "octet-stream",
                cid=f"<{cid.strip('<>')}>",
                filename=a.filename,
                disposition="inline",
            )
            _defer_payload(_last_part(html_part), a.content, later)
    for a in attached:
        _no_newlines(a.filename, "attachments")
        maintype, _, subtype = a.mime_type.partition("/")
        msg.add_attachment(
            b"", maintype=maintype, subtype=subtype or "octet-stream", filename=a.filename
        )
        _defer_payload(_last_part(msg), a.content, later)


def _last_part(msg: MIMEPart) -> EmailMessage:
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return cast(EmailMessage, parts[-1])


def _defer_payload(part: EmailMessage, content: bytes, later: dict[bytes, bytes]) -> None:
    """Put a unique token where the base64 of ``content`` goes (see ``_splice``)."""
    token = f"mailqueue-attachment-{uuid.uuid4().hex}"
    part.set_payload(token)
    later[token.encode()] = content


_B64_CHUNK = 57 * 1024  # whole 76-character lines per chunk


def _splice(data: bytes, later: dict[bytes, bytes]) -> bytes:
    """Replace each attachment token with its base64 lines (CRLF).

    The ``email`` package would hold an attachment several times over while
    it encodes and folds it (about 5.6 x its size for 25 MB); encoding here in
    chunks straight into the output keeps the peak near 2.8 x.
    """
    if not later:
        return data
    pieces: list[bytes] = []
    rest = data
    for token, content in later.items():
        head, found, rest = rest.partition(token)
        if not found:
            raise AssertionError("attachment placeholder lost while serialising")
        pieces.append(head)
        for start in range(0, len(content), _B64_CHUNK):
            chunk = base64.encodebytes(content[start : start + _B64_CHUNK])
            pieces.append(chunk.replace(b"\n", b"\r\n"))
        if content:
            pieces[-1] = pieces[-1][:-2]  # the generator already ends the part's line
    pieces.append(rest)
    return b"".join(pieces)


def _compose(message: Message) -> tuple[str, tuple[Recipient, ...], bytes, bool]:
    if message.sender is None:
        raise InvalidMessageError("a sender (From) is required", field="sender")
    sender, utf8 = _one_address(message.sender, "sender")
    assert sender is not None
    sender_header, u = _one_address(message.sender_header, "sender_header")
    utf8 |= u
    to, u1 = _checked(_addresses(message.to, "to"), "to")
    cc, u2 = _checked(_addresses(message.cc, "cc"), "cc")
    bcc, u3 = _checked(_addresses(message.bcc, "bcc"), "bcc")
    reply_to, u4 = _checked(_addresses(message.reply_to, "reply_to"), "reply_to")
    utf8 |= u1 or u2 or u3 or u4
    _no_newlines(message.subject, "subject")
    custom = _custom_headers(message)

    if message.envelope_to is not None:
        env_to, u5 = _checked(_addresses(message.envelope_to, "envelope_to"), "envelope_to")
        utf8 |= u5
        recipients = _dedupe([("to", env_to)])
    else:
        recipients = _dedupe([("to", to), ("cc", cc), ("bcc", bcc)])

    mail_from = _envelope_from(message, default=(sender_header or sender).addr_spec)
    utf8 |= not mail_from.isascii()

    names = {name.lower() for name, _ in custom}
    date = email.utils.format_datetime(dt.datetime.now(dt.UTC))
    message_id = email.utils.make_msgid(domain=sender.domain)
    if not (utf8 or message.attachments or message.preamble or message.epilogue):
        simple = write_simple(
            sender=sender,
            sender_header=sender_header,
            to=to,
            cc=cc,
            reply_to=reply_to,
            subject=message.subject,
            date=date,
            message_id=message_id,
            custom=custom,
            text=message.text,
            html=message.html,
            text_subtype=message.text_subtype,
            charset=message.charset,
        )
        if simple is not None:
            return mail_from, recipients, simple, utf8

    msg = EmailMessage(policy=_POLICY_UTF8 if utf8 else _POLICY)
    msg["From"] = sender
    if sender_header is not None:
        msg["Sender"] = sender_header
    if to:
        msg["To"] = to
    if cc:
        msg["Cc"] = cc
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = message.subject
    if "date" not in names:
        msg["Date"] = date
    if "message-id" not in names:
        msg["Message-ID"] = message_id
    for name, value in custom:
        msg[name] = value
    later: dict[bytes, bytes] = {}
    _add_body(msg, message, later)
    if message.preamble is not None or message.epilogue is not None:
        if not msg.is_multipart():
            raise InvalidMessageError(
                "a preamble or epilogue needs a multipart message (html+text or attachments)",
                field="preamble",
            )
        msg.preamble = message.preamble
        msg.epilogue = message.epilogue
    try:
        data = _splice(msg.as_bytes(policy=msg.policy), later)
    except (UnicodeError, ValueError) as exc:
        raise InvalidMessageError(f"cannot serialise the message: {exc}", field="headers") from None
    return mail_from, recipients, data, utf8


def _envelope_from(message: Message, *, default: str) -> str:
    if message.envelope_from is None:
        return default
    if message.envelope_from == "":
        return ""  # the null reverse-path, for bounces and auto-replies
    normalised, _ = validate_address(message.envelope_from, field_name="envelope_from")
    return normalised


# --------------------------------------------------------------------------- ready-made messages


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def _strip_bcc(data: bytes) -> bytes:
    """Remove Bcc and Resent-Bcc fields (and their folded lines); keep the rest as it is."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, body = data, b""
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = bool(_BCC_LINE.match(line))
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + (sep + body if sep else b"\r\n")


def _from_eml(message: Message) -> tuple[str, tuple[Recipient, ...], bytes, bool, str]:
    raw = message.eml
    if isinstance(raw, _StdMessage):
        raw = raw.as_bytes(policy=email.policy.SMTPUTF8)
    assert isinstance(raw, bytes)
    data = _crlf(raw)
    head = data.partition(b"\r\n\r\n")[0]
    # Only the header block is parsed (Bcc included): the body is sent as it is.
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n\r\n")
    data = _strip_bcc(data)
    utf8 = not head.isascii()

    def header_addresses(name: str) -> list[Address]:
        values = parsed.get_all(name) or []
        return [a for v in values for a in _parse_header_addresses(str(v), name.lower())]

    if message.envelope_to is not None:
        env_to, u = _checked(_addresses(message.envelope_to, "envelope_to"), "envelope_to")
        recipients = _dedupe([("to", env_to)])
    else:
        groups = []
        u = False
        for name in ("To", "Cc", "Bcc"):
            checked, needs = _checked(header_addresses(name), name.lower())
            u |= needs
            groups.append((name.lower(), checked))
        recipients = _dedupe(groups)
    utf8 |= u
    if message.envelope_from is not None:
        mail_from = _envelope_from(message, default="")
    else:
        senders = header_addresses("Sender") or header_addresses("From")
        if not senders:
            raise InvalidMessageError(
                "the message has no From header; pass envelope_from", field="sender"
            )
        mail_from, needs = validate_address(senders[0].addr_spec, field_name="sender")
        utf8 |= needs
    subject = str(parsed.get("Subject", ""))
    return mail_from, recipients, data, utf8, subject


# --------------------------------------------------------------------------- the envelope


def build_envelope(message: Message, *, max_size: int | None = None) -> Envelope:
    """Validate ``message`` and produce its envelope; raise ``InvalidMessageError`` if bad."""
    if message.eml is not None:
        if message.text is not None or message.html is not None or message.attachments:
            raise InvalidMessageError(
                "eml is sent as it is; do not also pass text, html or attachments", field="eml"
            )
        mail_from, recipients, data, utf8, subject = _from_eml(message)
    else:
        mail_from, recipients, data, utf8 = _compose(message)
        subject = message.subject
    if not recipients:
        raise InvalidMessageError("no recipients: give at least one To, Cc or Bcc", field="to")
    if max_size is not None and len(data) > max_size:
        raise InvalidMessageError(
            f"the message is {len(data)} bytes, over the {max_size}-byte limit "
            "(MAILQUEUE_MAX_MESSAGE_SIZE)",
            field="size",
        )
    return Envelope(
        mail_from=mail_from,
        recipients=recipients,
        data=data,
        subject=subject,
        smtputf8=utf8,
        eightbit=not data.isascii(),
    )
