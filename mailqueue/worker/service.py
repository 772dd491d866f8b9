"""Deliver a batch of message ids: claim, send through the pool, record.

This is what a Celery task runs (on the process's event loop, see
``loop.py``) and what tests call directly. The order of events for one
message is the queue's safety argument:

1. ``claim``: the rows are leased to this worker in one transaction; a
   duplicate task finds nothing to claim.
2. send: through the relay's pool; the lease is renewed while we work.
3. ``record``: each message's outcome is committed as soon as its DATA
   reply arrives, while ``deliver`` still holds the connection (its
   ``before_release``): a connection carries its next message only after
   the previous one's outcome is in SQL. Outcomes from concurrent
   connections share one commit. A crash between the relay's 250 and this
   commit is the one window in which a recipient can receive a second copy,
   and it holds at most one message per connection (the pool's size per
   process), however slow the commit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from .. import metrics as _metrics
from ..backoff import backoff_s
from ..bounces.verp import make_return_path
from ..config import RelayConfig, Settings
from ..errors import AuthError, ConnectError, SMTPError, TLSError
from ..logging_setup import log_attempt
from ..smtp.delivery import RecipientResult, TransactionResult, deliver, failed_everyone
from ..smtp.dkim import DkimSigner, load_signer
from ..smtp.pool import Pool, pool_for_relay
from ..statuses import ErrorWord
from ..store.models import RecipientStatus, utcnow
from ..store.queue import ClaimedMessage, MessageOutcome, RecipientOutcome, Store
from ..store.relays import pause_relay, relay_states, resume_relay
from ..unsubscribe import Signer
from .hooks import notify_if_terminal
from .personal import merge_results, personal_copy, unsubscribe_base, with_list_id

__all__ = ["Deliverer", "BatchReport", "plan_outcome"]

log = logging.getLogger("mailqueue.worker")

_PAUSE_RECHECK_S = 5.0
_SIGN_INLINE_MAX = 256 * 1024
"""Bigger messages are DKIM-signed in a thread, not on the event loop."""


def plan_outcome(
    message: ClaimedMessage,
    result: TransactionResult,
    *,
    settings: Settings,
    now: dt.datetime,
    recorded: Collection[str] = (),
) -> MessageOutcome:
    """Turn one attempt's replies into rows: when to retry, or give up (expired).

    ``recorded``: addresses whose acceptance this attempt already wrote (see
    ``Deliverer._deliver_each``); they are left out of the outcome."""
    by_address = {r.address: r for r in result.recipients if r.address not in recorded}
    next_at: dt.datetime | None = None
    deferred = any(r.status == RecipientStatus.DEFERRED for r in result.recipients)
    expired = False
    if deferred:
        wait = backoff_s(message.attempts, base_s=settings.retry_base_s, max_s=settings.retry_max_s)
        next_at = now + dt.timedelta(seconds=wait)
        expired = next_at >= message.expires_at
    outcomes = []
    for rcpt in message.open_recipients:
        r = by_address.get(rcpt.address)
        if r is None:  # not attempted: keep it open for the next try
            continue
        status: str = r.status
        error = r.error
        if status == RecipientStatus.DEFERRED and expired:
            status, error = RecipientStatus.FAILED, ErrorWord.EXPIRED
        outcomes.append(RecipientOutcome(rcpt.id, status, r.code, r.enhanced_code, r.reply, error))
    last_error = type(result.error).__name__ if result.error else None
    if expired:
        last_error = ErrorWord.EXPIRED
    last_reply = None
    if result.error is not None:
        code = f"{result.error.code} " if result.error.code else ""
        last_reply = f"{code}{result.error.reply or result.error.reason}"
    return MessageOutcome(
        message_id=message.id,
        next_attempt_at=None if expired else next_at,
        recipients=tuple(outcomes),
        last_error=last_error,
        last_reply=last_reply,
    )


def _expired_result(message: ClaimedMessage) -> TransactionResult:

    reply = "message expired in the queue before it could be delivered"
    return TransactionResult(
        tuple(
            RecipientResult(r.address, "failed", None, reply, ErrorWord.EXPIRED)
            for r in message.open_recipients
        ),
        error=SMTPError(reply, retryable=False),
    )


@dataclass
class BatchReport:
    """What one batch did, for logs, metrics and tests."""

    claimed: int = 0
    skipped: int = 0
    recipients: dict[str, int] = field(default_factory=dict)


class _Recorder:
    """Group commit of outcomes, and the keeper of outcomes the database could not take yet.

    Outcomes that finish while a write is in flight share the next commit.
    If the database is unreachable, the outcomes stay in memory and the write
    is retried with backoff until it succeeds: a delivery that happened is
    never forgotten (forgetting it would send it again once the lease ran
    out). Nothing new is claimed meanwhile, since claiming needs the database.
    """

    retry_initial_s = 0.5
    retry_max_s = 10.0

    def __init__(self, store: Store, owner: str) -> None:
        self._store = store
        self._owner = owner
        # (outcome, who waits for its commit, monotonic time its reply arrived)
        self._pending: list[tuple[MessageOutcome, asyncio.Future[None], float]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, outcome: MessageOutcome) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, future, time.monotonic()))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        await future

    async def _write(self) -> None:
        while self._pending:
            batch: list[tuple[MessageOutcome, asyncio.Future[None], float]] = []

            # Never gives up (stop_never): the outcomes are kept until SQL takes them.
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=self.retry_initial_s, max=self.retry_max_s),
                retry=retry_if_exception_type(Exception),
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    # Each try writes everything pending, outcomes that came meanwhile too.
                    batch, self._pending = self._pending, []
                    try:
                        await asyncio.to_thread(
                            self._store.record, [o for o, _, _ in batch], owner=self._owner
                        )
                    except Exception:
                        self._pending = batch + self._pending
                        raise
            # The duplicate window, measured: from the reply to the committed row.
            committed = time.monotonic()
            _metrics.outcomes_committed([committed - since for _, _, since in batch])
            for _, future, _ in batch:
                if not future.done():
                    future.set_result(None)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "could not record %d outcome(s) (%s: %s); keeping them, retry in %.1fs",
            len(self._pending),
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
            state.next_action.sleep if state.next_action else 0.0,
        )


class _ContentBudget:
    """Bytes of message content read outside the claim that one process holds at once.

    Every message of a batch starts at once and waits for a connection only in
    ``deliver``; without a bound each big message would read its content first
    and hold it while it waited (a batch of 50 messages of 20 MB: 1 GB).
    A message bigger than the whole budget still goes, alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size

    async def release(self, size: int) -> None:
        async with self._changed:
            self.used -= size
            self._changed.notify_all()


