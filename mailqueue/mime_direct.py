"""Write the common simple message's RFC 5322 bytes directly, without ``email`` objects.

Composing with the standard library's ``email`` package costs about a
millisecond a message (header objects, addresses parsed back, folding): most
of what ``enqueue_many`` spent. Most application mail is simple: plain
addresses, an ASCII subject and headers that fit on one line, a text and/or
HTML body, no attachments. For exactly that, :func:`write_simple` writes the
bytes the ``email`` package would mean, in a few microseconds; for anything
else it returns ``None`` and ``message.py`` composes with ``email`` as
before. ``tests/test_mime_direct.py`` parses the output of both writers with
``email`` and requires the same headers and bodies.
"""

from __future__ import annotations

import email.contentmanager
import email.policy
import random
import re
from collections.abc import Callable, Sequence
from email.header import Header
from email.headerregistry import Address, HeaderRegistry

__all__ = ["write_simple"]

_MAX_LINE = 78  # what email.policy.SMTP folds at
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext
PHRASE = rf"{ATEXT}(?: {ATEXT})*"  # a display name that needs no quoting
_PHRASE = re.compile(PHRASE)
_DOT_ATOM = re.compile(rf"{ATEXT}(?:\.{ATEXT})*")
_PRINTABLE = re.compile(r"[ -~]*")  # printable ASCII and space, nothing else
_NEWLINE = re.compile(r"\r\n|\r|\n")  # as email.generator splits lines
# Composed bodies are 7-bit clean (quoted-printable/base64): any relay carries them.
SMTP_7BIT = email.policy.SMTP.clone(cte_type="7bit")
# What EmailMessage.set_content calls for text (private, stable since 3.6).
_encode_text: Callable[..., tuple[str, str]] = email.contentmanager._encode_text  # type: ignore[attr-defined]
# Headers the email package parses and may rewrite; they take the slow path.
_STRUCTURED = frozenset(HeaderRegistry().registry)


def _address(a: Address) -> str | None:
    local, domain = a.username, a.domain
    if not (local.isascii() and domain.isascii() and _DOT_ATOM.fullmatch(local)):
        return None
    if not _DOT_ATOM.fullmatch(domain):
        return None
    spec = f"{local}@{domain}"
    if not a.display_name:
        return spec
    if not _PHRASE.fullmatch(a.display_name):
        return None
    return f"{a.display_name} <{spec}>"


def _address_line(name: str, addresses: Sequence[Address]) -> str | None:
    """``Name: a, b, c`` folded after a comma before 78 characters, as ``email`` does."""
    texts = [_address(a) for a in addresses]
    if any(t is None for t in texts):
        return None
    pieces = [f"{t}," for t in texts[:-1]] + [str(texts[-1])]
    lines: list[str] = []
    line = f"{name}:"
    for piece in pieces:
        if line != f"{name}:" and len(line) + 1 + len(piece) > _MAX_LINE:
            lines.append(line)
            line = " " + piece
        else:
            line = f"{line} {piece}"
        if len(line) > _MAX_LINE:
            return None
    lines.append(line)
    return "\r\n".join(lines)


def _unstructured_line(name: str, value: str) -> str | None:
    """``Name: value``; a non-ASCII value as RFC 2047 encoded words, folded."""
    if name.lower() in _STRUCTURED and name.lower() != "subject":
        return None
    if "=?" in value or value != value.strip() or "  " in value:
        return None
    if _PRINTABLE.fullmatch(value):
        line = f"{name}: {value}"
        return line if len(line) <= _MAX_LINE else None
    if not value.isprintable():  # control characters: let the email package judge
        return None
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {encoded}"


def _body(text: str) -> tuple[str, bytes] | None:
    """(Content-Transfer-Encoding, CRLF body): the ``email`` package's own choice.

    ``_encode_text`` is what ``set_content`` calls for text; using it keeps
    the choice of 7bit, quoted-printable or base64 identical, and costs a
    fraction of building the message objects around it.
    """
    if "\0" in text:
        return None
    try:
        cte, data = _encode_text(text, "utf-8", None, SMTP_7BIT)
    except Exception:  # noqa: BLE001 - anything unusual: let the email package decide
        return None
    return cte, _NEWLINE.sub("\r\n", data).encode("ascii")


def _part_head(subtype: str, cte: str) -> str:
    return f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}'


def write_simple(
    *,
    sender: Address,
    sender_header: Address | None,
    to: Sequence[Address],
    cc: Sequence[Address],
    reply_to: Sequence[Address],
    subject: str,
    date: str,
    message_id: str,
    custom: Sequence[tuple[str, str]],
    text: str | None,
    html: str | None,
    text_subtype: str,
    charset: str,
) -> bytes | None:
    """The message's bytes, or None when it needs the ``email`` package."""
    if charset.lower() not in ("utf-8", "utf8") or text_subtype not in ("plain", "html"):
        return None
    head: list[str] = []
    for name, addresses in (
        ("From", [sender]),
        ("Sender", [sender_header] if sender_header is not None else []),
        ("To", to),
        ("Cc", cc),
        ("Reply-To", reply_to),
    ):
        if addresses:
            line = _address_line(name, addresses)
            if line is None:
                return None
            head.append(line)
    if subject:
        line = _unstructured_line("Subject", subject)
        if line is None:
            return None
        head.append(line)
    else:
        head.append("Subject: ")
    head.append(f"Date: {date}")
    head.append(f"Message-ID: {message_id}")
    for name, value in custom:
        line = _unstructured_line(name, value)
        if line is None:
            return None
        head.append(line)

    bodies: list[tuple[str, str]]  # the same choice as message._add_body
    if text is not None:
        bodies = [(text_subtype, text)] + ([("html", html)] if html is not None else [])
    else:
        bodies = [("html", html)] if html is not None else [("plain", "")]
    parts: list[tuple[str, tuple[str, bytes]]] = []
    for subtype, content in bodies:
        encoded = _body(content)
        if encoded is None:
            return None
        parts.append((subtype, encoded))

    head.append("MIME-Version: 1.0")
    if len(parts) == 1:
        subtype, (cte, body) = parts[0]
        head.append(_part_head(subtype, cte))
        return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body
    boundary = f"==============={random.randrange(10**18, 10**19)}=="
    if any(boundary.encode() in body for _, (_, body) in parts):
        return None
    head.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"')
    out = [("\r\n".join(head) + "\r\n\r\n").encode("ascii")]
    for subtype, (cte, body) in parts:
        out.append(f"--{boundary}\r\n{_part_head(subtype, cte)}\r\n\r\n".encode("ascii"))
        out.append(body + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)
