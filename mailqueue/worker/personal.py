"""Per-recipient copies of a list message: List-Id, and List-Unsubscribe per recipient.

Invariant 9 ("only what the caller named reaches the wire") holds: the
caller named these fields with ``list_id=`` and ``unsubscribe=True``, and the
worker adds exactly them, on top of the stored header block, before DKIM
signs the copy (``smtp/dkim.py`` signs List-Id and the RFC 8058 pair). The
envelope is unchanged: each copy goes to one RCPT TO, the recipient's row.
To and Cc stay as composed; Bcc recipients appear in no header, as always.

A copy that cannot get its header (no secret or URL on this worker, an
address too long for a header line) is not sent: its recipient fails with
an error that says what to set, and ``mailqueue retry`` sends it once fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Settings
from ..errors import SMTPError
from ..smtp.outcome import TransactionResult
from ..store.queue import ClaimedMessage
from ..unsubscribe import Signer, add_headers, has_header, list_id_header, unsubscribe_headers

__all__ = ["merge_results", "personal_copy", "unsubscribe_base", "with_list_id"]


def with_list_id(content: bytes | bytearray, list_id: str) -> bytes | bytearray:
    """``content`` with ``List-Id``, unless its composer already wrote one."""
    if has_header(content, b"list-id"):
        return content
    return add_headers(content, list_id_header(list_id))


def unsubscribe_base(
    settings: Settings, signer: Signer | None, content: bytes | bytearray
) -> bytes | SMTPError:
    """What every copy shares (``content``, List-Id already added), or why no copy can
    be sent."""
    if signer is None or not settings.unsubscribe_url:
        missing = " and ".join(
            name
            for name, value in (
                ("MAILQUEUE_UNSUBSCRIBE_URL", settings.unsubscribe_url),
                ("MAILQUEUE_UNSUBSCRIBE_SECRET", signer),
            )
            if not value
        )
        reason = (
            f"the message asks for one-click unsubscribe and this worker has no {missing}: "
            "set it where the workers run (the same values as mailqueue web), restart "
            "them, then mailqueue retry the message; it was not sent without the header"
        )
        # the reply too: it is what each recipient's row shows
        return SMTPError(reason, reply=reason, retryable=False)
    return bytes(content)


def personal_copy(
    settings: Settings, signer: Signer, message: ClaimedMessage, address: str, base: bytes
) -> bytes | SMTPError:
    """``address``'s copy: ``base`` with its own List-Unsubscribe, or why it cannot have one."""
    token = signer.token(address, message.list_id, message.id)
    try:
        return add_headers(base, unsubscribe_headers(settings, signer, token))
    except ValueError as exc:
        return SMTPError(f"not sent: {exc}", reply=f"not sent: {exc}", retryable=False)


def merge_results(results: Sequence[TransactionResult]) -> TransactionResult:
    """The transactions of one message's copies, as one attempt's result."""
    if len(results) == 1:
        return results[0]
    error = next((r.error for r in reversed(results) if r.error is not None), None)
    first = next((r for r in results if r.data_code is not None), None)
    return TransactionResult(
        tuple(rr for r in results for rr in r.recipients),
        data_code=first.data_code if first else None,
        data_reply=first.data_reply if first else None,
        error=error,
    )
