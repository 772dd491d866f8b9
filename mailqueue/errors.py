"""The errors mailqueue raises and records.

Two families:

* ``InvalidMessageError`` (a ``ValueError``): the caller's input was refused
  at enqueue time and nothing was written.
* ``SMTPError`` and its subclasses: what a relay answered. Each carries the
  SMTP ``code``, the RFC 3463 ``enhanced_code`` and the server's ``reply``
  when there is one, and says whether a later attempt can help
  (``retryable``). The status table records these by class name.

Every error pickles with all its fields (Celery moves exceptions between
processes), and none ever includes a password or token in its text.
"""

from __future__ import annotations

import re

__all__ = [
    "MailQueueError",
    "ConfigError",
    "InvalidMessageError",
    "HeaderInjectionError",
    "NotFoundError",
    "UnsubscribeTokenError",
    "SMTPError",
    "ConnectError",
    "ClusterLimitError",
    "AuthError",
    "UnknownAuthError",
    "TLSError",
    "SenderError",
    "RecipientError",
    "DeliveryError",
    "parse_enhanced_code",
]

_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


def parse_enhanced_code(reply: str | None) -> str | None:
    """Return the RFC 3463 enhanced status code that starts ``reply``, if any."""
    if not reply:
        return None
    match = _ENHANCED.match(reply)
    return match.group(1) if match else None


class MailQueueError(Exception):
    """Base class of everything mailqueue raises on purpose."""


class ConfigError(MailQueueError, ValueError):
    """The configuration is wrong or names something that cannot be used.

    ``reason`` says what and what to do. For a ``MAILQUEUE_*`` name that no
    part of mailqueue reads, ``name`` is that name, ``suggestion`` the
    closest known one (or ``None``) and ``source`` where it was found
    (``"environment"``, ``"Django settings"``, ``"Flask config"``, a file).
    The text never holds a password: URLs in it are masked.
    """

    def __init__(
        self,
        reason: str,
        *,
        name: str | None = None,
        suggestion: str | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.name = name
        self.suggestion = suggestion
        self.source = source

    def __reduce__(self):  # keyword-only arguments need an explicit pickle recipe
        return (_rebuild_config, (type(self), self.reason, self.name, self.suggestion, self.source))

    def __str__(self) -> str:
        return self.reason


def _rebuild_config(cls, reason, name, suggestion, source):
    return cls(reason, name=name, suggestion=suggestion, source=source)


class NotFoundError(MailQueueError, LookupError):
    """No message has the given id."""

    def __init__(self, message_id: str) -> None:
        super().__init__(message_id)
        self.message_id = message_id

    def __str__(self) -> str:
        return f"no message with id {self.message_id!r}"


class UnsubscribeTokenError(MailQueueError, ValueError):
    """An unsubscribe link whose token this mailqueue did not sign (forged, altered,
    cut short, or signed with a secret no longer in MAILQUEUE_UNSUBSCRIBE_SECRET)."""

    def __str__(self) -> str:
        return (
            "this unsubscribe link is not valid: it may have been cut or changed on the way; "
            "open the link from the message again, or reply to the sender"
        )


class InvalidMessageError(MailQueueError, ValueError):
    """Input refused at enqueue time; nothing was written.

    ``field`` names the offending part (``"to"``, ``"headers"``, ``"size"``…)
    so callers can point a user at it.
    """

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason, field)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class HeaderInjectionError(InvalidMessageError):
    """A header value that could add a line, a field or a recipient: a control
    character, an encoded word that decodes to one, or a finished header block
    that does not read back as what was composed."""


class SMTPError(MailQueueError):
    """A relay refused something or the conversation with it failed.

    ``code`` is the three-digit SMTP reply code (``None`` when the failure was
    not a reply, e.g. a refused connection), ``enhanced_code`` the RFC 3463
    code parsed from the reply, ``reply`` the server's words.
    """

    #: What to tell a user to do about it; subclasses refine it.
    hint = "check the relay's reply"

    def __init__(
        self,
        reason: str,
        *,
        code: int | None = None,
        reply: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(reason, code, reply, retryable)
        self.reason = reason
        self.code = code
        self.reply = reply
        self.enhanced_code = parse_enhanced_code(reply)
        if retryable is None:
            retryable = code is None or 400 <= code < 500
        self.retryable = retryable

    def __reduce__(self):  # keyword-only arguments need an explicit pickle recipe
        return (
            _rebuild,
            (type(self), self.reason, self.code, self.reply, self.retryable),
        )

    def __str__(self) -> str:
        parts = [self.reason]
        if self.code is not None:
            parts.append(f"(server said: {self.code} {self.reply or ''}".rstrip() + ")")
        parts.append("; retry later" if self.retryable else f"; {self.hint}")
        return " ".join(parts)


def _rebuild(cls, reason, code, reply, retryable):
    return cls(reason, code=code, reply=reply, retryable=retryable)


class ConnectError(SMTPError):
    """The relay could not be reached, or the connection dropped or timed out."""

    hint = "check that the relay is up and reachable"


class ClusterLimitError(ConnectError):
    """A relay's cluster-wide limit could not be met: no connection slot came
    free in time, or the Redis that keeps the limits is unreachable. Nothing
    was sent; the recipients are deferred."""

    hint = "see the relay's cluster_max_connections, rate_limit and MAILQUEUE_LIMITS_REDIS_URL"


class AuthError(SMTPError):
    """The relay refused the credentials."""

    hint = "check the relay's user name and password (or token provider)"


class UnknownAuthError(AuthError):
    """The relay offers no authentication mechanism that mailqueue speaks."""

    hint = "enable PLAIN, LOGIN, CRAM-MD5 or XOAUTH2 on the relay"


class TLSError(SMTPError):
    """TLS failed: handshake, certificate verification, or STARTTLS missing."""

    hint = "check the relay's certificate and the TLS options"


class SenderError(SMTPError):
    """MAIL FROM was refused."""

    hint = "check the envelope sender is allowed on this relay"


class RecipientError(SMTPError):
    """Every recipient was refused at RCPT TO."""

    hint = "check the recipient addresses"


class DeliveryError(SMTPError):
    """DATA was refused or the transfer failed."""

    hint = "check the message content and size"
