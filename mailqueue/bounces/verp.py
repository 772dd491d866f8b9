"""Signed VERP return paths: ``b+<token>@<bounce domain>``, one per recipient row.

A bounce goes to the envelope sender. When each recipient is sent with its
own envelope sender that names its row, the bounce says which row it is
about, whatever the bouncing MTA writes (or fails to write) in the report.

The token is ``<recipient id, base 36>-<MAC>``: the MAC is the first 80 bits
of HMAC-SHA256 under ``MAILQUEUE_BOUNCE_SECRET`` over the message id, the
recipient id and the address, in lower-case base 32. So:

- it cannot be forged without the secret, and a valid token cannot be
  replayed onto another row: another recipient id, message or address gives
  another MAC (checked with ``hmac.compare_digest``);
- it is case-insensitive (MTAs lower-case local parts) and at most 32
  characters with its ``b+`` (13 base-36 digits hold any 63-bit id), inside
  the 64 a local part may have;
- the secret lives in the environment only: tokens are computed when sending
  and when checking, never stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

__all__ = [
    "LOCAL_PREFIX",
    "MIN_SECRET_BYTES",
    "Token",
    "make_return_path",
    "read_token",
    "verifies",
]

LOCAL_PREFIX = "b+"
MIN_SECRET_BYTES = 16
_MAC_BYTES = 10
_TOKEN = re.compile(r"b\+([0-9a-z]{1,13})-([a-z2-7]{16})", re.IGNORECASE)


@dataclass(frozen=True)
class Token:
    """What a return path claims: a recipient row id and a MAC, not yet checked."""

    recipient_id: int
    mac: str


def _mac(secret: bytes, message_id: uuid.UUID, recipient_id: int, address: str) -> str:
    signed = b"\0".join(
        [
            b"mailqueue-verp-1",
            message_id.bytes,
            str(recipient_id).encode(),
            address.lower().encode(),
        ]
    )
    digest = hmac.new(secret, signed, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def make_return_path(
    *, secret: bytes, domain: str, message_id: uuid.UUID, recipient_id: int, address: str
) -> str:
    """The envelope sender for one recipient row."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the bounce secret must be at least {MIN_SECRET_BYTES} bytes")
    if recipient_id < 0:
        raise ValueError("a recipient id is never negative")
    mac = _mac(secret, message_id, recipient_id, address)
    return f"{LOCAL_PREFIX}{_base36(recipient_id)}-{mac}@{domain}"


def read_token(address: str, *, domain: str | None = None) -> Token | None:
    """The token in ``address`` (``b+…@domain``), or None when it holds none.

    With ``domain``, an address at any other domain holds none. Nothing is
    verified here: see :func:`verifies`.
    """
    local, at, host = address.strip().strip("<>").rpartition("@")
    if not at or (domain is not None and host.lower() != domain.lower()):
        return None
    match = _TOKEN.fullmatch(local)
    if match is None:
        return None
    return Token(int(match.group(1), 36), match.group(2).lower())


def verifies(
    token: Token, *, secret: bytes, message_id: uuid.UUID, recipient_id: int, address: str
) -> bool:
    """True when ``token`` was made for exactly this row."""
    if token.recipient_id != recipient_id or len(secret) < MIN_SECRET_BYTES:
        return False
    expected = _mac(secret, message_id, recipient_id, address)
    return hmac.compare_digest(expected.encode(), token.mac.encode())
