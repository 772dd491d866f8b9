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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from email import errors
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.message import Message as _StdMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import cast

import idna
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES, DOT_ATOM_TEXT

from .errors import HeaderInjectionError, InvalidMessageError
from .headers import (
    HEADER_NAME,
    Field,
    address_field,
    check_block,
    refuse_controls,
    refuse_encoded_controls,
)
from .headers import read_one_mailbox as _read_one_mailbox
from .headers import text_field as _text_field
from .mime_direct import SMTP_7BIT, write_simple

__all__ = [
    "Attachment",
    "Message",
    "Recipient",
    "Envelope",
    "Limits",
    "build_envelope",
    "extract_addresses",
    "one_address",
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
_BCC_LINE = re.compile(rb"^(resent-)?bcc\s*:", re.IGNORECASE)
# RFC 2045 token (a MIME type's halves, a charset): no space, control or tspecial.
_TOKEN = r"[!#$%&'*+.^_`{|}~0-9A-Za-z-]{1,127}"
_MIME_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
_CHARSET = re.compile(_TOKEN)
_CONTENT_ID = re.compile(r"[!-;=?-~]{1,250}")  # printable ASCII, no space, '<' or '>'
_MIME_FIELDS = ("MIME-Version", "Content-Type", "Content-Transfer-Encoding")

# Compose 7-bit-clean bodies (quoted-printable/base64): any relay can carry them.
_POLICY = SMTP_7BIT

AddressInput = str | tuple[str, str] | Address
Addresses = str | Address | Sequence[AddressInput] | None


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one message may hold; each is a setting (docs/security.md).

    The defaults are generous for real mail and small enough that a hostile
    request is refused before any work grows with it.
    """

    max_header_length: int = 8192
    """Characters in one header value, display name or file name (MAILQUEUE_MAX_HEADER_LENGTH)."""
    max_headers: int = 100
    """Custom header fields in one message (MAILQUEUE_MAX_HEADERS)."""
    max_header_block: int = 102400
    """Bytes in the finished top header block; Postfix's header_size_limit
    (MAILQUEUE_MAX_HEADER_BLOCK)."""
    max_recipients: int = 1000
    """Address entries in To+Cc+Bcc (or envelope_to), and in Reply-To; Postfix's
    smtpd_recipient_limit (MAILQUEUE_MAX_RECIPIENTS)."""


DEFAULT_LIMITS = Limits()


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


def header_text(
    value: object, field_name: str, limits: Limits = DEFAULT_LIMITS, *, what: str = "a string"
) -> str:
    """A string bound for a header: typed, bounded, and free of control characters."""
    if not isinstance(value, str):
        raise InvalidMessageError(f"expected {what}, got {type(value).__name__}", field=field_name)
    if len(value) > limits.max_header_length:
        raise InvalidMessageError(
            f"is {len(value)} characters, over the {limits.max_header_length}-character limit "
            "(MAILQUEUE_MAX_HEADER_LENGTH)",
            field=field_name,
        )
    refuse_controls(value, field_name)
    return value


def too_many(count: int, limit: int, things: str, setting: str, field: str) -> InvalidMessageError:
    """The refusal of ``count`` ``things`` where ``limit`` is allowed (one wording everywhere)."""
    return InvalidMessageError(
        f"{count} {things}, over the limit of {limit} (MAILQUEUE_{setting})", field=field
    )


def mime_type(value: object, field_name: str) -> str:
    """``value`` checked as a MIME type ``type/subtype`` (RFC 2045 tokens, no parameters)."""
    if not isinstance(value, str) or not _MIME_TYPE.fullmatch(value):
        raise InvalidMessageError(
            f"{value!r} is not a MIME type such as 'image/png' (no parameters)", field=field_name
        )
    return value


def mime_token(value: object, field_name: str) -> str:
    """``value`` checked as one RFC 2045 token: a subtype or a charset name."""
    if not isinstance(value, str) or not _CHARSET.fullmatch(value):
        raise InvalidMessageError(f"{value!r} is not a MIME token", field=field_name)
    return value


def _parse_header_addresses(value: str, field_name: str) -> list[Address]:
    """Parse an address-list header value: display names, quoted commas, groups, comments."""
    refuse_controls(value, field_name)
    try:
        header = email.policy.default.header_factory("To", value)
        defects = [d for d in header.defects if not _is_harmless(d)]
        addresses = list(header.addresses)
    except Exception as exc:  # noqa: BLE001 - the parser's own bugs (IndexError…) are bad input
        raise InvalidMessageError(f"cannot parse {value!r}: {exc}", field=field_name) from None
    if defects:
        raise InvalidMessageError(f"cannot parse {value!r}: {defects[0]}", field=field_name)
    return addresses


def _is_harmless(defect: Exception) -> bool:
    # Obsolete-but-valid syntax is fine; a non-ASCII local part is a real
    # (RFC 6531) mailbox that needs SMTPUTF8, which validate_address decides;
    # so is a bare name where bare names are allowed (validate_address again).
    return (
        isinstance(defect, errors.NonASCIILocalPartDefect)
        or "obsolete" in str(defect).lower()
        or (_BARE_NAMES.get() and str(defect) == "addr-spec local part with no domain")
    )


_BARE_NAMES: ContextVar[bool] = ContextVar("mailqueue_bare_names", default=False)


@contextmanager
def bare_names_allowed() -> Iterator[None]:
    """Within this block an address with no domain (``"webmaster"``) is taken as it is.

    For the Django backend, whose SMTP counterpart hands such a name to its
    relay to qualify (Django tickets #15042, #24416); the relay then takes it
    (Postfix appends ``$myorigin``) or refuses it, per recipient. Only a plain
    ASCII dot-atom of at most 64 characters counts as a bare name; everything
    else about the address is checked as usual. Elsewhere a bare name is refused.
    """
    token = _BARE_NAMES.set(True)
    try:
        yield
    finally:
        _BARE_NAMES.reset(token)


def _is_bare_name(address: str) -> bool:
    return (
        _BARE_NAMES.get()
        and address.isascii()
        and 0 < len(address) <= 64
        and DOT_ATOM_TEXT.match(address) is not None
    )


def extract_addresses(value: str) -> list[str]:
    """Return the bare addresses in a header value, in order.

    The one place where a string is split into several addresses: every
    address field of a ``Message`` takes exactly one address per entry.

    >>> extract_addresses('you@there.com, "Bob, Jr" <bob@example.com>')
    ['you@there.com', 'bob@example.com']
    """
    return [a.addr_spec for a in _parse_header_addresses(value, "addresses") if a.addr_spec]


def one_address(value: AddressInput, *, field_name: str = "address") -> str:
    """The one address in ``value`` (``"a@x.org"``, ``"Name <a@x.org>"`` or a pair),
    validated and normalised; a value holding none or several is refused."""
    (address,) = _addresses([value], field_name)
    return validate_address(address.addr_spec, field_name=field_name)[0]


def validate_address(address: str, *, field_name: str = "address") -> tuple[str, bool]:
    """Check one bare address; return it normalised and whether it needs SMTPUTF8.

    Domains are IDNA-encoded when the local part is ASCII, so only genuinely
    internationalised mailboxes need the server's SMTPUTF8 extension. Special-use
    domains (``example.com``, ``.test``, ``localhost``, ``.local``…) and address
    literals (``a@[127.0.0.1]``) are allowed: they are what development, tests
    and Django's default senders use, and the relay decides whether it takes them.
    """
    if not isinstance(address, str):
        raise InvalidMessageError(
            f"expected an address string, got {type(address).__name__}", field=field_name
        )
    refuse_controls(address, field_name)
    if "@" not in address and _is_bare_name(address):
        return address, False
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


# Special-use names (RFC 6761) email-validator refuses outright; a relay can take them
# (Django's defaults are webmaster@localhost and root@localhost), so mailqueue does.
_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES) - {"test"}  # .test: test_environment


def _validator_verdict(address: str) -> tuple[str, bool, str | None]:
    """email-validator's verdict, special-use domains and address literals accepted.

    A domain under a special-use name (``localhost``, ``x.local``…) is checked
    with that last label replaced by an ordinary one of the same length (so
    every length rule holds as for the real name), then given it back.
    """
    local, at, domain = address.rpartition("@")
    labels = domain.split(".")
    special = labels[-1].lower()
    if not at or special not in _SPECIAL_USE:
        return _validator_verdict_as_is(address)
    stand_in = ".".join([*labels[:-1], "x" * len(special)])
    normalised, needs_utf8, error = _validator_verdict_as_is(f"{local}@{stand_in}")
    if error is not None:
        return address, False, error
    checked_local, _, checked_domain = normalised.rpartition("@")
    own = ".".join([*checked_domain.split(".")[:-1], special])
    return f"{checked_local}@{own}", needs_utf8, None


_JOINERS = frozenset("\u200c\u200d")  # ZERO WIDTH NON-JOINER, ZERO WIDTH JOINER


def _validator_verdict_as_is(address: str) -> tuple[str, bool, str | None]:
    normalised, needs_utf8, error = _validator_verdict_plain(address)
    if error is not None and "ZERO WIDTH" in error:
        return _joiner_verdict(address) or (normalised, needs_utf8, error)
    return normalised, needs_utf8, error


def _joiner_verdict(address: str) -> tuple[str, bool, str | None] | None:
    """An IDNA 2008 domain with ZERO WIDTH (NON-)JOINER, as Django's own tests send
    (``xn--10cl1a0b660p``, Sinhala; ``xn--mgba3gch31f060k``, Persian).

    email-validator refuses the two characters anywhere as unsafe to display;
    in a domain label IDNA 2008 allows them where its CONTEXTJ rules do (RFC
    5892 A.1, A.2: after a virama, or between joining letters), which the
    ``idna`` package checks. Such a label is taken in its ASCII (``xn--``) form,
    never IDNA 2003's (which drops the joiner: another domain); the rest of the
    address is checked by the validator with that label replaced by an
    ordinary one of the same length. None: not that case.
    """
    local, at, domain = address.rpartition("@")
    if not at or domain.startswith("["):
        return None
    given: list[str] = []
    stand_in: list[str] = []
    for label in domain.split("."):
        try:
            text = idna.decode(label) if label.isascii() else label
            if _JOINERS.isdisjoint(text):
                given.append(label)
                stand_in.append(label)
                continue
            ascii_label = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
        given.append(ascii_label)
        stand_in.append("x" * len(ascii_label))
    if given == stand_in:
        return None
    normalised, needs_utf8, error = _validator_verdict_plain(f"{local}@{'.'.join(stand_in)}")
    if error is not None:
        return address, False, error
    checked_local, _, checked_domain = normalised.rpartition("@")
    labels = [
        checked if mine == stand else mine
        for mine, stand, checked in zip(given, stand_in, checked_domain.split("."), strict=True)
    ]
    return f"{checked_local}@{'.'.join(labels)}", needs_utf8, None


def _validator_verdict_plain(address: str) -> tuple[str, bool, str | None]:
    try:
        checked = validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_domain_literal=True,
            globally_deliverable=False,
            test_environment=True,
        )
    except EmailNotValidError as exc:
        return address, False, str(exc)
    if checked.ascii_email:
        return checked.ascii_email, False, None
    return checked.normalized, True, None


def _entries(value: Addresses, field_name: str) -> list[AddressInput]:
    if value is None:
        return []
    if isinstance(value, (str, Address)):
        return [value]  # a bare entry: still exactly one address
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidMessageError(
            f"expected an address or a list of addresses, got {type(value).__name__}",
            field=field_name,
        )
    return list(value)


def _addresses(value: Addresses, field_name: str, limits: Limits = DEFAULT_LIMITS) -> list[Address]:
    """One ``Address`` per entry; an entry holding several addresses is refused.

    A string such as ``"a@x.org, b@y.org"`` is one entry with two addresses: it
    is refused, never split, so an input field cannot add a recipient. Split a
    header string on purpose with :func:`extract_addresses`.
    """
    entries = _entries(value, field_name)
    if len(entries) > limits.max_recipients:
        raise too_many(
            len(entries), limits.max_recipients, "addresses", "MAX_RECIPIENTS", field_name
        )
    return [_one_entry(item, field_name, limits) for item in entries]


def _one_entry(item: object, field_name: str, limits: Limits) -> Address:
    if isinstance(item, Address):
        item = (item.display_name, item.addr_spec)
    if isinstance(item, tuple):
        if len(item) != 2:
            raise InvalidMessageError(
                f"expected (display name, address), got a tuple of {len(item)}", field=field_name
            )
        name = header_text(item[0], field_name, limits, what="a display name string")
        addr = header_text(item[1], field_name, limits, what="an address string").strip()
        if not _is_one_spec(addr):
            raise InvalidMessageError(
                f"{addr!r} is not one bare address (name@domain)", field=field_name
            )
        return _address(name, addr, field_name)
    item = header_text(item, field_name, limits, what="an address string or (name, address)")
    name, spec = _entry_parts(item, field_name)
    if name:
        header_text(name, field_name, limits)  # what an encoded word decoded to
    return _address(name, spec, field_name)


@functools.lru_cache(maxsize=16384)
def _entry_parts(item: str, field_name: str) -> tuple[str, str]:
    """(display name, address) of a one-address string, remembered: a sender recurs."""
    plain = _read_one_mailbox(item.strip())
    if plain is not None:
        return plain
    parsed = _parse_header_addresses(item, field_name)
    if len(parsed) != 1:
        raise InvalidMessageError(
            f"{item!r} holds {len(parsed)} addresses; give one address per entry "
            "(split a header string with mailqueue.extract_addresses)",
            field=field_name,
        )
    (one,) = parsed
    if not one.addr_spec or ("@" not in one.addr_spec and not _is_bare_name(one.addr_spec)):
        raise InvalidMessageError(f"{item!r} is not a valid address", field=field_name)
    return one.display_name, one.addr_spec


def _is_one_spec(addr: str) -> bool:
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain) and not any(c in addr for c in ' ,;<>()"\\\t')


def _address(name: str, spec: str, field_name: str) -> Address:
    if "@" not in spec and _is_bare_name(spec):  # (the gate: _entry_parts remembers)
        return Address(display_name=name, username=spec, domain="")
    if "@" not in spec:
        raise InvalidMessageError(
            f"{spec!r} has no domain: give a full address (name@domain)", field=field_name
        )
    local, _, domain = spec.rpartition("@")
    if not local or not domain:
        raise InvalidMessageError(f"{spec!r} is not a valid address", field=field_name)
    return Address(display_name=name, username=local, domain=domain)


def _checked(addresses: list[Address], field_name: str) -> tuple[list[Address], bool]:
    """Validate each address; return them with normalised addr-specs and the SMTPUTF8 need."""
    out: list[Address] = []
    utf8 = False
    for a in addresses:
        normalised, needs_utf8 = validate_address(a.addr_spec, field_name=field_name)
        utf8 |= needs_utf8
        local, at, domain = normalised.rpartition("@")
        if not at:  # a bare name (bare_names_allowed)
            local, domain = normalised, ""
        out.append(Address(display_name=a.display_name, username=local, domain=domain))
    return out, utf8


def _one_address(
    value: str | tuple[str, str] | None, field_name: str, limits: Limits = DEFAULT_LIMITS
) -> tuple[Address | None, bool]:
    if value is None or value == "":
        return None, False
    parsed = _addresses([value] if isinstance(value, tuple) else value, field_name, limits)
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


def _custom_headers(message: Message, limits: Limits) -> list[tuple[str, str]]:
    headers = message.headers
    if isinstance(headers, Mapping):
        items = list(headers.items())
    elif isinstance(headers, (str, bytes)) or not isinstance(headers, Iterable):
        raise InvalidMessageError(
            "expected a mapping or a list of (name, value) pairs", field="headers"
        )
    else:
        items = list(headers)
    out = header_fields(items, limits)
    for name, _ in out:
        owner = _OWNED_HEADERS.get(name.lower())
        if owner is not None:
            raise InvalidMessageError(
                f"{name} is set by the message itself; use {owner} instead", field="headers"
            )
    return out


def header_fields(
    items: Sequence[object], limits: Limits = DEFAULT_LIMITS
) -> list[tuple[str, str]]:
    """Custom header fields checked: how many, each name whole, each value as header text."""
    if len(items) > limits.max_headers:
        raise too_many(len(items), limits.max_headers, "headers", "MAX_HEADERS", "headers")
    out: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidMessageError("expected (name, value) pairs", field="headers")
        name, value = item
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise InvalidMessageError(f"{name!r} is not a valid header name", field="headers")
        try:
            header_text(value, "headers", limits)
        except InvalidMessageError as exc:
            raise type(exc)(f"{name}: {exc.reason}", field="headers") from None
        out.append((name, value))
    return out


def _checked_body_fields(message: Message, limits: Limits) -> None:
    """The values that reach a MIME part's header or body, checked before composing."""
    for name in ("text", "html", "preamble", "epilogue"):
        value = getattr(message, name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidMessageError(f"expected a string, got {type(value).__name__}", field=name)
        if "\0" in value:
            raise InvalidMessageError("contains NUL, which no mail body may carry", field=name)
    if not isinstance(message.text_subtype, str) or not _CHARSET.fullmatch(message.text_subtype):
        raise InvalidMessageError(
            f"{message.text_subtype!r} is not a MIME subtype", field="text_subtype"
        )
    if not isinstance(message.charset, str) or not _CHARSET.fullmatch(message.charset):
        raise InvalidMessageError(f"{message.charset!r} is not a charset name", field="charset")
    if not message.attachments:
        return
    if isinstance(message.attachments, (str, bytes)) or not isinstance(
        message.attachments, Iterable
    ):
        raise InvalidMessageError("expected a list of Attachment", field="attachments")
    for a in message.attachments:
        if not isinstance(a, Attachment):
            raise InvalidMessageError(
                f"expected Attachment, got {type(a).__name__}", field="attachments"
            )
        header_text(a.filename, "attachments", limits, what="a file name string")
        if not isinstance(a.content, (bytes, bytearray, memoryview)):
            raise InvalidMessageError(
                f"{a.filename!r}: content must be bytes, got {type(a.content).__name__}",
                field="attachments",
            )
        if a.content_type is not None:
            ctype = header_text(a.content_type, "attachments", limits)
            if not _MIME_TYPE.fullmatch(ctype):
                raise InvalidMessageError(
                    f"{ctype!r} is not a MIME type such as 'image/png' (no parameters)",
                    field="attachments",
                )
        if a.inline:
            cid = (a.content_id or a.filename).strip("<>")
            if not _CONTENT_ID.fullmatch(cid):
                raise InvalidMessageError(
                    f"{cid!r} cannot be a Content-ID: printable ASCII without spaces or <>, "
                    "up to 250 characters (pass content_id=)",
                    field="attachments",
                )


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


def _compose(message: Message, limits: Limits) -> tuple[str, tuple[Recipient, ...], bytes, bool]:
    if message.sender is None or message.sender == "":
        raise InvalidMessageError("a sender (From) is required", field="sender")
    _check_recipient_count(message, limits)
    sender, utf8 = _one_address(message.sender, "sender", limits)
    assert sender is not None
    sender_header, u = _one_address(message.sender_header, "sender_header", limits)
    utf8 |= u
    to, u1 = _checked(_addresses(message.to, "to", limits), "to")
    cc, u2 = _checked(_addresses(message.cc, "cc", limits), "cc")
    bcc, u3 = _checked(_addresses(message.bcc, "bcc", limits), "bcc")
    reply_to, u4 = _checked(_addresses(message.reply_to, "reply_to", limits), "reply_to")
    utf8 |= u1 or u2 or u3 or u4
    subject = header_text(message.subject, "subject", limits)
    custom = _custom_headers(message, limits)
    _checked_body_fields(message, limits)

    if message.envelope_to is not None:
        env_to, u5 = _checked(_addresses(message.envelope_to, "envelope_to", limits), "envelope_to")
        utf8 |= u5
        recipients = _dedupe([("to", env_to)])
    else:
        recipients = _dedupe([("to", to), ("cc", cc), ("bcc", bcc)])

    mail_from = _envelope_from(message, default=(sender_header or sender).addr_spec)
    utf8 |= not mail_from.isascii()

    names = {name.lower() for name, _ in custom}
    fields = [Field("From", addresses=(sender,))]
    if sender_header is not None:
        fields.append(Field("Sender", addresses=(sender_header,)))
    fields += [
        Field(name, addresses=tuple(group))
        for name, group in (("To", to), ("Cc", cc), ("Reply-To", reply_to))
        if group
    ]
    if subject:  # no subject, no Subject field (as Flask-Mail and most clients write it)
        fields.append(Field("Subject", text=subject))
    if "date" not in names:
        fields.append(Field("Date", text=_date_now()))
    if "message-id" not in names:
        fields.append(Field("Message-ID", text=email.utils.make_msgid(domain=sender.domain)))
    fields += [Field(name, text=value) for name, value in custom]
    head = "\r\n".join(
        address_field(f.name, f.addresses)
        if f.addresses is not None
        else _text_field(f.name, f.text)
        for f in fields
    )

    body = _body_bytes(message)
    mime_head = body.partition(b"\r\n\r\n")[0].decode("ascii")
    mime_names = [name for name, _ in _raw_fields(mime_head)]
    # The finished block, read back: exactly the fields composed, then MIME's own.
    check_block(
        head + "\r\n" + mime_head, fields, then=mime_names, max_bytes=limits.max_header_block
    )
    lowered = sorted(n.lower() for n in mime_names)
    if lowered not in _MIME_SETS:
        raise InvalidMessageError(
            f"the body writer produced the fields {mime_names}", field="headers"
        )
    return mail_from, recipients, head.encode("utf-8") + b"\r\n" + body, utf8


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """The Date field's text, formatted once a second (it names whole seconds)."""
    global _date_cache
    now = dt.datetime.now(dt.UTC)
    second = int(now.timestamp())
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.format_datetime(now.replace(microsecond=0)))
    return _date_cache[1]


def _write_field(f: Field) -> str:
    if f.addresses is not None:
        return address_field(f.name, f.addresses)
    return _text_field(f.name, f.text)


# The top-level MIME fields the body writer adds, in whatever order it writes them.
_MIME_SETS = [
    sorted(n.lower() for n in _MIME_FIELDS),
    sorted(n.lower() for n in _MIME_FIELDS[:2]),
]


def _check_recipient_count(message: Message, limits: Limits) -> None:
    """Bound the work before any address is parsed (a list of 10^6 is refused at once)."""
    groups = (
        (message.envelope_to,)
        if message.envelope_to is not None
        else (message.to, message.cc, message.bcc)
    )
    total = sum(
        len(g) if isinstance(g, Sequence) and not isinstance(g, str) else 1 for g in groups if g
    )
    if total > limits.max_recipients:
        raise too_many(total, limits.max_recipients, "recipients", "MAX_RECIPIENTS", "to")


def _body_bytes(message: Message) -> bytes:
    """The MIME part: ``MIME-Version``, ``Content-Type``… and the body, CRLF throughout."""
    if not (message.attachments or message.preamble or message.epilogue):
        simple = write_simple(
            text=message.text,
            html=message.html,
            text_subtype=message.text_subtype,
            charset=message.charset,
        )
        if simple is not None:
            return simple
    msg = EmailMessage(policy=_POLICY)
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
        data = msg.as_bytes(policy=msg.policy)
    except (UnicodeError, ValueError) as exc:
        raise InvalidMessageError(f"cannot serialise the message: {exc}", field="headers") from None
    _check_parts(data, message)
    return _splice(data, later)


_PART_FIELDS = frozenset(
    {
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "mime-version",
    }
)


def _check_parts(data: bytes, message: Message) -> None:
    """Each MIME part holds only MIME fields, and the leaves are the bodies and files given.

    Read while the attachments are still short placeholders, so it costs little.
    """
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    leaves = 0
    for part in parsed.walk():
        names = {name.lower() for name in part}
        if not names <= _PART_FIELDS:
            raise InvalidMessageError(
                f"a MIME part came out with the fields {sorted(names - _PART_FIELDS)}",
                field="attachments",
            )
        for _, value in part.items():
            refuse_controls(str(value).replace("\r\n", "").replace("\n", ""), "attachments")
        leaves += not part.is_multipart()
    bodies = (message.text is not None) + (message.html is not None) or 1
    if leaves != bodies + len(message.attachments):
        raise InvalidMessageError(
            f"the message came out with {leaves} parts, not {bodies + len(message.attachments)}",
            field="attachments",
        )


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


def _from_eml(
    message: Message, limits: Limits
) -> tuple[str, tuple[Recipient, ...], bytes, bool, str]:
    raw = message.eml
    if isinstance(raw, _StdMessage):
        data, parsed = _serialize_checked(raw, limits)
    elif isinstance(raw, (bytes, bytearray)):
        data = _crlf(bytes(raw))
        head = data.partition(b"\r\n\r\n")[0]
        if len(head) > limits.max_header_block:
            raise InvalidMessageError(
                f"the header block is {len(head)} bytes, over the {limits.max_header_block}-byte "
                "limit (MAILQUEUE_MAX_HEADER_BLOCK)",
                field="headers",
            )
        unfolded = _FOLD.sub(b" ", head).decode("utf-8", "surrogateescape")
        for line in unfolded.split("\r\n"):
            if "\r" in line or "\0" in line:
                raise HeaderInjectionError("a bare CR or NUL in the header block", field="eml")
            refuse_encoded_controls(line, "eml")
        # Only the header block is parsed (Bcc included): the body is sent as it is.
        parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\r\n\r\n")
    else:
        raise InvalidMessageError(
            f"expected bytes or an email.message.Message, got {type(raw).__name__}", field="eml"
        )
    head = data.partition(b"\r\n\r\n")[0]
    data = _strip_bcc(data)
    utf8 = not head.isascii()

    def header_addresses(name: str) -> list[Address]:
        return [a for v in parsed.get_all(name) or [] for a in _header_object_addresses(v, name)]

    groups = []
    u = False
    for name in ("To", "Cc", "Bcc"):
        checked, needs = _checked(header_addresses(name), name.lower())
        u |= needs
        groups.append((name.lower(), checked))
    if message.envelope_to is not None:
        # The caller's envelope; each recipient keeps the kind its header gives it.
        env_to, u = _checked(_addresses(message.envelope_to, "envelope_to", limits), "envelope_to")
        kinds = {r.address.lower(): r.kind for r in _dedupe(groups)}
        recipients = tuple(
            Recipient(r.address, kinds.get(r.address.lower(), "to"))
            for r in _dedupe([("to", env_to)])
        )
    else:
        recipients = _dedupe(groups)
    if len(recipients) > limits.max_recipients:
        raise too_many(len(recipients), limits.max_recipients, "recipients", "MAX_RECIPIENTS", "to")
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


_FOLD = re.compile(rb"\r\n(?=[ \t])")
_FOLD_STR = re.compile(r"\r?\n(?=[ \t])")
_ADDRESS_FIELDS = frozenset({"from", "sender", "to", "cc", "bcc", "reply-to"})


def _header_object_addresses(value: object, name: str) -> list[Address]:
    """The addresses of one header as parsed: never re-parsed from its decoded text.

    (Decoding first would let an encoded word in a display name, such as
    ``=?utf-8?q?evil=40attacker.test=2C?=``, become an address of its own.)
    """
    addresses = getattr(value, "addresses", None)
    if addresses is not None:
        # (an item set as a plain string in a list stays a string in the header object)
        return [
            found
            for item in addresses
            for found in (
                [item] if isinstance(item, Address) else _parse_header_addresses(str(item), name)
            )
        ]
    if isinstance(value, Header):
        value = value.encode()  # compat32's Header: its encoded form, as it is written
    return _parse_header_addresses(_FOLD_STR.sub("", str(value)), name.lower())


def _serialize_checked(obj: _StdMessage, limits: Limits) -> tuple[bytes, _StdMessage]:
    """An ``email`` message object as bytes, with its address fields written by mailqueue.

    The object's own headers are the input: each value is checked for control
    characters; its address fields are taken as parsed before serialising and
    written here (the ``email`` package's folding can split a quoted display
    name into two addresses, gh-80222); the finished block is then read back
    and must hold exactly the object's fields.
    """
    fields: list[Field] = []
    for name, value in obj.items():
        text = value.encode() if isinstance(value, Header) else str(value)
        text = _FOLD_STR.sub("", text)
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise InvalidMessageError(f"{name!r} is not a valid header name", field="headers")
        if len(text) > limits.max_header_block:
            raise InvalidMessageError(
                f"{name} is over the {limits.max_header_block}-byte header block limit",
                field=name.lower(),
            )
        refuse_controls(text.replace("\t", " "), name.lower())
        found = _header_object_addresses(value, name) if name.lower() in _ADDRESS_FIELDS else []
        if found:  # (an empty group, "undisclosed-recipients:;", is kept as written)
            for a in found:
                header_text(a.display_name, name.lower(), limits)
            fields.append(Field(name, addresses=tuple(found)))
        else:
            fields.append(Field(name))
    for part in obj.walk():
        if part is obj:
            continue
        for _name, value in part.items():
            text = value.encode() if isinstance(value, Header) else str(value)
            refuse_controls(_FOLD_STR.sub("", text).replace("\t", " "), "attachments")
    try:
        data = _crlf(_as_bytes(obj))
    except (UnicodeError, ValueError, LookupError, AttributeError, TypeError) as exc:
        raise InvalidMessageError(f"cannot serialise the message: {exc}", field="eml") from None
    head, sep, body = data.partition(b"\r\n\r\n")
    raw_fields = _raw_fields(head.decode("utf-8", "surrogateescape"))
    if len(raw_fields) != len(fields):
        check_block(head.decode("utf-8", "surrogateescape"), fields)  # raises, naming the change
    # Names written as the object's own policy would (Django 5.2's SafeMIME: compat32).
    whole_names = not isinstance(getattr(obj, "policy", None), email.policy.EmailPolicy)
    rewritten = [
        address_field(name, f.addresses, whole_names=whole_names)
        if f.addresses is not None
        else raw
        for (name, raw), f in zip(raw_fields, fields, strict=True)
    ]
    new_head = "\r\n".join(rewritten)
    check_block(new_head, fields, max_bytes=limits.max_header_block)
    data = new_head.encode("utf-8", "surrogateescape") + sep + body
    return data, obj


def _as_bytes(obj: _StdMessage) -> bytes:
    try:
        return obj.as_bytes(policy=email.policy.SMTPUTF8)
    except TypeError as exc:
        if "policy" not in str(exc):
            raise
        return obj.as_bytes()  # Django 5.2's SafeMIME classes: their own (compat32) generator


def _raw_fields(head: str) -> list[tuple[str, str]]:
    """(name, the field's lines as written) for each field of a header block."""
    out: list[list[str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1][1] += "\r\n" + line
        else:
            out.append([line.partition(":")[0], line])
    return [(name, raw) for name, raw in out]


# --------------------------------------------------------------------------- the envelope


def build_envelope(
    message: Message, *, max_size: int | None = None, limits: Limits = DEFAULT_LIMITS
) -> Envelope:
    """Validate ``message`` and produce its envelope; raise ``InvalidMessageError`` if bad."""
    if not isinstance(message, Message):
        raise InvalidMessageError(
            f"expected a mailqueue.Message, got {type(message).__name__}", field="message"
        )
    if message.eml is not None:
        if message.text is not None or message.html is not None or message.attachments:
            raise InvalidMessageError(
                "eml is sent as it is; do not also pass text, html or attachments", field="eml"
            )
        mail_from, recipients, data, utf8, subject = _from_eml(message, limits)
    else:
        mail_from, recipients, data, utf8 = _compose(message, limits)
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
