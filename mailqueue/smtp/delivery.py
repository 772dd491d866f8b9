"""One envelope over one pooled connection, with every reply kept.

We drive MAIL, RCPT and DATA ourselves instead of ``sendmail()`` so that
each recipient's reply is kept (``sendmail`` mixes 4xx and 5xx refusals and
raises when all are refused), each phase has its own timeout, and we know
whether a failure happened before DATA (nothing can have been delivered:
safe to retry at once on a fresh connection) or after it (the relay may
have accepted the message: the recipients are deferred, never retried
in-line).

Both ways of sending (one command at a time, or PIPELINING when the relay
offers it) only collect the relay's replies; ``smtp.outcome.judge`` turns
them into outcomes, with the table the queue's retry policy rests on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import aiosmtplib
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ..errors import ClusterLimitError, ConnectError, DeliveryError
from .outcome import (
    ACCEPTED_RCPT,
    Failure,
    RecipientResult,
    Reply,
    Stage,
    TransactionResult,
    Transcript,
    failed_everyone,
    judge,
)
from .pipelining import Pipeline, supports_pipelining
from .pool import Connection, Pool

__all__ = ["RecipientResult", "TransactionResult", "deliver", "send_transaction"]


class _DroppedBeforeData(Exception):
    """The session failed before any DATA byte was sent: safe to retry now."""

    def __init__(self, result: TransactionResult) -> None:
        super().__init__(str(result.error))
        self.result = result


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
    said = Transcript(refused_before=_unsupported(smtp, len(data), smtputf8, eightbit))
    if said.refused_before is None:
        # RFC 2920: when offered, MAIL, RCPT… and DATA go out in one write; the
        # replies are still read and judged one per command, per recipient.
        collect = _pipelined if supports_pipelining(smtp) else _one_by_one
        options = _mail_options(smtp, len(data), smtputf8, eightbit)
        encoding = "utf-8" if smtputf8 else "ascii"
        envelope = _Envelope(
            mail_from, recipients, data, options, encoding, command_timeout_s, data_timeout_s
        )
        await collect(smtp, said, envelope)
    verdict = judge(mail_from, recipients, said)
    if verdict.connection == "poison":
        conn.poison()
    elif verdict.connection == "reset":
        await _reset(conn, command_timeout_s)
    if verdict.retry_now:
        raise _DroppedBeforeData(verdict.result)
    return verdict.result


class _Envelope(NamedTuple):
    """One transaction's envelope, content and limits, as both send paths take it."""

    mail_from: str
    recipients: Sequence[str]
    data: bytes | bytearray
    options: list[str]
    encoding: str
    command_timeout_s: float
    data_timeout_s: float


_BROKEN = (
    aiosmtplib.SMTPResponseException,
    TimeoutError,
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    OSError,
)
"""What a session that broke raises (an unexpected reply, a timeout, a drop)."""


def _failure(stage: Stage, exc: BaseException) -> Failure:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # An unexpected reply (e.g. 421 on MAIL, which aiosmtplib reports as a
        # refusal too, or a reply to a command that should not fail).
        return Failure(stage, "ended", str(exc), Reply(exc.code, exc.message))
    timed_out = isinstance(exc, (TimeoutError, aiosmtplib.SMTPTimeoutError))
    return Failure(stage, "timed out" if timed_out else "dropped", str(exc))


async def _one_by_one(smtp: aiosmtplib.SMTP, said: Transcript, env: _Envelope) -> None:
    """Collect the replies one command at a time, stopping where the relay stopped us."""
    stage: Stage = "MAIL"
    try:
        try:
            reply = await smtp.mail(
                env.mail_from,
                options=env.options,
                encoding=env.encoding,
                timeout=env.command_timeout_s,
            )
        except aiosmtplib.SMTPSenderRefused as exc:
            said.mail = Reply(exc.code, exc.message)
            return
        said.mail = reply
        stage = "RCPT"
        for address in env.recipients:
            try:
                reply = await smtp.rcpt(
                    address, encoding=env.encoding, timeout=env.command_timeout_s
                )
            except aiosmtplib.SMTPRecipientRefused as exc:
                said.rcpt.append(Reply(exc.code, exc.message))
                if exc.code == 421:
                    return  # the session is closing
            else:
                said.rcpt.append(reply)
        if not any(r.code in ACCEPTED_RCPT for r in said.rcpt):
            return
        stage, said.content_sent = "DATA", True
        try:
            # aiosmtplib types ``data`` as bytes (it copies it several times anyway)
            data = env.data
            response = await smtp.data(
                bytes(data) if isinstance(data, bytearray) else data, timeout=env.data_timeout_s
            )
        except aiosmtplib.SMTPDataError as exc:
            said.data = Reply(exc.code, exc.message)
        else:
            said.data = response
    except _BROKEN as exc:
        said.failure = _failure(stage, exc)


