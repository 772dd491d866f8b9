"""The public service calls: enqueue, look, steer, and send now.

``enqueue`` validates everything before it writes anything, writes the
message and its recipients in one transaction, and wakes the broker only
after that transaction commits. Pass your own SQLAlchemy ``Session`` to make
the mail part of your transaction: no commit, no mail.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from .config import get_settings
from .errors import InvalidMessageError, NotFoundError
from .message import Message, build_envelope
from .smtp.delivery import TransactionResult, deliver
from .smtp.pool import Pool, pool_for_relay
from .store import Store, get_engine
from .store import admin as _admin
from .store.admin import MessageInfo
from .store.models import utcnow
from .store.queue import NewMessage, NewRecipient
from .worker.app import dispatch, dispatch_committed

__all__ = [
    "enqueue",
    "enqueue_many",
    "get_status",
    "get_status_by_key",
    "list_messages",
    "stats",
    "retry",
    "retry_failed",
    "cancel",
    "send_now",
    "asend_now",
    "relays",
    "resume_relay",
    "get_attempts",
]


def _store() -> Store:
    url = get_settings().database_url
    return Store(get_engine(url), unpinged=get_engine(url, ping=False))


def new_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): time-ordered, so inserts stay at the index's end."""
    ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | (rand >> 62) << 64
        | 0b10 << 62
        | (rand & ((1 << 62) - 1))
    )
    return uuid.UUID(int=value)


def _prepare(
    message: Message,
    *,
    relay: str | None,
    send_at: dt.datetime | None,
    idempotency_key: str | None,
    metadata: dict[str, Any] | None,
    now: dt.datetime,
) -> NewMessage:
    settings = get_settings()
    envelope = build_envelope(message, max_size=settings.max_message_size, limits=settings.limits)
    try:
        relay = settings.relay_named(relay).name if relay else None
    except KeyError as exc:
        raise InvalidMessageError(str(exc.args[0]), field="relay") from None
    if send_at is not None and send_at.tzinfo is None:
        raise InvalidMessageError("send_at must be timezone-aware", field="send_at")
    due = max(now, send_at) if send_at else now
    if idempotency_key is not None and not (0 < len(idempotency_key) <= 255):
        raise InvalidMessageError("must be 1 to 255 characters", field="idempotency_key")
    return NewMessage(
        id=new_id(),
        mail_from=envelope.mail_from,
        recipients=[NewRecipient(r.address, r.kind) for r in envelope.recipients],
        content=envelope.data,
        subject=envelope.subject,
        smtputf8=envelope.smtputf8,
        eightbit=envelope.eightbit,
        relay=relay or "default",
        next_attempt_at=due,
        expires_at=due + dt.timedelta(seconds=settings.message_lifetime_s),
        dispatched=due <= now,
        idempotency_key=idempotency_key,
        meta=metadata,
    )


def _write_and_dispatch(prepared: Sequence[NewMessage], session: Any | None) -> list[uuid.UUID]:
    store = _store()
    due_now = [m.id for m in prepared if m.dispatched]
    if session is None:
        store.insert(prepared)
        dispatch_committed(due_now)
    else:
        store.insert(prepared, conn=session)
        _dispatch_after_commit(session, due_now)
    return [m.id for m in prepared]


def _dispatch_after_commit(session: Any, ids: list[uuid.UUID]) -> None:
    """Wake the broker when the caller's transaction commits, never before.

    With an ORM ``Session`` we hook its ``after_commit``. With a Core
    ``Connection`` there is no such hook: the rows are written undispatched
    and the scheduler sends them at its next tick.
    """
    from sqlalchemy.orm import Session

    if not ids:
        return
    if isinstance(session, Session):
        event.listen(session, "after_commit", lambda _s: dispatch_committed(ids), once=True)
        return
    # A Core connection: flip the rows to "needs dispatch" inside its transaction.
    from sqlalchemy import update

    from .store.models import MESSAGES

    session.execute(update(MESSAGES).where(MESSAGES.c.id.in_(ids)).values(dispatched_at=None))


