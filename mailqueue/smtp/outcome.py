"""What the relay said → what happened to each recipient: the one place the rules live.

Both ways of sending (one command at a time, or PIPELINING) only collect
the relay's replies into a ``Transcript``; ``judge`` turns it into the
per-recipient results, following the table in ``smtp.delivery``:

==================  ======================================================
reply               outcome for the recipients concerned
==================  ======================================================
RCPT 2xx + DATA 2xx ``sent``
any 4xx             ``deferred`` (try again later)
any 5xx             ``failed`` (the relay will never take it)
drop/timeout/421    ``deferred``; the connection is poisoned
==================  ======================================================

A failure before any content byte was sent (a 421 to MAIL or RCPT, a
timeout, a dropped connection) cannot have delivered anything: the verdict
says ``retry_now`` (on a fresh connection). After the content was sent the
relay may have taken it: the recipients it accepted are deferred, never
retried in-line, and those it refused keep their own replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from aiosmtplib.response import SMTPResponse as Reply  # (code, message), as the relay said it

from ..errors import (
    ConnectError,
    DeliveryError,
    RecipientError,
    SenderError,
    SMTPError,
    parse_enhanced_code,
)

__all__ = [
    "Failure",
    "RecipientResult",
    "Reply",
    "TransactionResult",
    "Transcript",
    "Verdict",
    "failed_everyone",
    "judge",
]

Outcome = Literal["sent", "deferred", "failed"]
Stage = Literal["MAIL", "RCPT", "DATA"]

ACCEPTED_RCPT = (250, 251)


@dataclass(frozen=True)
class RecipientResult:
    """What happened to one recipient in one attempt."""

    address: str
    status: Outcome
    code: int | None = None
    reply: str | None = None
    error: str | None = None
    """Class name of the typed error that explains a refusal, e.g. ``"RecipientError"``."""

    @property
    def enhanced_code(self) -> str | None:
        return parse_enhanced_code(self.reply)


@dataclass(frozen=True)
class TransactionResult:
    """Per-recipient results of one attempt, plus the error that sums it up."""

    recipients: tuple[RecipientResult, ...]
    data_code: int | None = None
    data_reply: str | None = None
    error: SMTPError | None = None
    """Why not everyone was accepted (the last refusal that mattered), or None."""

    @property
    def accepted(self) -> list[str]:
        return [r.address for r in self.recipients if r.status == "sent"]

    @property
    def rcpt_failed(self) -> list[RecipientResult]:
        """Recipients not delivered in this attempt, with the server's words."""
        return [r for r in self.recipients if r.status != "sent"]

    def raise_for_error(self) -> None:
        """Raise the typed error if any recipient was not accepted (classic-client style)."""
        if self.error is not None and self.rcpt_failed:
            raise self.error


@dataclass(frozen=True)
class Failure:
    """The session broke instead of answering."""

    stage: Stage
    """The command whose reply was awaited."""
    how: Literal["timed out", "dropped", "ended"]
    """``ended``: an unexpected reply closed the session (``reply`` says which)."""
    detail: str = ""
    reply: Reply | None = None


@dataclass(slots=True)
class Transcript:
    """What the relay said during one transaction, as the send paths collect it."""

    mail: Reply | None = None
    rcpt: list[Reply] = field(default_factory=list)
    """One reply per recipient, in order, as far as they were read."""
    data: Reply | None = None
    """The reply that settled DATA: its refusal, or the reply after the final dot."""
    content_sent: bool = False
    """Whether content bytes may have reached the relay (it may have taken them)."""
    failure: Failure | None = None
    refused_before: SMTPError | None = None
    """A refusal predicted from the EHLO reply: nothing was sent."""


class Verdict(NamedTuple):
    result: TransactionResult
    connection: Literal["keep", "reset", "poison"]
    """What the session needs before its next message: nothing, RSET, or closing."""
    retry_now: bool = False
    """Nothing can have been delivered and the session broke: a fresh one may do."""


def _outcome(code: int) -> Outcome:
    return "deferred" if 400 <= code < 500 else "failed"


def _all(
    recipients: Sequence[str], status: Outcome, error: SMTPError
) -> tuple[RecipientResult, ...]:
    return tuple(
        RecipientResult(a, status, error.code, error.reply, type(error).__name__)
        for a in recipients
    )


