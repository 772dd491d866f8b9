"""One-click unsubscribe (RFC 8058): the signed token and the headers that carry it.

A message enqueued with ``unsubscribe=True`` gets, in each recipient's copy::

    List-Unsubscribe: <https://mail.example.com/u/<token>>, <mailto:...>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

The token names one recipient, so the headers differ per recipient: the
worker sends such a message one SMTP transaction per recipient and adds the
headers to each copy just before DKIM signing (``worker/service.py``). The
stored content never holds them, and plain messages never pass through here.

The token
    ``1.<payload>.<mac>``, both base64url without padding. The payload is
    ``address LF list-id LF message-id`` (the list id ``""`` for a
    suppression everywhere); the MAC is HMAC-SHA256, keyed with
    ``MAILQUEUE_UNSUBSCRIBE_SECRET``, over ``mailqueue-unsubscribe`` NUL and
    the token's first two parts, and it is checked with
    ``hmac.compare_digest``. The address is inside what is signed, so a token
    replayed for another address, or altered anywhere, is refused. Tokens do
    not expire (a link in a year-old newsletter must still work, RFC 8058
    and the mailbox providers ask for that); rotating the secret ends them:
    the setting holds several comma-separated secrets, the first signs, all
    verify, so an old one can be kept while its mail is still read.
    The address is readable by whoever holds the link (it is in the URL,
    base64-encoded, not encrypted): the link is in that person's own mail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from .config import Settings
from .errors import ConfigError

__all__ = [
    "PATH_PREFIX",
    "Signer",
    "Unsubscribe",
    "add_headers",
    "has_header",
    "list_id_header",
    "unsubscribe_headers",
]

VERSION = "1"
PATH_PREFIX = "/u/"
"""Where ``mailqueue web`` serves the tokens (``web/routes_unsubscribe.py``)."""
_CONTEXT = b"mailqueue-unsubscribe\x00"
_MAX_LINE = 998
"""RFC 5322's limit on a header line, CRLF excluded."""


@dataclass(frozen=True)
class Unsubscribe:
    """What a valid token says: who leaves which list, from which message.

    This is what ``MAILQUEUE_ON_UNSUBSCRIBE`` is called with.
    """

    address: str
    list_id: str | None
    """``None``: the token was made for a message without ``list_id`` (leave everything)."""
    message_id: uuid.UUID | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Makes and checks tokens with the configured secret(s). Its repr shows no key."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one secret is needed")
        self._keys = [k.encode("utf-8") for k in keys]

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} key(s))"

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer | None:
        """The signer of ``MAILQUEUE_UNSUBSCRIBE_SECRET``, or ``None`` when it is unset."""
        if not settings.unsubscribe_secret:
            return None
        return cls([k.strip() for k in settings.unsubscribe_secret.split(",")])

    def _mac(self, key: bytes, signed: str) -> str:
        return _b64(hmac.new(key, _CONTEXT + signed.encode("ascii"), hashlib.sha256).digest())

    def token(self, address: str, list_id: str | None, message_id: uuid.UUID | None) -> str:
        """The token naming ``address`` (and the list), signed with the first secret."""
        payload = "\n".join((address, list_id or "", message_id.hex if message_id else ""))
        signed = f"{VERSION}.{_b64(payload.encode('utf-8'))}"
        return f"{signed}.{self._mac(self._keys[0], signed)}"

    def verify(self, token: str) -> Unsubscribe | None:
        """What ``token`` says, or ``None`` when any secret's MAC does not match it
        (forged, altered, cut short, or signed with a secret no longer configured)."""
        version, _, rest = token.partition(".")
        payload, _, mac = rest.partition(".")
        if version != VERSION or not payload or not mac or len(token) > 4096:
            return None
        signed = f"{version}.{payload}"
        try:
            signed.encode("ascii")
            given = mac.encode("ascii")
        except UnicodeEncodeError:
            return None
        if not any(
            hmac.compare_digest(self._mac(key, signed).encode("ascii"), given) for key in self._keys
        ):
            return None
        try:
            address, list_id, message_hex = _unb64(payload).decode("utf-8").split("\n")
            message_id = uuid.UUID(hex=message_hex) if message_hex else None
        except (ValueError, binascii.Error):
            return None  # signed by us, so not reachable without the secret; still refused
        return Unsubscribe(address, list_id or None, message_id)


def unsubscribe_url(settings: Settings, token: str) -> str:
    """The one-click URL of ``token`` (``MAILQUEUE_UNSUBSCRIBE_URL`` + ``/u/`` + token)."""
    assert settings.unsubscribe_url is not None
    return settings.unsubscribe_url.rstrip("/") + PATH_PREFIX + token


def unsubscribe_headers(settings: Settings, signer: Signer, token: str) -> bytes:
    """The List-Unsubscribe and List-Unsubscribe-Post fields for one recipient, CRLF-ended.

    Raises :class:`ConfigError` when ``MAILQUEUE_UNSUBSCRIBE_URL`` is unset,
    and ``ValueError`` when the URL would not fit a header line (an address
    and list id of hundreds of characters).
    """
    if not settings.unsubscribe_url:
        raise ConfigError(
            "unsubscribe=True needs MAILQUEUE_UNSUBSCRIBE_URL where the workers run",
            name="MAILQUEUE_UNSUBSCRIBE_URL",
        )
    line = f"List-Unsubscribe: <{unsubscribe_url(settings, token)}>"
    if len(line) + 1 > _MAX_LINE:
        raise ValueError(
            f"the List-Unsubscribe URL would be {len(line)} characters, more than a header "
            "line may hold; use a shorter list id or base URL"
        )
    if settings.unsubscribe_mailto:
        subject = quote(f"unsubscribe {token}", safe="")
        line += f",\r\n <mailto:{settings.unsubscribe_mailto}?subject={subject}>"
    return (line + "\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n").encode("ascii")


def list_id_header(list_id: str) -> bytes:
    """``List-Id: <list_id>`` (RFC 2919), CRLF-ended."""
    return f"List-Id: <{list_id}>\r\n".encode()


def has_header(content: bytes | bytearray, name: bytes) -> bool:
    """Whether the top header block of ``content`` has a field called ``name``."""
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    block = bytes(content[: end + 2 if end >= 0 else len(content)])
    return re.search(rb"(?im)^" + re.escape(name) + rb"[ \t]*:", block) is not None


def add_headers(content: bytes | bytearray, fields: bytes) -> bytes:
    """``content`` with ``fields`` on top of its header block (as a relay adds Received)."""
    return fields + bytes(content)