async def _pipelined(smtp: aiosmtplib.SMTP, said: Transcript, env: _Envelope) -> None:
    """Collect the same replies over PIPELINING, as far as they were read."""
    pipe = Pipeline(smtp)
    failure: BaseException | None = None
    try:
        await pipe.send(
            env.mail_from,
            env.recipients,
            env.data,
            mail_options=env.options,
            encoding=env.encoding,
            timeout=env.command_timeout_s,
            data_timeout=env.data_timeout_s,
        )
    except _BROKEN as exc:
        failure = exc
    got = pipe.received
    said.content_sent = pipe.phase == "DATA"
    n = len(env.recipients)
    said.mail = got[0] if got else None
    said.rcpt = got[1 : 1 + n]
    if len(got) > 1 + n and got[1 + n].code != 354:
        said.data = got[1 + n]  # DATA refused: the content was not sent
    elif said.content_sent and len(got) > 2 + n:
        said.data = got[2 + n]  # the reply after the final dot
    if failure is not None:
        stage: Stage = "MAIL" if not got else "RCPT" if len(got) <= n else "DATA"
        said.failure = _failure(stage, failure)


async def _reset(conn: Connection, timeout: float) -> None:
    """Leave the session clean for the next message (RSET), or poison it."""
    if not conn.smtp.is_connected:
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
    before_release: Callable[[TransactionResult], Awaitable[None]] | None = None,
) -> TransactionResult:
    """Deliver one envelope through ``pool``: the queue-less core every path shares.

    Failures before DATA (a refused connect, a reused session found dead)
    are retried at once on a fresh connection, up to ``attempts`` times
    within a few seconds; if they persist, every recipient is deferred.

    ``before_release`` is awaited once with the result that is returned.
    When a connection carried the transaction, it runs while that connection
    is still held, so the queue commits the outcome before the connection
    carries another message: a crash then costs at most one resent message
    per connection. (When no connection got as far as DATA, nothing was
    delivered, and it runs after the last try.) If it raises, the exception
    propagates and the connection is closed, never retried.
    """
    relay = pool.relay
    hook_ran = False  # its exceptions are the caller's, never a reason to resend

    async def attempt_once() -> TransactionResult:
        nonlocal hook_ran
        async with pool.connection() as conn:
            if pool.limits is not None:
                # The relay's cluster-wide rate. Reserved once a connection is in
                # hand: a reservation made while waiting for a slot would be lost.
                await pool.limits.pace()
            result = await send_transaction(
                conn,
                mail_from,
                recipients,
                data,
                command_timeout_s=relay.command_timeout_s,
                data_timeout_s=relay.data_timeout_s,
                smtputf8=smtputf8,
                eightbit=eightbit,
            )
            if before_release is not None:
                hook_ran = True
                await before_release(result)
            return result

    def worth_a_quick_retry(exc: BaseException) -> bool:
        return not hook_ran and _worth_a_quick_retry(exc)

    try:
        # The first try runs outside tenacity: its per-attempt bookkeeping was
        # ~10 % of a worker's CPU at full speed, and almost every message is
        # sent at the first try. The retries below keep the same schedule:
        # waits of 0.1·2^(n-1) s (at most 2 s) plus up to 1 s of jitter.
        try:
            return await attempt_once()
        except Exception as exc:  # noqa: BLE001 - the predicate below decides
            if attempts <= 1 or not worth_a_quick_retry(exc):
                raise
        await asyncio.sleep(min(2.0, 0.1 + random.uniform(0, 1)))
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts - 1),
            wait=wait_exponential_jitter(multiplier=0.2, max=2.0),
            retry=retry_if_exception(worth_a_quick_retry),
            reraise=True,
        ):
            with attempt:
                return await attempt_once()
    except _DroppedBeforeData as exc:
        if hook_ran:
            raise
        result = exc.result
    except ConnectError as exc:
        if hook_ran:
            raise
        result = failed_everyone(recipients, "deferred", exc)
    else:  # pragma: no cover
        raise AssertionError("unreachable")
    if before_release is not None:
        await before_release(result)
    return result
