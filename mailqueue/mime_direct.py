"""Write the common simple MIME body directly, without ``email`` objects.

Composing with the standard library's ``email`` package costs about a
millisecond a message (message objects, parts, encoders): most of what
``enqueue_many`` spent. Most application mail is simple: a UTF-8 text and/or
HTML body, no attachments. For exactly that, :func:`write_simple` writes the
MIME part the ``email`` package would mean, in a few microseconds; for
anything else it returns ``None`` and ``message.py`` composes with ``email``.
The header fields above it are always written by ``headers.py``.
``tests/test_mime_direct.py`` parses the output of both writers with
``email`` and requires the same headers and bodies.
"""

from __future__ import annotations

import email.contentmanager
import email.policy
import random
import re
from collections.abc import Callable
from email.headerregistry import HeaderRegistry

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
    text: str | None,
    html: str | None,
    text_subtype: str,
    charset: str,
) -> bytes | None:
    """The MIME part's bytes (``MIME-Version`` on), or None when it needs the ``email`` package.

    The header fields above it (From, To, Subject…) are written by ``headers.py``.
    """
    if charset.lower() not in ("utf-8", "utf8") or text_subtype not in ("plain", "html"):
        return None
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

    head = ["MIME-Version: 1.0"]
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