def _find_key(key: str, session: Any | None) -> uuid.UUID | None:
    """Look the key up in the caller's transaction when there is one.

    (On SQLite a second connection could not even read-lock while the
    caller's transaction holds the write lock: mailqueue's engine begins
    with ``BEGIN IMMEDIATE``.)
    """
    if session is None:
        return _store().find_by_idempotency_key(key)
    from sqlalchemy import select

    from .store.models import MESSAGES

    table = MESSAGES
    return session.execute(select(table.c.id).where(table.c.idempotency_key == key)).scalar()


def enqueue(
    message: Message,
    *,
    session: Any | None = None,
    relay: str | None = None,
    send_at: dt.datetime | None = None,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Store one message durably and queue it for delivery; returns its id.

    Raises ``InvalidMessageError`` (and writes nothing) for bad input. With
    ``session`` (a SQLAlchemy ``Session`` or ``Connection``) the rows are
    written in the caller's transaction and the broker is woken only after
    it commits. An ``idempotency_key`` already used returns the first
    message's id instead of queueing a second copy.
    """
    if idempotency_key is not None:
        existing = _find_key(idempotency_key, session)
        if existing is not None:
            return str(existing)
    prepared = _prepare(
        message,
        relay=relay,
        send_at=send_at,
        idempotency_key=idempotency_key,
        metadata=metadata,
        now=utcnow(),
    )
    try:
        return str(_write_and_dispatch([prepared], session)[0])
    except IntegrityError:
        if idempotency_key is None or session is not None:
            raise
        existing = _store().find_by_idempotency_key(idempotency_key)
        if existing is None:
            raise
        return str(existing)


def enqueue_many(
    messages: Iterable[Message],
    *,
    session: Any | None = None,
    relay: str | None = None,
    send_at: dt.datetime | None = None,
    chunk_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Store many messages; returns their ids in order.

    All messages are validated first: one bad message refuses the whole
    call and nothing is written. Without ``session`` the rows are written in
    chunks of ``chunk_size`` messages, one transaction each, and each chunk
    is dispatched after its commit. ``progress(n)`` is called after each
    chunk with the number written so far.
    """
    now = utcnow()
    prepared = []
    for index, message in enumerate(messages):
        try:
            prepared.append(
                _prepare(
                    message,
                    relay=relay,
                    send_at=send_at,
                    idempotency_key=None,
                    metadata=None,
                    now=now,
                )
            )
        except InvalidMessageError as exc:
            raise InvalidMessageError(f"message #{index}: {exc}", field=exc.field) from None
    if session is not None:
        ids = _write_and_dispatch(prepared, session)
        if progress:
            progress(len(ids))
        return [str(i) for i in ids]
    ids = []
    for start in range(0, len(prepared), chunk_size):
        ids.extend(_write_and_dispatch(prepared[start : start + chunk_size], None))
        if progress:
            progress(len(ids))
    return [str(i) for i in ids]


def get_status(message_id: str) -> MessageInfo:
    """A message and each recipient's latest outcome; ``NotFoundError`` if unknown."""
    return _admin.get_status(_store().engine, message_id)


def get_status_by_key(idempotency_key: str) -> MessageInfo:
    """The message queued with ``idempotency_key``; ``NotFoundError`` if none."""
    mid = _store().find_by_idempotency_key(idempotency_key)
    if mid is None:
        raise NotFoundError(idempotency_key)
    return get_status(str(mid))


def list_messages(
    *, status: str | None = None, limit: int = 50, before: str | None = None
) -> list[MessageInfo]:
    """Newest first, optionally of one status; page with ``before=<last id>``."""
    return _admin.list_messages(_store().engine, status=status, limit=limit, before=before)


def stats() -> dict[str, dict[str, int]]:
    """Counts per message status and per recipient status."""
    return _admin.stats(_store().engine)


def retry(message_id: str) -> int:
    """Requeue one message's failed and deferred recipients; returns 1 if requeued, else 0."""
    ids = _admin.retry(
        _store().engine, [_admin.parse_id(message_id)], lifetime_s=get_settings().message_lifetime_s
    )
    if not ids:
        _admin.get_status(_store().engine, message_id)  # NotFoundError for an unknown id
    dispatch(ids)
    return len(ids)


def retry_failed() -> int:
    """Requeue every message that has failed recipients; returns how many messages."""
    ids = _admin.retry(_store().engine, None, lifetime_s=get_settings().message_lifetime_s)
    dispatch(ids)
    return len(ids)


def cancel(message_id: str) -> MessageInfo:
    """Cancel the recipients not sent yet."""
    return _admin.cancel(_store().engine, message_id)


def send_now(message: Message, *, relay: str | None = None) -> TransactionResult:
    """Send one message at once, without the queue, through the same pool code.

    For scripts and tests, in the spirit of the classic SMTP clients: returns
    the server's reply to DATA (``data_code``/``data_reply``) and every
    recipient's reply (``result.rcpt_failed`` lists the refusals);
    ``result.raise_for_error()`` turns a refusal into its typed error. Nothing
    is written to SQL. From async code, use ``asend_now``.
    """
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop running here: we may block
    else:
        raise RuntimeError("send_now() blocks; inside an event loop use 'await asend_now(message)'")
    return asyncio.run(asend_now(message, relay=relay))


async def asend_now(
    message: Message, *, pool: Pool | None = None, relay: str | None = None
) -> TransactionResult:
    """``send_now`` for asyncio code; pass a ``pool`` to reuse its connections across calls."""
    settings = get_settings()
    envelope = build_envelope(message, max_size=settings.max_message_size, limits=settings.limits)
    own = pool is None
    if pool is None:
        try:
            pool = pool_for_relay(settings.relay_named(relay), settings)
        except KeyError as exc:
            raise InvalidMessageError(str(exc.args[0]), field="relay") from None
    try:
        return await deliver(
            pool,
            envelope.mail_from,
            [r.address for r in envelope.recipients],
            envelope.data,
            smtputf8=envelope.smtputf8,
            eightbit=envelope.eightbit,
        )
    finally:
        if own:
            await pool.aclose()


def relays() -> list[dict[str, Any]]:
    """Each configured relay (no secrets) with its pause state after auth/TLS failures."""
    from .store.relays import relay_states

    states = {s.name: s for s in relay_states(_store().engine)}
    out = []
    for relay in get_settings().all_relays:
        info = relay.describe()
        state = states.get(relay.name)
        info.update(
            state.to_dict()
            if state
            else {"paused": False, "paused_until": None, "failures": 0, "last_error": None}
        )
        info["name"] = relay.name
        out.append(info)
    return out


_RELAY_ERRORS = ("AuthError", "UnknownAuthError", "TLSError", "RelayPaused")


def resume_relay(name: str) -> bool:
    """Lift a relay's pause now (after fixing its credentials or certificates).

    Its waiting messages are made due at once. Returns False if it was not paused.
    """
    from sqlalchemy import update

    from .store.models import MESSAGES, MessageStatus
    from .store.relays import resume_relay as _resume

    relay = get_settings().relay_named(name)
    engine = _store().engine
    resumed = _resume(engine, relay.name)
    if resumed:
        table = MESSAGES
        with engine.begin() as conn:
            conn.execute(
                update(table)
                .where(
                    table.c.relay == relay.name,
                    table.c.status == MessageStatus.DEFERRED,
                    table.c.last_error.in_(
                        ("AuthError", "UnknownAuthError", "TLSError", "RelayPaused")
                    ),
                )
                .values(next_attempt_at=utcnow(), dispatched_at=None)
            )
    return resumed


def get_attempts(message_id: str) -> list[_admin.AttemptInfo]:
    """Every attempt's result for each recipient of a message, oldest first."""
    return _admin.get_attempts(_store().engine, message_id)
