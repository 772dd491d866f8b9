"""Status back to the app: lookups by key or metadata, and Anymail's vocabulary.

mailqueue's own words (``pending``, ``sent``, ``deferred``, ``failed``,
``cancelled``, ``suppressed``, ``bounced``, ``complained`` per recipient) are
precise about SMTP; apps that already speak `Anymail <https://anymail.dev>`_'s
vocabulary can translate them with
:func:`anymail_status` (one recipient) or :func:`anymail_statuses` (a
message: the set of its recipients' words, like Anymail's
``message.anymail_status.status``).

===================== ======================================== ===========
mailqueue recipient    condition                                Anymail
===================== ======================================== ===========
``pending``            not tried yet                            ``queued``
``deferred``           4xx / timeout, will be retried           ``deferred``
``sent``               the relay accepted it (2xx to DATA)      ``sent``
``failed``             5xx from the relay (RCPT, MAIL or DATA)  ``rejected``
``failed``             ``error == "Expired"`` (gave up)         ``bounced``
``failed``             anything else (TLS, auth, no code)       ``failed``
``cancelled``          cancelled before it was sent             ``failed``
``bounced``            sent, then a DSN said it failed for good ``bounced``
``complained``         sent, then reported as spam (ARF)        ``complained``
``suppressed``         on the suppression list, never sent      ``rejected``
===================== ======================================== ===========
"""

from __future__ import annotations

from .. import api
from ..api import MessageInfo, RecipientInfo, get_status, get_status_by_key
from ..statuses import ErrorWord, RecipientStatus

__all__ = [
    "ANYMAIL_WORDS",
    "anymail_status",
    "anymail_statuses",
    "find_by_metadata",
    "get_status",
    "get_status_by_key",
]

ANYMAIL_WORDS = ("queued", "sent", "rejected", "failed", "deferred", "bounced", "complained")

_SIMPLE: dict[str, str] = {
    RecipientStatus.PENDING: "queued",
    RecipientStatus.DEFERRED: "deferred",
    RecipientStatus.SENT: "sent",
    RecipientStatus.CANCELLED: "failed",
    RecipientStatus.BOUNCED: "bounced",
    RecipientStatus.COMPLAINED: "complained",
    # Anymail's own word for a recipient the ESP's suppression list withheld.
    RecipientStatus.SUPPRESSED: "rejected",
}


def anymail_status(recipient: RecipientInfo) -> str:
    """One recipient's status in Anymail's words (see the module's table)."""
    word = _SIMPLE.get(recipient.status)
    if word is not None:
        return word
    if recipient.error == ErrorWord.EXPIRED:
        return "bounced"
    if recipient.smtp_code is not None and 500 <= recipient.smtp_code < 600:
        return "rejected"
    return "failed"


def anymail_statuses(info: MessageInfo) -> set[str]:
    """The set of the message's recipients' Anymail words (``{"sent", "rejected"}``, ...)."""
    return {anymail_status(r) for r in info.recipients}


def find_by_metadata(limit: int = 100, **match: str) -> list[MessageInfo]:
    """Messages whose ``metadata`` has all of ``match`` (string values), newest first.

    ``find_by_metadata(order="42")`` finds what ``enqueue(..., metadata={"order": "42"})``
    (or ``X-Mailqueue-Metadata`` from Django) queued.
    """
    return api.find_by_metadata(limit, **match)