BIG_CONTENT_BUDGET = 64 * 1024 * 1024


class Deliverer:
    """One per process and event loop: the pools, the store and the recorder."""

    def __init__(self, settings: Settings, store: Store, *, owner: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pools: dict[str, Pool] = {}
        self._recorder = _Recorder(store, self.owner)
        self._paused: dict[str, dt.datetime] = {}  # relay name -> until (auth/TLS trouble)
        self._paused_checked: dict[str, float] = {}  # relay name -> when we last read SQL
        self._content_budget = _ContentBudget(BIG_CONTENT_BUDGET)
        # Keys are read here, once per process (the CLI reads them before the
        # worker starts too, so that a bad key is exit 2, not a crashing child).
        self._dkim: DkimSigner | None = load_signer(settings)
        self._unsubscribe_signer: Signer | None = Signer.from_settings(settings)
        self._copies: dict[str, asyncio.Semaphore] = {}  # relay name -> copy slots

    def _copy_slots(self, pool: Pool) -> asyncio.Semaphore:
        """Per-recipient copies in flight through ``pool``, all messages together: no
        more than its connections, so a batch of list mail holds a few copies, not one
        per recipient of every message."""
        slots = self._copies.get(pool.relay.name)
        if slots is None:
            slots = self._copies[pool.relay.name] = asyncio.Semaphore(max(1, pool.relay.pool_size))
        return slots

    def pool_for(self, relay_name: str) -> Pool:
        """The pool of the named relay (KeyError when no such relay is configured)."""
        relay: RelayConfig = self.settings.relay_named(relay_name)
        pool = self._pools.get(relay.name)
        if pool is None:
            pool = self._pools[relay.name] = pool_for_relay(relay, self.settings)
        return pool

    async def deliver_batch(self, ids: Sequence[uuid.UUID]) -> BatchReport:
        """Claim what is due among ``ids`` and deliver it; record every outcome."""
        lease_s = self.settings.lease_s
        claimed = await asyncio.to_thread(self.store.claim, ids, owner=self.owner, lease_s=lease_s)
        report = BatchReport(claimed=len(claimed), skipped=len(ids) - len(claimed))
        if not claimed:
            return report
        renewer = asyncio.create_task(self._renew([m.id for m in claimed], lease_s))
        try:
            results = await asyncio.gather(
                *(self._deliver_one(m) for m in claimed), return_exceptions=True
            )
        finally:
            renewer.cancel()
        failures = [r for r in results if isinstance(r, BaseException)]
        for outcome in results:
            if isinstance(outcome, MessageOutcome):
                for r in outcome.recipients:
                    report.recipients[r.status] = report.recipients.get(r.status, 0) + 1
        if failures:
            # The leases of these messages stay; they expire and the scheduler
            # hands the messages out again. Surface the first cause.
            raise failures[0]
        return report

    async def _deliver_one(self, message: ClaimedMessage) -> MessageOutcome | None:
        now = utcnow()
        early: list[RecipientOutcome] = []  # acceptances recorded as they came
        outcome: MessageOutcome | None = None

        async def commit(result: TransactionResult) -> None:
            """Record the outcome while ``deliver`` still holds the connection
            (``MAILQUEUE_COMMIT_BEFORE_REUSE``)."""
            nonlocal outcome
            outcome = plan_outcome(message, result, settings=self.settings, now=utcnow())
            await self._recorder.record(outcome)

        open_recipients = message.open_recipients
        addresses = [r.address for r in open_recipients]
        if not open_recipients:
            result = TransactionResult(())
        elif message.expires_at <= now:
            result = _expired_result(message)
        else:
            try:
                pool = self.pool_for(message.relay)
            except KeyError as exc:
                # Configuration changed under queued mail: wait for it to come back.
                result = failed_everyone(
                    addresses, "deferred", ConnectError(str(exc.args[0]), retryable=True)
                )
            else:
                paused_until = await self._paused_until(pool.relay.name, now)
                if paused_until is not None and paused_until > now:
                    await self._release(message, paused_until, None)
                    return None
                held = 0 if message.content is not None else message.size
                if held:  # a big message: read in slices, not with the claim
                    await self._content_budget.acquire(held)
                content: bytes | bytearray | None = message.content
                try:
                    if content is None:
                        content = await asyncio.to_thread(
                            self.store.load_content, message.id, message.size
                        )
                    if message.list_id is not None:
                        content = with_list_id(content, message.list_id)
                    if message.unsubscribe or self.settings.bounce_domain is not None:
                        result, early = await self._deliver_each(message, pool, addresses, content)
                    else:
                        result = await self._sign_and_send(
                            message,
                            pool,
                            addresses,
                            content,
                            before_release=commit if self.settings.commit_before_reuse else None,
                        )
                except (AuthError, TLSError) as exc:
                    await self._pause(pool.relay, exc)
                    await self._release(message, self._paused[pool.relay.name], exc)
                    return None
                finally:
                    content = None  # the budget counts it as gone: let it be
                    if held:
                        await self._content_budget.release(held)
                if paused_until is not None:
                    self._paused.pop(pool.relay.name, None)
                    await asyncio.to_thread(resume_relay, self.store.engine, pool.relay.name)
        if outcome is None:  # not recorded while a connection was held
            ids = {r.recipient_id for r in early}
            recorded = {r.address for r in message.recipients if r.id in ids}
            outcome = plan_outcome(
                message, result, settings=self.settings, now=utcnow(), recorded=recorded
            )
            await self._recorder.record(outcome)
        _metrics.observe_attempt(
            message, result, replace(outcome, recipients=(*early, *outcome.recipients))
        )
        log_attempt(message, outcome)
        if self.settings.on_terminal:  # MAILQUEUE_ON_TERMINAL (see hooks.py)
            await notify_if_terminal(self.settings.on_terminal, self.store, message.id)
        return outcome

    async def _sign_and_send(
        self,
        message: ClaimedMessage,
        pool: Pool,
        addresses: Sequence[str],
        content: bytes | bytearray,
        mail_from: str | None = None,
        *,
        sign: bool = True,
        before_release: Callable[[TransactionResult], Awaitable[None]] | None = None,
    ) -> TransactionResult:
        """DKIM-sign ``content`` (unless ``sign`` is false: signed already) and send it to
        ``addresses`` (from ``mail_from``, the message's envelope sender unless a VERP
        return path)."""
        signed = await self._signed(message, pool, content) if sign else content
        if isinstance(signed, SMTPError):
            return failed_everyone(addresses, "failed", signed)
        return await deliver(
            pool,
            mail_from or message.mail_from,
            addresses,
            signed,
            smtputf8=message.smtputf8,
            eightbit=message.eightbit,
            before_release=before_release,
        )

    async def _signed(
        self, message: ClaimedMessage, pool: Pool, content: bytes | bytearray
    ) -> bytes | bytearray | SMTPError:
        """``content`` DKIM-signed when a key or the relay asks (unsigned when it cannot
        be signed), or why not when the relay requires a signature (``dkim=required``)."""
        required = pool.relay.dkim == "required"
        if self._dkim is None and not required:
            return content
        content, unsigned = await self._sign(message, content, pool.relay)
        return unsigned if unsigned is not None and required else content

    async def _deliver_each(
        self,
        message: ClaimedMessage,
        pool: Pool,
        addresses: Sequence[str],
        content: bytes | bytearray,
    ) -> tuple[TransactionResult, list[RecipientOutcome]]:
        """One transaction per recipient; the merged result, and the acceptances
        already recorded.

        Two features need a copy per recipient: ``unsubscribe=True`` (each copy
        carries its own List-Unsubscribe) and ``MAILQUEUE_BOUNCE_DOMAIN`` (each
        transaction has its own signed VERP return path, ``bounces/verp.py``, so a
        bounce names its row); the copy's bytes are the same for every recipient
        when only the second asks, so they are signed once.

        The copies go out concurrently, at most the relay's pool size of them
        being made and sent at once across all messages (``_copy_slots``). Each
        acceptance is recorded as soon as its DATA reply arrives (an early,
        non-final outcome sharing the recorder's group commit), before that
        copy's connection slot goes to the next copy: a crash later in the
        attempt does not send it again (invariant 2). The rest are recorded
        with the attempt's outcome. An auth or TLS failure defers only the
        copies it hit (others may have been accepted) and pauses the relay.
        """
        early: list[RecipientOutcome] = []
        signer = self._unsubscribe_signer
        base: bytes | bytearray | SMTPError = (
            unsubscribe_base(self.settings, signer, content)
            if message.unsubscribe
            else await self._signed(message, pool, content)  # one copy for all
        )
        if isinstance(base, SMTPError):
            return failed_everyone(addresses, "failed", base), early
        shared: bytes | bytearray = base
        ids = {r.address: r.id for r in message.open_recipients}
        domain, secret = self.settings.bounce_domain, self.settings.bounce_secret

        def envelope_sender(address: str) -> str | None:
            if domain is None:
                return None
            return make_return_path(
                secret=secret,
                domain=domain,
                message_id=message.id,
                recipient_id=ids[address],
                address=address,
            )

        def copy_for(address: str) -> bytes | bytearray | SMTPError:
            if not message.unsubscribe:
                return shared
            assert signer is not None  # unsubscribe_base refused the message otherwise
            return personal_copy(self.settings, signer, message, address, bytes(shared))

        broken: list[AuthError | TLSError] = []
        room = self._copy_slots(pool)

        async def accept(result: TransactionResult) -> None:
            """Record this copy's acceptances now, as a non-final outcome."""
            sent = tuple(
                RecipientOutcome(ids[r.address], r.status, r.code, r.enhanced_code, r.reply, None)
                for r in result.recipients
                if r.status == RecipientStatus.SENT
            )
            if sent:
                accepted = MessageOutcome(message.id, None, recipients=sent, final=False)
                await self._recorder.record(accepted)
                early.extend(sent)
                log_attempt(message, accepted)

        held = self.settings.commit_before_reuse  # record before the connection is reused

        async def one(address: str) -> TransactionResult:
            async with room:
                copy = copy_for(address)
                if isinstance(copy, SMTPError):
                    return failed_everyone([address], "failed", copy)
                try:
                    result = await self._sign_and_send(
                        message,
                        pool,
                        [address],
                        copy,
                        envelope_sender(address),
                        sign=message.unsubscribe,  # the shared copy is signed already
                        before_release=accept if held else None,
                    )
                except (AuthError, TLSError) as exc:
                    broken.append(exc)
                    return failed_everyone([address], "deferred", exc)
                if not held:
                    await accept(result)
                return result

        results = await asyncio.gather(*(one(a) for a in addresses))
        if broken:
            await self._pause(pool.relay, broken[0])
        return merge_results(results), early

    async def _sign(
        self, message: ClaimedMessage, content: bytes | bytearray, relay: RelayConfig
    ) -> tuple[bytes | bytearray, SMTPError | None]:
        """``content`` with its DKIM signature(s): the exact bytes ``deliver`` sends,
        and why it is unsigned (``None`` when it is signed).

        A big message is signed in a thread (hashing its body takes a while);
        a message dkimpy cannot parse is unsigned, with a warning. The caller
        sends it unsigned, or fails it when the relay says ``dkim=required``.
        """
        if self._dkim is None:
            return content, SMTPError(
                f"relay {relay.name!r} requires DKIM (dkim=required) and this worker has no "
                "DKIM key: set MAILQUEUE_DKIM__<DOMAIN>__SELECTOR and __KEY_FILE where the "
                "workers run, then retry the message",
                retryable=False,
            )
        sign = self._dkim.sign
        try:
            if len(content) > _SIGN_INLINE_MAX:
                signed = await asyncio.to_thread(sign, content)
            else:
                signed = sign(content)
        except Exception as exc:  # noqa: BLE001 - sending unsigned beats not sending
            first = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"dkimpy refused it ({type(exc).__name__}: {first})"
            log.warning(
                "message %s: not DKIM-signed, %s; %s",
                message.id,
                reason,
                "not sent (dkim=required)" if relay.dkim == "required" else "sent unsigned",
            )
            return content, SMTPError(f"not DKIM-signed: {reason}", retryable=False)
        if not signed.algorithms:
            log.debug(
                "message %s: no DKIM key for its From domain %s; %s",
                message.id,
                signed.domain,
                "not sent (dkim=required)" if relay.dkim == "required" else "sent unsigned",
            )
            where = (signed.domain or "").upper().replace(".", "_").replace("-", "_")
            return signed.data, SMTPError(
                f"relay {relay.name!r} requires DKIM (dkim=required) and the From domain "
                f"{signed.domain or '(none)'} has no DKIM key: set "
                f"MAILQUEUE_DKIM__{where or '<DOMAIN>'}__SELECTOR and __KEY_FILE where the "
                "workers run, then retry the message",
                retryable=False,
            )
        return signed.data, None

    async def _paused_until(self, name: str, now: dt.datetime) -> dt.datetime | None:
        """This relay's pause, as SQL says (read at most every few seconds per process)."""
        clock = time.monotonic()
        if clock - self._paused_checked.get(name, -1e9) > _PAUSE_RECHECK_S:
            self._paused_checked[name] = clock
            states = await asyncio.to_thread(relay_states, self.store.engine)
            state = next((st for st in states if st.name == name), None)
            if state is not None and state.paused_until is not None:
                self._paused[name] = state.paused_until
            else:
                self._paused.pop(name, None)
        return self._paused.get(name)

    async def _pause(self, relay: RelayConfig, exc: SMTPError) -> None:
        """Auth/TLS trouble is the relay's: pause it (with backoff) for every message.

        Every message in flight that meets the same trouble lands here; the
        store counts one event per pause (``pause_relay``), and only the call
        that began the pause logs it.
        """
        pause = await asyncio.to_thread(
            pause_relay, self.store.engine, relay.name, error=type(exc).__name__, reply=str(exc)
        )
        self._paused[relay.name] = pause.until
        if pause.started:
            log.error(
                "relay %s paused until %s (failure %d in a row): %s: %s",
                relay.name,
                pause.until.isoformat(),
                pause.failures,
                type(exc).__name__,
                exc,
            )

    async def _release(
        self, message: ClaimedMessage, until: dt.datetime, exc: SMTPError | None
    ) -> None:
        await asyncio.to_thread(
            self.store.release,
            [message.id],
            owner=self.owner,
            due_at=until,
            error=type(exc).__name__ if exc else ErrorWord.RELAY_PAUSED,
            reply=str(exc) if exc else f"relay {message.relay!r} is paused after auth/TLS errors",
        )

    async def _renew(self, ids: list[uuid.UUID], lease_s: float) -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                await asyncio.to_thread(self.store.renew, ids, owner=self.owner, lease_s=lease_s)
            except Exception:  # noqa: BLE001 - the lease then simply runs out
                log.warning("could not renew leases", exc_info=True)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