def failed_everyone(
    recipients: Sequence[str], status: Outcome, error: SMTPError
) -> TransactionResult:
    """One result for all ``recipients`` (``failed`` or ``deferred``) because of ``error``."""
    return TransactionResult(_all(recipients, status, error), error=error)


def _broken(recipients: Sequence[str], said: Transcript, failure: Failure) -> Verdict:
    """The session broke (or was ended by a 421): poisoned, everyone not refused deferred."""
    reply = failure.reply
    code, words = (reply.code, reply.message) if reply is not None else (None, None)
    if failure.how == "ended":
        reason = f"the relay ended the session during {failure.stage}"
    elif not said.content_sent:
        reason = f"the connection {failure.how} during {failure.stage}: {failure.detail}"
    else:
        reason = (
            f"the connection {failure.how} after the message was sent, before the relay "
            "confirmed it; it may have been delivered"
        )
    error = ConnectError(reason, code=code, reply=words)
    if not said.content_sent:
        return Verdict(failed_everyone(recipients, "deferred", error), "poison", retry_now=True)
    refused = {
        a: r for a, r in zip(recipients, said.rcpt, strict=False) if r.code not in ACCEPTED_RCPT
    }
    return Verdict(
        TransactionResult(
            tuple(
                _refused(a, refused[a])
                if a in refused
                else RecipientResult(
                    a, "deferred", error.code, error.reply or str(error), "ConnectError"
                )
                for a in recipients
            ),
            error=error,
        ),
        "poison",
    )


def _refused(address: str, reply: Reply) -> RecipientResult:
    return RecipientResult(
        address, _outcome(reply.code), reply.code, reply.message, "RecipientError"
    )


def judge(mail_from: str, recipients: Sequence[str], said: Transcript) -> Verdict:
    """Per-recipient results of one transaction from what the relay said.

    Pure: the same transcript always gives the same verdict, whichever way
    it was collected.
    """
    if said.refused_before is not None:
        return Verdict(failed_everyone(recipients, "failed", said.refused_before), "keep")
    if said.failure is not None:
        return _broken(recipients, said, said.failure)
    mail = said.mail
    if mail is None:
        raise ValueError("a transcript without a MAIL reply must say why (failure)")
    if mail.code == 421:  # the session is closing, nothing was sent
        return _broken(recipients, said, Failure("MAIL", "ended", reply=mail))
    if mail.code != 250:
        error: SMTPError = SenderError(
            f"the relay refused the sender <{mail_from}>", code=mail.code, reply=mail.message
        )
        return Verdict(failed_everyone(recipients, _outcome(mail.code), error), "reset")

    results: dict[str, RecipientResult] = {}
    accepted: list[str] = []
    last_refusal: SMTPError | None = None
    closing = False
    for address, reply in zip(recipients, said.rcpt, strict=True):
        if reply.code in ACCEPTED_RCPT:
            accepted.append(address)
            continue
        if reply.code == 421:
            if not said.content_sent:  # the session is closing before DATA: nothing was sent
                return _broken(recipients, said, Failure("RCPT", "ended", reply=reply))
            closing = True
        last_refusal = RecipientError(
            f"the relay refused the recipient <{address}>", code=reply.code, reply=reply.message
        )
        results[address] = _refused(address, reply)

    if not accepted:
        error = last_refusal or RecipientError("every recipient was refused")
        if len(recipients) > 1:
            error = type(error)(
                f"the relay refused all {len(recipients)} recipients",
                code=error.code,
                reply=error.reply,
            )
        return Verdict(
            TransactionResult(tuple(results[a] for a in recipients), error=error), "reset"
        )

    data = said.data
    if data is None:
        raise ValueError("a transcript with accepted recipients must have the DATA reply")
    status: Outcome = "sent" if data.code == 250 else _outcome(data.code)
    summary: SMTPError | None = last_refusal
    kind = None
    if status != "sent":
        summary = DeliveryError(
            "the relay refused the message at DATA", code=data.code, reply=data.message
        )
        kind = "DeliveryError"
    for address in accepted:
        results[address] = RecipientResult(address, status, data.code, data.message, kind)
    connection: Literal["keep", "reset", "poison"] = (
        "poison" if data.code == 421 or closing else "keep" if status == "sent" else "reset"
    )
    return Verdict(
        TransactionResult(tuple(results[a] for a in recipients), data.code, data.message, summary),
        connection,
    )
