"""One envelope over one pooled connection, with every reply kept.

We drive MAIL, RCPT and DATA ourselves instead of ``sendmail()`` so that
each recipient's reply is kept (``sendmail`` mixes 4xx and 5xx refusals and
raises when all are refused), each phase has its own timeout, and we know
whether a failure happened before DATA (nothing can have been delivered:
safe to retry at once on a fresh connection) or after it (the relay may
have accepted the message: the recipients are deferred, never retried
in-line).

How replies become outcomes (the queue's retry policy rests on this):

==================  ======================================================
reply               outcome for the recipients concerned
==================  ======================================================
RCPT 2xx + DATA 2xx ``sent``
any 4xx             ``deferred`` (try again later)
any 5xx             ``failed`` (the relay will never take it)
drop/timeout/421    ``deferred``; the connection is poisoned
==================  ======================================================
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiosmtplib
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ..errors import (
    ClusterLimitError,
    ConnectError,
    DeliveryError,
    RecipientError,
    SenderError,
    SMTPError,
    parse_enhanced_code,
)
from .pipelining import ACCEPTED_RCPT, Pipeline, supports_pipelining
from .pool import Connection, Pool

__all__ = ["RecipientResult", "TransactionResult", "deliver", "send_transaction"]

Outcome = Literal["sent", "deferred", "failed"]


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


def _outcome(code: int) -> Outcome:
    return "deferred" if 400 <= code < 500 else "failed"


class _DroppedBeforeData(Exception):
    """The session failed before any DATA byte was sent: safe to retry now."""

    def __init__(self, error: ConnectError) -> None:
        super().__init__(str(error))
        self.error = error


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


def _mail_options(smtp: aiosmtplib.SMTP, size: int, smtputf8: bool, eightbit: bool) -> list[str]:
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={size}")
    if eightbit and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if smtputf8:
        options.append("SMTPUTF8")
    return options


def _unsupported(
    smtp: aiosmtplib.SMTP, size: int, smtputf8: bool, eightbit: bool
) -> DeliveryError | None:
    """Refusals we can predict from the EHLO reply without starting a transaction."""
    limit = smtp.esmtp_extensions.get("size", "")
    if limit.isdigit() and int(limit) and size > int(limit):
        return DeliveryError(
            f"message of {size} bytes exceeds the relay's SIZE limit of {limit} bytes; "
            "send it smaller (e.g. link large files) or through a relay that takes it",
            code=552,
            reply="5.3.4 message size exceeds fixed maximum message size (advertised SIZE)",
        )
    if smtputf8 and not smtp.supports_extension("smtputf8"):
        return DeliveryError(
            "an address or header is not ASCII and the relay does not offer SMTPUTF8; "
            "use an ASCII address or a relay that offers SMTPUTF8",
            code=553,
            reply="5.6.7 SMTPUTF8 not offered by the relay",
        )
    if eightbit and not smtputf8 and not smtp.supports_extension("8bitmime"):
        return DeliveryError(
            "the message has 8-bit content and the relay does not offer 8BITMIME; "
            "encode it as quoted-printable or base64 (composed messages always are)",
            code=554,
            reply="5.6.3 8BITMIME not offered by the relay",
        )
    return None


async def send_transaction(
    conn: Connection,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes | bytearray,
    *,
    command_timeout_s: float,
    data_timeout_s: float,
    smtputf8: bool = False,
    eightbit: bool = False,
) -> TransactionResult:
    """Run MAIL, RCPT… and DATA on ``conn`` and report each recipient.

    Raises ``_DroppedBeforeData`` when the session died before DATA (the
    caller retries on a fresh connection). Poisons ``conn`` when the session
    is no longer trustworthy.
    """
    smtp = conn.smtp
    encoding = "utf-8" if smtputf8 else "ascii"
    refusal = _unsupported(smtp, len(data), smtputf8, eightbit)
    if refusal is not None:
        return TransactionResult(_all(recipients, "failed", refusal), error=refusal)

    results: dict[str, RecipientResult] = {}
    accepted: list[str] = []
    phase = "MAIL"
    # RFC 2920: when offered, MAIL, RCPT… and DATA go out in one write; the
    # replies are still read and judged one per command, per recipient.
    pipe = Pipeline(smtp) if supports_pipelining(smtp) else None
    try:
        if pipe is not None:
            return await _pipelined(
                conn,
                pipe,
                mail_from,
                recipients,
                data,
                options=_mail_options(smtp, len(data), smtputf8, eightbit),
                encoding=encoding,
                command_timeout_s=command_timeout_s,
                data_timeout_s=data_timeout_s,
                results=results,
                accepted=accepted,
            )
        try:
            await smtp.mail(
                mail_from,
                options=_mail_options(smtp, len(data), smtputf8, eightbit),
                encoding=encoding,
                timeout=command_timeout_s,
            )
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 421:
                raise  # the session is closing, nothing was sent: retry on a fresh one
            error: SMTPError = SenderError(
                f"the relay refused the sender <{mail_from}>", code=exc.code, reply=exc.message
            )
            await _reset(conn, exc.code, command_timeout_s)
            return TransactionResult(_all(recipients, _outcome(exc.code), error), error=error)

        phase = "RCPT"
        last_refusal: SMTPError | None = None
        for address in recipients:
            try:
                await smtp.rcpt(address, encoding=encoding, timeout=command_timeout_s)
            except aiosmtplib.SMTPRecipientRefused as exc:
                if exc.code == 421:
                    raise  # the session is closing before DATA: retry on a fresh one
                last_refusal = RecipientError(
                    f"the relay refused the recipient <{address}>", code=exc.code, reply=exc.message
                )
                results[address] = RecipientResult(
                    address, _outcome(exc.code), exc.code, exc.message, "RecipientError"
                )
            else:
                accepted.append(address)

        if not accepted:
            await _reset(conn, None, command_timeout_s)
            error = last_refusal or RecipientError("every recipient was refused")
            if len(recipients) > 1:
                error = type(error)(
                    f"the relay refused all {len(recipients)} recipients",
                    code=error.code,
                    reply=error.reply,
                )
            return TransactionResult(tuple(results[a] for a in recipients), error=error)

        phase = "DATA"
        try:
            # aiosmtplib types ``data`` as bytes (it copies it several times anyway)
            payload = bytes(data) if isinstance(data, bytearray) else data
            response = await smtp.data(payload, timeout=data_timeout_s)
        except aiosmtplib.SMTPDataError as exc:
            return await _data_refused(
                conn, recipients, accepted, results, exc.code, exc.message, command_timeout_s
            )
        return _data_accepted(
            recipients, accepted, results, response.code, response.message, last_refusal
        )
    except aiosmtplib.SMTPResponseException as exc:
        # An unexpected reply (e.g. 421 on MAIL, which aiosmtplib reports as a
        # refusal too, or a reply to a command that should not fail).
        phase = pipe.phase if pipe is not None else phase
        conn.poison()
        error = ConnectError(
            f"the relay ended the session during {phase}", code=exc.code, reply=exc.message
        )
        if phase != "DATA":
            raise _DroppedBeforeData(error) from None
        return TransactionResult(_all(recipients, "deferred", error), error=error)
    except (
        TimeoutError,
        aiosmtplib.SMTPServerDisconnected,
        aiosmtplib.SMTPTimeoutError,
        OSError,
    ) as exc:
        phase = pipe.phase if pipe is not None else phase
        conn.poison()
        what = (
            "timed out"
            if isinstance(exc, (TimeoutError, aiosmtplib.SMTPTimeoutError))
            else "dropped"
        )
        if phase != "DATA":
            raise _DroppedBeforeData(
                ConnectError(f"the connection {what} during {phase}: {exc}")
            ) from None
        error = ConnectError(
            f"the connection {what} after the message was sent, before the relay confirmed it; "
            "it may have been delivered"
        )
        done = {a: r for a, r in results.items() if a not in accepted}
        return TransactionResult(
            tuple(
                done.get(a) or RecipientResult(a, "deferred", None, str(error), "ConnectError")
                for a in recipients
            ),
            error=error,
        )


async def _pipelined(
    conn: Connection,
    pipe: Pipeline,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes | bytearray,
    *,
    options: list[str],
    encoding: str,
    command_timeout_s: float,
    data_timeout_s: float,
    results: dict[str, RecipientResult],
    accepted: list[str],
) -> TransactionResult:
    """``send_transaction`` over PIPELINING: the same outcomes from the same replies.

    Fills ``results`` (refused recipients) and ``accepted`` as it goes, so the
    caller's handlers for a dropped session see what was already decided.
    """
    replies = await pipe.send(
        mail_from,
        recipients,
        data,
        mail_options=options,
        encoding=encoding,
        timeout=command_timeout_s,
        data_timeout=data_timeout_s,
    )
    mail = replies.mail
    if mail.code != 250:
        if mail.code == 421:  # the session is closing, nothing was sent: retry on a fresh one
            raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, mail_from)
        error: SMTPError = SenderError(
            f"the relay refused the sender <{mail_from}>", code=mail.code, reply=mail.message
        )
        await _reset(conn, mail.code, command_timeout_s)
        return TransactionResult(_all(recipients, _outcome(mail.code), error), error=error)

    last_refusal: SMTPError | None = None
    for address, reply in zip(recipients, replies.rcpt, strict=True):
        if reply.code in ACCEPTED_RCPT:
            accepted.append(address)
            continue
        if reply.code == 421 and replies.data is None:
            raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)
        last_refusal = RecipientError(
            f"the relay refused the recipient <{address}>", code=reply.code, reply=reply.message
        )
        results[address] = RecipientResult(
            address, _outcome(reply.code), reply.code, reply.message, "RecipientError"
        )

    if not accepted:
        await _reset(conn, None, command_timeout_s)
        error = last_refusal or RecipientError("every recipient was refused")
        if len(recipients) > 1:
            error = type(error)(
                f"the relay refused all {len(recipients)} recipients",
                code=error.code,
                reply=error.reply,
            )
        return TransactionResult(tuple(results[a] for a in recipients), error=error)

    final = replies.data
    if replies.data_start.code != 354 or final is None or final.code != 250:
        refusal = replies.data_start if replies.data_start.code != 354 or final is None else final
        return await _data_refused(
            conn, recipients, accepted, results, refusal.code, refusal.message, command_timeout_s
        )
    return _data_accepted(recipients, accepted, results, final.code, final.message, last_refusal)


async def _data_refused(
    conn: Connection,
    recipients: Sequence[str],
    accepted: Sequence[str],
    results: dict[str, RecipientResult],
    code: int,
    reply: str,
    command_timeout_s: float,
) -> TransactionResult:
    """DATA was refused: the accepted recipients share its reply; the session is reset."""
    error = DeliveryError("the relay refused the message at DATA", code=code, reply=reply)
    if code == 421:
        conn.poison()
    else:
        await _reset(conn, code, command_timeout_s)
    for address in accepted:
        results[address] = RecipientResult(address, _outcome(code), code, reply, "DeliveryError")
    return TransactionResult(tuple(results[a] for a in recipients), code, reply, error=error)


def _data_accepted(
    recipients: Sequence[str],
    accepted: Sequence[str],
    results: dict[str, RecipientResult],
    code: int,
    reply: str,
    last_refusal: SMTPError | None,
) -> TransactionResult:
    """DATA was taken: every accepted recipient is sent; refusals keep their own replies."""
    for address in accepted:
        results[address] = RecipientResult(address, "sent", code, reply)
    return TransactionResult(tuple(results[a] for a in recipients), code, reply, error=last_refusal)


async def _reset(conn: Connection, code: int | None, timeout: float) -> None:
    """Leave the session clean for the next message (RSET), or poison it."""
    if code == 421 or not conn.smtp.is_connected:
        conn.poison()
        return
    try:
        await conn.smtp.rset(timeout=timeout)
    except (aiosmtplib.SMTPException, OSError):
        conn.poison()


def _worth_a_quick_retry(exc: BaseException) -> bool:
    """A failure before DATA that a fresh connection in a second may cure.

    Not a ``ClusterLimitError``: it already waited its while for a slot (or
    Redis is down), so the message is deferred instead.
    """
    return isinstance(exc, (_DroppedBeforeData, ConnectError)) and not isinstance(
        exc, ClusterLimitError
    )


async def deliver(
    pool: Pool,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes | bytearray,
    *,
    smtputf8: bool = False,
    eightbit: bool = False,
    attempts: int = 3,
) -> TransactionResult:
    """Deliver one envelope through ``pool``: the queue-less core every path shares.

    Failures before DATA (a refused connect, a reused session found dead)
    are retried at once on a fresh connection, up to ``attempts`` times
    within a few seconds; if they persist, every recipient is deferred.
    """
    relay = pool.relay

    async def attempt_once() -> TransactionResult:
        async with pool.connection() as conn:
            if pool.limits is not None:
                # The relay's cluster-wide rate. Reserved once a connection is in
                # hand: a reservation made while waiting for a slot would be lost.
                await pool.limits.pace()
            try:
                return await send_transaction(
                    conn,
                    mail_from,
                    recipients,
                    data,
                    command_timeout_s=relay.command_timeout_s,
                    data_timeout_s=relay.data_timeout_s,
                    smtputf8=smtputf8,
                    eightbit=eightbit,
                )
            except _DroppedBeforeData:
                conn.poison()
                raise

    try:
        # The first try runs outside tenacity: its per-attempt bookkeeping was
        # ~10 % of a worker's CPU at full speed, and almost every message is
        # sent at the first try. The retries below keep the same schedule:
        # waits of 0.1·2^(n-1) s (at most 2 s) plus up to 1 s of jitter.
        try:
            return await attempt_once()
        except Exception as exc:  # noqa: BLE001 - the predicate below decides
            if attempts <= 1 or not _worth_a_quick_retry(exc):
                raise
        await asyncio.sleep(min(2.0, 0.1 + random.uniform(0, 1)))
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts - 1),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
            retry=retry_if_exception(_worth_a_quick_retry),
            reraise=True,
        ):
            with attempt:
                return await attempt_once()
    except _DroppedBeforeData as exc:
        return TransactionResult(_all(recipients, "deferred", exc.error), error=exc.error)
    except ConnectError as exc:
        return TransactionResult(_all(recipients, "deferred", exc), error=exc)
    raise AssertionError("unreachable")  # pragma: no cover
