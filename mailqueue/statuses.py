"""Status and error words: the one place they are spelled.

They are stored in rows and shown to users (CLI, status page, JSON API), so
their values never change. Each is a ``StrEnum``: a member is the string
itself (``RecipientStatus.SENT == "sent"``), in SQL, JSON and templates.

Recipient: ``pending`` (not tried yet), ``sent`` (the relay accepted it),
``deferred`` (a temporary failure; tried again at the message's
``next_attempt_at``), ``failed`` (refused for good, or expired),
``cancelled``, ``suppressed`` (its address is on the suppression list: found
when a worker claimed the message, so never sent; not a failure). After
``sent``, a report that came back may turn it ``bounced`` (a hard bounce: the
next hop refused it for good) or ``complained`` (the recipient reported it as
spam); see ``bounces``.

Message, derived from its recipients: ``queued``, ``sending`` (a worker holds
its lease), ``deferred``, ``sent`` (all accepted), ``partial`` (terminal:
some accepted, the rest failed, cancelled or suppressed), ``failed`` (none
accepted, some failed), ``cancelled`` (every recipient cancelled),
``suppressed`` (none accepted, none failed, at least one suppressed: nothing
went wrong, the list withheld it). A ``complained`` recipient counts as
accepted (the mail reached its mailbox), a ``bounced`` one as failed.

Suppression reasons (:class:`SuppressionReason`): ``unsubscribed``,
``bounced``, ``complained``, ``manual``.

Errors: a recipient's ``error`` and a message's ``last_error`` hold the class
name of the exception that ended the attempt (``AuthError``, ``TLSError``,
...; see ``errors``), or one of :class:`ErrorWord` when no exception did.
"""

from __future__ import annotations

from enum import StrEnum, nonmember

__all__ = [
    "ErrorWord",
    "MessageStatus",
    "RecipientStatus",
    "SuppressionReason",
    "TERMINAL_MESSAGE",
]


class MessageStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"
    ALL = nonmember((QUEUED, SENDING, DEFERRED, SENT, PARTIAL, FAILED, CANCELLED, SUPPRESSED))
    """Every message status, in the order the CLI and the status page list them."""


class RecipientStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"
    BOUNCED = "bounced"
    """Was ``sent``; a delivery status notification then said it failed for good."""
    COMPLAINED = "complained"
    """Was ``sent``; the recipient then reported it as spam (an ARF report)."""
    ALL = nonmember((PENDING, SENT, DEFERRED, FAILED, CANCELLED, SUPPRESSED, BOUNCED, COMPLAINED))
    """Every recipient status, in the order the CLI and the status page list them."""
    AFTER_SENT = nonmember((BOUNCED, COMPLAINED))
    """What a report that came back after the relay's 250 can make a ``sent`` recipient."""
    OPEN = nonmember((PENDING, DEFERRED))
    """Recipients that a delivery attempt still carries."""


TERMINAL_MESSAGE = (
    MessageStatus.SENT,
    MessageStatus.PARTIAL,
    MessageStatus.FAILED,
    MessageStatus.CANCELLED,
    MessageStatus.SUPPRESSED,
)
"""Message statuses that no attempt changes any more."""


class ErrorWord(StrEnum):
    """``error``/``last_error`` words written when no exception ended the attempt."""

    EXPIRED = "Expired"
    """The message outlived its lifetime: its open recipients failed."""
    BOUNCED = "Bounced"
    """A bounce (DSN) that came back after the 250 said it failed for good."""
    COMPLAINED = "Complained"
    """A complaint (ARF) that came back after the 250."""
    RELAY_PAUSED = "RelayPaused"
    """Its relay is paused after an auth or TLS failure: deferred, not tried."""
    SUPPRESSED = "Suppressed"
    """The recipient's address is on the suppression list (the reply says which entry)."""


class SuppressionReason(StrEnum):
    """Why an address is on the suppression list (stored in ``mq_suppression.reason``)."""

    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    MANUAL = "manual"
    ALL = nonmember((UNSUBSCRIBED, BOUNCED, COMPLAINED, MANUAL))
