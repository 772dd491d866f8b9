"""The public service calls: enqueue, look, steer, and send now.

``enqueue`` validates everything before it writes anything, writes the
message and its recipients in one transaction, and wakes the broker only
after that transaction commits. Pass your own SQLAlchemy ``Session`` to make
the mail part of your transaction: no commit, no mail.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from .config import Settings, get_settings, hide_password, url_passwords
from .errors import AuthError, InvalidMessageError, NotFoundError, TLSError, UnknownAuthError
from .headers import CONTROL
from .message import Envelope, Message, build_envelope, validate_address
from .smtp.delivery import TransactionResult, deliver
from .smtp.pool import Pool, pool_for_relay
from .statuses import ErrorWord, SuppressionReason
from .store import Store, get_engine
from .store import admin as _admin
from .store import ops as _ops
from .store.admin import AttemptInfo, MessageInfo, RecipientInfo
from .store.models import utcnow
from .store.ops import TAG_KEY, Filters, RelayDepth, parse_duration
from .store.queue import NewMessage, NewRecipient
from .store.suppression import (
    DOMAIN_SCOPE,
    EVERYWHERE,
    LIST_SCOPE,
    NewSuppression,
    SuppressionInfo,
    address_key,
    scopes_for,
    sender_domain_scope,
)
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
    "suppress",
    "unsuppress",
    "suppressions",
    "is_suppressed",
    "import_suppressions",
    "export_suppressions",
    # for the faces (CLI, status page, Django, Flask): what they use beyond the above
    "AttemptInfo",
    "Filters",
    "MessageInfo",
    "PreparedMessage",
    "RecipientInfo",
    "RelayDepth",
    "SuppressionInfo",
    "check_list_id",
    "suppression_counts",
    "suppression_key",
    "TAG_KEY",
    "cancel_relay",
    "find_by_idempotency_key",
    "find_by_metadata",
    "insert_prepared",
    "message_meta",
    "parse_duration",
    "ping",
    "prepare",
    "purge",
    "probe_relay",
    "queue_depth",
    "resolve_id",
    "retry_failed_since",
    "search",
    "series",
    "utcnow",
    "wake",
    "without_secrets",
    "write_and_dispatch",
]

log = logging.getLogger("mailqueue.enqueue")

PreparedMessage: TypeAlias = NewMessage
"""A validated message with its rows' values, not written yet (see :func:`prepare`)."""


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


# Exceptions a composing bug could raise from deep inside the ``email`` package
# or our own code. Whatever the input, the caller must see a refusal
# (``InvalidMessageError``), never a bare crash; a new one of these is a bug to
# fix in message.py, but until then it refuses the message instead of leaking.
_COMPOSE_BUGS = (IndexError, AttributeError, TypeError, LookupError, ValueError)  # + UnicodeError

METADATA_MAX_DEPTH = 32
"""Deepest nesting of lists and objects accepted in ``metadata``."""
METADATA_MAX_BYTES = 64 * 1024
"""Largest ``metadata`` accepted, as compact JSON (UTF-8 bytes)."""
TAG_MAX_LENGTH = 255
"""Longest ``metadata["tag"]``: the list filters and an index read it."""


def _type_name(value: object) -> str:
    return type(value).__name__


def _envelope(message: object, settings: Settings) -> Envelope:
    """``build_envelope`` for anything a caller passed: an envelope or a refusal."""
    if not isinstance(message, Message):
        raise InvalidMessageError(
            f"expected a mailqueue.Message, got {_type_name(message)}", field="message"
        )
    try:
        return build_envelope(message, max_size=settings.max_message_size, limits=settings.limits)
    except InvalidMessageError:
        raise
    except _COMPOSE_BUGS as exc:
        raise InvalidMessageError(
            f"could not compose the message ({_type_name(exc)}: {exc}); "
            "check its addresses, headers and parts",
            field=None,
        ) from None


def _check_relay(relay: object) -> None:
    if relay is not None and not isinstance(relay, str):
        raise InvalidMessageError(
            f"must be a relay name (a string), not {_type_name(relay)}", field="relay"
        )


def _check_send_at(send_at: object) -> None:
    if send_at is None:
        return
    if not isinstance(send_at, dt.datetime):
        raise InvalidMessageError(
            f"must be a timezone-aware datetime, not {_type_name(send_at)}", field="send_at"
        )
    if send_at.tzinfo is None or send_at.utcoffset() is None:
        raise InvalidMessageError("must be timezone-aware", field="send_at")
    try:  # the message's lifetime is added to it: that must still be a datetime
        too_far = send_at.astimezone(dt.UTC).year > 9000
    except OverflowError:
        too_far = True
    if too_far:
        raise InvalidMessageError("is too far in the future (after the year 9000)", field="send_at")


def _check_idempotency_key(key: object) -> None:
    if key is None:
        return
    if not isinstance(key, str):
        raise InvalidMessageError(
            f"must be a string, not {_type_name(key)}", field="idempotency_key"
        )
    if not (0 < len(key) <= 255):
        raise InvalidMessageError("must be 1 to 255 characters", field="idempotency_key")
    if CONTROL.search(key):
        raise InvalidMessageError(
            "contains NUL or another control character", field="idempotency_key"
        )


_Path: TypeAlias = tuple[str, "_Path"] | None
"""Where a metadata value sits: (its key or index, the parent's path)."""


def _check_metadata(metadata: object) -> None:
    """JSON that reads back as it was given, within the depth and size limits.

    Walked without recursion, so a cyclic or 100,000-deep object is refused
    rather than a ``RecursionError``; strings must be storable in
    PostgreSQL's JSON (no NUL, no lone surrogate).
    """
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidMessageError(
            f"must be a JSON object (a dict), not {_type_name(metadata)}", field="metadata"
        )
    too_big = InvalidMessageError(
        f"over the {METADATA_MAX_BYTES}-byte limit as JSON", field="metadata"
    )
    # A lower bound of the JSON size, counted as we go, so a huge value is
    # refused before it is serialized.
    budget = METADATA_MAX_BYTES
    stack: list[tuple[object, int, _Path]] = [(metadata, 1, None)]
    while stack:
        value, depth, path = stack.pop()
        budget -= 1
        if isinstance(value, dict | list | tuple) and depth > METADATA_MAX_DEPTH:
            raise InvalidMessageError(
                f"nested deeper than {METADATA_MAX_DEPTH} levels (at {_where(path)})",
                field="metadata",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidMessageError(
                        f"keys must be strings, not {_type_name(key)} (in {_where(path)})",
                        field="metadata",
                    )
                _check_json_string(key, path)
                budget -= len(key) + 3
                stack.append((item, depth + 1, (repr(key[:30]), path)))
        elif isinstance(value, list | tuple):
            budget -= len(value)
            stack.extend((item, depth + 1, (str(i), path)) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_json_string(value, path)
            budget -= len(value) + 1
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidMessageError(
                    f"{_where(path)} is {value}, which JSON cannot hold", field="metadata"
                )
        elif isinstance(value, int):  # bool included
            budget -= value.bit_length() // 4
        elif value is not None:
            raise InvalidMessageError(
                f"{_where(path)} is a {_type_name(value)}, which is not JSON "
                "(use objects, lists, strings, numbers, true/false or null)",
                field="metadata",
            )
        if budget < 0:
            raise too_big
    try:
        text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # e.g. an int over Python's digit limit
        raise InvalidMessageError(str(exc), field="metadata") from None
    if len(text.encode("utf-8")) > METADATA_MAX_BYTES:
        raise too_big
    tag = metadata.get("tag")
    if tag is not None and not (isinstance(tag, str) and len(tag) <= TAG_MAX_LENGTH):
        raise InvalidMessageError(
            f"metadata['tag'] must be a string of at most {TAG_MAX_LENGTH} characters",
            field="metadata",
        )


def _where(path: _Path) -> str:
    """``metadata['a'][0]`` for the linked path kept while walking."""
    parts = []
    while path is not None:
        label, path = path
        parts.append(f"[{label}]")
    parts.reverse()
    if len(parts) > 6:
        parts[3:-2] = ["[…]"]
    return "metadata" + "".join(parts)


def _check_json_string(value: str, path: _Path) -> None:
    if "\x00" in value:
        raise InvalidMessageError(f"{_where(path)} holds a NUL character", field="metadata")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessageError(
            f"{_where(path)} is not valid Unicode (a lone surrogate)", field="metadata"
        ) from None


def prepare(
    message: Message,
    *,
    relay: str | None,
    send_at: dt.datetime | None,
    idempotency_key: str | None,
    metadata: dict[str, Any] | None,
    now: dt.datetime,
    list_id: str | None = None,
) -> PreparedMessage:
    """Check and compose one message for writing; nothing is written.

    Raises ``InvalidMessageError`` as :func:`enqueue` does. ``now`` is the
    enqueue time (one value for a batch): the message is due at ``send_at``
    or ``now``, and expires a message lifetime after that.
    """
    settings = get_settings()
    _check_relay(relay)
    _check_send_at(send_at)
    _check_idempotency_key(idempotency_key)
    _check_metadata(metadata)
    list_id = check_list_id(list_id)
    envelope = _envelope(message, settings)
    try:
        relay = settings.relay_named(relay).name if relay else None
    except KeyError as exc:
        raise InvalidMessageError(str(exc.args[0]), field="relay") from None
    due = max(now, send_at) if send_at else now
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
        list_id=list_id,
    )


def write_and_dispatch(
    prepared: Sequence[PreparedMessage], session: Any | None = None
) -> list[uuid.UUID]:
    """Write prepared messages in one transaction, then wake the broker for those due.

    Without ``session`` mailqueue commits and dispatches at once; with a
    SQLAlchemy ``Session`` or ``Connection`` the rows join the caller's
    transaction and the broker hears of them after it commits. Raises
    SQLAlchemy's ``IntegrityError`` when an idempotency key is taken, and
    nothing after the commit: see :func:`wake`.
    """
    store = _store()
    due_now = [m.id for m in prepared if m.dispatched]
    if session is None:
        store.insert(prepared)
        wake(due_now)
    else:
        store.insert(prepared, conn=session)
        _dispatch_after_commit(session, due_now)
    return [m.id for m in prepared]


def _dispatch_after_commit(session: Any, ids: list[uuid.UUID]) -> None:
    """Wake the broker when the caller's transaction commits, never before.

    With an ORM ``Session`` we hook its ``after_commit`` (and :func:`wake`
    never raises there, so the caller's ``commit()`` does not raise after
    committing). With a Core ``Connection`` there is no such hook: the rows
    are written undispatched and the scheduler sends them at its next tick.
    """
    from sqlalchemy.orm import Session

    if not ids:
        return
    if isinstance(session, Session):
        event.listen(session, "after_commit", lambda _s: wake(ids), once=True)
        return
    # A Core connection: flip the rows to "needs dispatch" inside its transaction.
    _ops.mark_undispatched(session, ids)


def _find_key(key: str, session: Any | None) -> uuid.UUID | None:
    """Look the key up in the caller's transaction when there is one.

    (On SQLite a second connection could not even read-lock while the
    caller's transaction holds the write lock: mailqueue's engine begins
    with ``BEGIN IMMEDIATE``.)
    """
    if session is None:
        return find_by_idempotency_key(key)
    return _ops.id_by_key(session, key)


def find_by_idempotency_key(key: str) -> uuid.UUID | None:
    """The id of the message queued with idempotency ``key``, or None."""
    return _store().find_by_idempotency_key(key)


def open_session() -> Any:
    """A SQLAlchemy ``Session`` on mailqueue's own database: pass it as ``session=``
    to ``enqueue`` to queue several messages in one transaction you commit."""
    from sqlalchemy.orm import Session

    return Session(_store().engine)


def wake(ids: Sequence[uuid.UUID]) -> None:
    """Tell the workers about messages whose rows are committed (after the caller's commit).

    Hands the ids to the broker (in the background unless ``MAILQUEUE_DISPATCH=inline``);
    if the broker cannot take them, the scheduler sends them at its next tick.

    Never raises (ARCHITECTURE, invariant 10): the rows are committed, so the
    mail is queued whatever happens here. A broker that is down, or whose
    transport cannot even be imported (a missing extra), is logged as a
    WARNING and the rows are flagged for the scheduler; a caller that retried
    an error from here would queue the mail twice.
    """
    if not ids:
        return
    try:
        dispatch_committed(ids)
    except Exception as exc:  # noqa: BLE001 - any failure past the commit is the scheduler's
        _broker_failed(ids, exc)


def _broker_failed(ids: Sequence[uuid.UUID], exc: Exception) -> None:
    url = get_settings().broker_url
    log.warning(
        "%d message(s) committed (%s), but the broker %s could not be woken (%s: %s); "
        "they stay queued in SQL and the scheduler will pick them up at its next tick",
        len(ids),
        ", ".join(str(i) for i in ids[:3]) + (", ..." if len(ids) > 3 else ""),
        hide_password(url),
        type(exc).__name__,
        _without_secrets(str(exc), url),
    )
    try:
        _store().mark_undispatched(list(ids))
    except Exception as again:  # noqa: BLE001
        log.warning(
            "could not flag them for the scheduler either (%s); it sends them once "
            "redispatch_after_s has passed",
            type(again).__name__,
        )


def _dispatch_requeued(ids: Sequence[uuid.UUID]) -> None:
    """The broker, told of messages a retry just requeued (their rows are committed):
    like :func:`wake`, never raises, so a caller that retried an error would not
    requeue twice; what the broker did not take, the scheduler sends."""
    try:
        dispatch(ids)
    except Exception as exc:  # noqa: BLE001 - any failure past the commit is the scheduler's
        _broker_failed(ids, exc)


def _without_secrets(text: str, url: str) -> str:
    """``text`` with the broker URL masked, and its password wherever it appears alone."""
    text = text.replace(url, hide_password(url))
    for secret in url_passwords(url):
        text = text.replace(secret, "***")
    return text


without_secrets = _without_secrets
"""``without_secrets(text, url)``: an error's text fit to show (``mailqueue check``)."""


def insert_prepared(prepared: Sequence[PreparedMessage], *, conn: Any) -> None:
    """Write prepared messages through ``conn``, the caller's executor; no dispatch.

    ``conn`` runs the INSERTs in the caller's transaction: a SQLAlchemy
    ``Connection`` or ``Session``, or an object with ``execute(statement,
    rows)`` (the Django backend's). The caller wakes the broker after its
    commit (:func:`wake`), or leaves it to the scheduler.
    """
    _store().insert(prepared, conn=conn)


def enqueue(
    message: Message,
    *,
    session: Any | None = None,
    relay: str | None = None,
    send_at: dt.datetime | None = None,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    list_id: str | None = None,
) -> str:
    """Store one message durably and queue it for delivery; returns its id.

    Raises ``InvalidMessageError`` (and writes nothing) for bad input: a
    ``message`` that is not a ``Message`` or cannot be composed, a ``send_at``
    that is not a timezone-aware ``datetime``, a ``relay`` or
    ``idempotency_key`` that is not a string, ``metadata`` that is not a JSON
    object (string keys; at most ``METADATA_MAX_DEPTH`` levels and
    ``METADATA_MAX_BYTES`` as JSON; ``metadata["tag"]`` a string of at most
    ``TAG_MAX_LENGTH`` characters). Never a bare ``TypeError`` or
    ``IndexError``. With
    ``session`` (a SQLAlchemy ``Session`` or ``Connection``) the rows are
    written in the caller's transaction and the broker is woken only after
    it commits. An ``idempotency_key`` already used returns the first
    message's id instead of queueing a second copy. ``list_id`` (an RFC 2919
    list id, ``news.example.com``) names the mailing list it belongs to:
    ``list:<id>`` suppressions apply to it.
    """
    _check_idempotency_key(idempotency_key)
    if idempotency_key is not None:
        existing = _find_key(idempotency_key, session)
        if existing is not None:
            return str(existing)
    prepared = prepare(
        message,
        relay=relay,
        send_at=send_at,
        idempotency_key=idempotency_key,
        metadata=metadata,
        now=utcnow(),
        list_id=list_id,
    )
    try:
        return str(write_and_dispatch([prepared], session)[0])
    except IntegrityError:
        if idempotency_key is None or session is not None:
            raise
        existing = find_by_idempotency_key(idempotency_key)
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
    list_id: str | None = None,
) -> list[str]:
    """Store many messages; returns their ids in order.

    All messages are validated first: one bad message (or an item that is
    not a ``Message``) refuses the whole call with ``InvalidMessageError``
    naming its index, and nothing is written. Without ``session`` the rows are written in
    chunks of ``chunk_size`` messages, one transaction each, and each chunk
    is dispatched after its commit. ``progress(n)`` is called after each
    chunk with the number written so far. ``list_id``: as for :func:`enqueue`,
    for every message.
    """
    _check_relay(relay)
    _check_send_at(send_at)
    list_id = check_list_id(list_id)
    if isinstance(messages, Message | str | bytes | dict) or not isinstance(messages, Iterable):
        raise InvalidMessageError(
            f"expected an iterable of mailqueue.Message, got {_type_name(messages)}",
            field="messages",
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidMessageError("must be a whole number of 1 or more", field="chunk_size")
    now = utcnow()
    prepared = []
    for index, message in enumerate(messages):
        try:
            prepared.append(
                prepare(
                    message,
                    relay=relay,
                    send_at=send_at,
                    idempotency_key=None,
                    metadata=None,
                    now=now,
                    list_id=list_id,
                )
            )
        except InvalidMessageError as exc:
            raise InvalidMessageError(f"message #{index}: {exc.reason}", field=exc.field) from None
    if session is not None:
        ids = write_and_dispatch(prepared, session)
        if progress:
            progress(len(ids))
        return [str(i) for i in ids]
    ids = []
    for start in range(0, len(prepared), chunk_size):
        ids.extend(write_and_dispatch(prepared[start : start + chunk_size], None))
        if progress:
            progress(len(ids))
    return [str(i) for i in ids]


def get_status(message_id: str) -> MessageInfo:
    """A message and each recipient's latest outcome; ``NotFoundError`` if unknown."""
    return _admin.get_status(_store().engine, message_id)


def get_status_by_key(idempotency_key: str) -> MessageInfo:
    """The message queued with ``idempotency_key``; ``NotFoundError`` if none."""
    mid = find_by_idempotency_key(idempotency_key)
    if mid is None:
        raise NotFoundError(idempotency_key)
    return get_status(str(mid))


def list_messages(
    *, status: str | None = None, limit: int = 50, before: str | None = None
) -> list[MessageInfo]:
    """Newest first, optionally of one status; page with ``before=<last id>``."""
    return _admin.list_messages(_store().engine, status=status, limit=limit, before=before)


def stats() -> dict[str, dict[str, int]]:
    """Counts per message status and per recipient status, and suppression list
    entries per reason (``suppressions``)."""
    store = _store()
    return {**_admin.stats(store.engine), "suppressions": store.count_suppressions()}


def retry(message_id: str) -> int:
    """Requeue one message's failed and deferred recipients; returns 1 if requeued, else 0."""
    ids = _admin.retry(
        _store().engine, [_admin.parse_id(message_id)], lifetime_s=get_settings().message_lifetime_s
    )
    if not ids:
        _admin.get_status(_store().engine, message_id)  # NotFoundError for an unknown id
    _dispatch_requeued(ids)
    return len(ids)


def retry_failed() -> int:
    """Requeue every message that has failed recipients; returns how many messages."""
    ids = _admin.retry(_store().engine, None, lifetime_s=get_settings().message_lifetime_s)
    _dispatch_requeued(ids)
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
    _check_relay(relay)
    envelope = _envelope(message, settings)
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


_PAUSE_ERRORS = (
    AuthError.__name__,
    UnknownAuthError.__name__,
    TLSError.__name__,
    ErrorWord.RELAY_PAUSED,
)
"""The ``last_error`` of messages deferred because their relay was paused."""


def resume_relay(name: str) -> bool:
    """Lift a relay's pause now (after fixing its credentials or certificates).

    Its waiting messages are made due at once. Returns False if it was not paused.
    """
    from .store.relays import resume_relay as _resume

    relay = get_settings().relay_named(name)
    engine = _store().engine
    resumed = _resume(engine, relay.name)
    if resumed:
        _ops.make_paused_due(engine, relay.name, _PAUSE_ERRORS)
    return resumed


def get_attempts(message_id: str) -> list[AttemptInfo]:
    """Every attempt's result for each recipient of a message, oldest first."""
    return _admin.get_attempts(_store().engine, message_id)


# -- what operators look at and steer in bulk (the CLI and the status page) -----------


def search(filters: Filters, *, limit: int = 50, before: str | None = None) -> list[MessageInfo]:
    """Messages narrowed by ``filters``, newest first; ``before`` (an id) pages."""
    return _ops.search(_store().engine, filters, limit=limit, before=before)


def series(*, window_s: int = 86400, bucket_s: int = 3600) -> dict[str, Any]:
    """Recipients accepted and failed per time bucket over the last ``window_s``."""
    return _ops.series(_store().engine, window_s=window_s, bucket_s=bucket_s)


def message_meta(message_id: str) -> tuple[dict[str, Any] | None, bytes]:
    """A message's metadata and the header block of its stored content."""
    return _ops.message_meta(_store().engine, message_id)


def find_by_metadata(limit: int = 100, **match: str) -> list[MessageInfo]:
    """Messages whose ``metadata`` has all of ``match`` (string values), newest first."""
    if not match:
        raise TypeError("give at least one metadata key=value to match")
    ids = _ops.ids_by_metadata(_store().engine, match, limit=limit)
    return [get_status(str(i)) for i in ids]


def queue_depth() -> list[RelayDepth]:
    """Per relay: messages waiting, those due, and the age of the oldest due one."""
    return _ops.queue_depth(_store().engine)


def retry_failed_since(window: dt.timedelta) -> int:
    """Requeue messages whose failed or deferred recipients changed within ``window``."""
    engine = _store().engine
    candidates = _ops.failed_since(engine, utcnow() - window)
    if not candidates:
        return 0
    ids = _admin.retry(engine, candidates, lifetime_s=get_settings().message_lifetime_s)
    _dispatch_requeued(ids)
    return len(ids)


def cancel_relay(relay: str) -> int:
    """Cancel the unsent recipients of every waiting message on ``relay``; returns messages."""
    return _ops.cancel_relay(_store().engine, relay)


def purge(older_than: dt.timedelta) -> int:
    """Delete terminal messages (and their recipients) not updated within ``older_than``."""
    return _ops.purge(_store().engine, utcnow() - older_than)


def ping() -> None:
    """One round trip to the database; raises what the driver raises."""
    _ops.ping(_store().engine)


MIN_ID_PREFIX = 8
"""The fewest hex digits :func:`resolve_id` takes as a prefix of a message id."""


class AmbiguousIdError(InvalidMessageError):
    """An id prefix that names more than one message; ``matches`` holds (some of) them."""

    def __init__(self, prefix: str, matches: Sequence[str]) -> None:
        more = ", …" if len(matches) > 10 else ""
        super().__init__(
            f"{prefix!r} matches {'more than 10' if more else len(matches)} messages: "
            f"{', '.join(matches[:10])}{more}; give more of the id",
            field="id",
        )
        self.matches = list(matches)


def resolve_id(value: str) -> str:
    """The full id of the one message whose id is ``value`` or starts with it.

    ``value`` is a full id or at least :data:`MIN_ID_PREFIX` hex digits (dashes
    and case ignored). ``NotFoundError`` if no message matches,
    ``AmbiguousIdError`` (an ``InvalidMessageError``) listing them if several do,
    ``InvalidMessageError`` if ``value`` cannot be an id or is too short.
    """
    text = value.strip().lower()
    if len(text) in (32, 36):
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(text))  # a whole id: the command says if it is unknown
    return _by_prefix(value, text)


def _by_prefix(value: str, text: str) -> str:
    digits = text.replace("-", "")
    if not digits or any(c not in "0123456789abcdef" for c in digits) or len(digits) > 32:
        raise InvalidMessageError(
            f"{value!r} is not a message id (32 hex digits, dashes optional) or a prefix of one",
            field="id",
        )
    if len(digits) < MIN_ID_PREFIX:
        raise InvalidMessageError(
            f"{value!r} is too short: give at least {MIN_ID_PREFIX} hex digits of the id",
            field="id",
        )
    from sqlalchemy import select

    from .store.models import MessageRow

    low = uuid.UUID(digits.ljust(32, "0"))
    high = uuid.UUID(digits.ljust(32, "f"))
    stmt = (
        select(MessageRow.id)
        .where(MessageRow.id >= low, MessageRow.id <= high)
        .order_by(MessageRow.id)
        .limit(11)
    )
    with _store().engine.connect() as conn:
        found = [str(i) for i in conn.execute(stmt).scalars()]
    if not found:
        raise NotFoundError(value)
    if len(found) > 1:
        raise AmbiguousIdError(value, found)
    return found[0]


def probe_relay(name: str | None = None) -> dict[str, Any]:
    """Open a session to a relay as a delivery would (connect, EHLO, STARTTLS or
    implicit TLS, AUTH), then QUIT: no message is sent.

    Returns what was seen (``tls``: the TLS version or ``None``, ``auth``: the
    user logged in as or ``None``, ``extensions``); raises the same errors a
    delivery would (``ConnectError``, ``TLSError``, ``AuthError``,
    ``UnknownAuthError``), their text without secrets. ``KeyError`` for an
    unknown relay name.
    """
    import asyncio
    import ssl

    from .smtp.session import close_session, open_session

    relay = get_settings().relay_named(name)

    def quiet_refused_handshake(loop: Any, context: dict[str, Any]) -> None:
        # aiosmtplib may leave the exception of a refused TLS handshake in a future
        # nobody awaits; the same error is raised to us (and reported), so the
        # loop's "never retrieved" line would only say it twice.
        if isinstance(context.get("exception"), ssl.SSLError):
            log.debug("relay %s: %s", relay.name, context.get("message"))
            return
        loop.default_exception_handler(context)

    async def probe() -> dict[str, Any]:
        asyncio.get_running_loop().set_exception_handler(quiet_refused_handshake)
        smtp = await open_session(relay)
        try:
            ssl_object = smtp.get_transport_info("ssl_object")
            return {
                "relay": relay.name,
                "url": relay.safe_url,
                "tls": ssl_object.version() if ssl_object is not None else None,
                "auth": relay.username if (relay.username or relay.token_provider) else None,
                "extensions": sorted(smtp.esmtp_extensions),
            }
        finally:
            await close_session(smtp, say_quit=True)

    return asyncio.run(probe())


# -- the suppression list ----------------------------------------------------------------

LIST_ID_MAX = 255
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LIST_ID = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})+")
"""RFC 2919: ``list-label "." list-id-namespace``, both dot-atom text (ASCII)."""


def check_list_id(list_id: object, *, field: str = "list_id") -> str | None:
    """An RFC 2919 list id (``news.example.com``; ``<news.example.com>`` is unwrapped),
    or None; anything else (CR/LF, spaces, no dot, over 255) is refused."""
    if list_id is None:
        return None
    if not isinstance(list_id, str):
        raise InvalidMessageError(f"must be a string, not {_type_name(list_id)}", field=field)
    value = list_id[1:-1] if list_id.startswith("<") and list_id.endswith(">") else list_id
    if not 0 < len(value) <= LIST_ID_MAX or not _LIST_ID.fullmatch(value):
        raise InvalidMessageError(
            f"{list_id!r} is not an RFC 2919 list id: write label.namespace in ASCII, "
            f"e.g. news.example.com (at most {LIST_ID_MAX} characters)",
            field=field,
        )
    return value


def _suppression_address(address: object, field: str = "address") -> str:
    if not isinstance(address, str):
        raise InvalidMessageError(
            f"must be an address string, not {_type_name(address)}", field=field
        )
    normalised = validate_address(address.strip(), field_name=field)[0]
    if "@" not in normalised:
        raise InvalidMessageError(f"{address!r} is not an address (no @domain)", field=field)
    return normalised


def _reason(reason: object) -> str:
    if reason not in SuppressionReason.ALL or not isinstance(reason, str):
        raise InvalidMessageError(
            f"{reason!r} is not a suppression reason: use one of "
            + ", ".join(SuppressionReason.ALL),
            field="reason",
        )
    return str(reason)


def _scope(scope: object) -> str:
    """``None``/``''`` (everywhere), ``domain:<sender domain>`` or ``list:<list id>``,
    normalised as the claim compares them."""
    if scope is None or scope == EVERYWHERE:
        return EVERYWHERE
    if not isinstance(scope, str):
        raise InvalidMessageError(f"must be a string, not {_type_name(scope)}", field="scope")
    kind, colon, value = scope.partition(":")
    if colon and kind == DOMAIN_SCOPE[:-1]:
        domain = _suppression_address(f"x@{value}", field="scope").rpartition("@")[2]
        return sender_domain_scope(f"x@{domain}")
    if colon and kind == LIST_SCOPE[:-1]:
        return f"{LIST_SCOPE}{check_list_id(value, field='scope')}".lower()
    raise InvalidMessageError(
        f"{scope!r} is not a scope: write domain:<sender domain> or list:<list id> "
        "(or nothing, for everywhere)",
        field="scope",
    )


def _note(note: object) -> str | None:
    if note is None or note == "":
        return None
    if not isinstance(note, str):
        raise InvalidMessageError(f"must be a string, not {_type_name(note)}", field="note")
    if len(note) > 2000 or "\x00" in note:
        raise InvalidMessageError("must be at most 2000 characters, without NUL", field="note")
    return note


def _new_suppression(
    store: Store, address: object, reason: object, scope: object, note: object
) -> NewSuppression:
    normalised = _suppression_address(address)
    return NewSuppression(
        address=normalised,
        address_key=store.key_of(normalised),
        reason=_reason(reason),
        scope=_scope(scope),
        note=_note(note),
    )


def suppress(
    address: str,
    *,
    reason: str = SuppressionReason.MANUAL,
    scope: str | None = None,
    note: str | None = None,
) -> SuppressionInfo:
    """Put ``address`` on the suppression list; returns the entry.

    ``reason``: ``unsubscribed``, ``bounced``, ``complained`` or ``manual``.
    ``scope``: None (everywhere), ``domain:<sender domain>`` or ``list:<list id>``.
    Checked when a worker claims a message, so mail already queued is stopped
    too: its recipient ends ``suppressed``, never sent. An entry already there
    for the address and scope takes the new reason and note. Bad input raises
    ``InvalidMessageError`` and writes nothing.
    """
    store = _store()
    entry = _new_suppression(store, address, reason, scope, note)
    store.add_suppressions([entry])
    return store.list_suppressions(key=entry.address_key, scope=entry.scope, limit=1)[0]


def unsuppress(address: str, *, scope: str | None = None) -> bool:
    """Take ``address`` off the list in ``scope``; False if it was not there."""
    store = _store()
    return store.remove_suppression(store.key_of(_suppression_address(address)), _scope(scope))


def suppressions(
    *,
    reason: str | None = None,
    scope: str | None = None,
    address: str | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[SuppressionInfo]:
    """Entries newest first, optionally of one reason, scope or address; page with
    ``before=<last entry's id>``."""
    store = _store()
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10000:
        raise InvalidMessageError("must be a whole number from 1 to 10000", field="limit")
    if before is not None and (isinstance(before, bool) or not isinstance(before, int)):
        raise InvalidMessageError("must be an entry id (a whole number)", field="before")
    return store.list_suppressions(
        reason=_reason(reason) if reason is not None else None,
        scope=_scope(scope) if scope is not None else None,
        key=store.key_of(_suppression_address(address)) if address is not None else None,
        limit=limit,
        before=before,
    )


def is_suppressed(address: str, *, sender: str | None = None, list_id: str | None = None) -> bool:
    """Whether a message from ``sender`` in ``list_id`` would be withheld from ``address``."""
    store = _store()
    key = store.key_of(_suppression_address(address))
    mail_from = _suppression_address(sender, field="sender") if sender is not None else ""
    scopes = scopes_for(mail_from, check_list_id(list_id))
    return store.find_suppression(key, scopes) is not None


def suppression_key(address: str) -> str:
    """What ``address`` is compared by on the suppression list (no validation)."""
    return address_key(
        address.strip(), fold_local=get_settings().suppression_local_case_insensitive
    )


def suppression_counts() -> dict[str, int]:
    """Entries on the suppression list per reason."""
    return _store().count_suppressions()


CSV_COLUMNS = ("address", "reason", "scope", "note")
"""The CSV header ``import_suppressions`` reads and ``export_suppressions`` writes
(the export adds ``created_at``, which the import ignores)."""


def import_suppressions(
    lines: Iterable[str], *, progress: Callable[[int], None] | None = None
) -> int:
    """Add the entries of a CSV (header ``address,reason,scope,note``; only
    ``address`` is required, ``reason`` defaults to ``manual``); returns how many.

    Every row is checked before anything is written: a bad row refuses the
    whole file with ``InvalidMessageError`` naming its line. Then the rows are
    written in one transaction; ``progress(n)`` after each chunk.
    """
    store = _store()
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in (*CSV_COLUMNS, "created_at")]
    if "address" not in header or unknown:
        raise InvalidMessageError(
            f"line 1: the header must be {','.join(CSV_COLUMNS)} (address required)"
            + (f"; unknown column(s): {', '.join(unknown)}" if unknown else ""),
            field="csv",
        )
    entries: dict[tuple[str, str], NewSuppression] = {}
    for row in reader:
        if None in row:
            raise InvalidMessageError(
                f"line {reader.line_num}: more fields than the header names", field="csv"
            )
        try:
            entry = _new_suppression(
                store,
                row.get("address") or "",
                row.get("reason") or SuppressionReason.MANUAL,
                row.get("scope") or None,
                row.get("note") or None,
            )
        except InvalidMessageError as exc:
            raise InvalidMessageError(
                f"line {reader.line_num}: {exc.field}: {exc.reason}", field="csv"
            ) from None
        entries[(entry.address_key, entry.scope)] = entry  # the file's last word wins
    return store.add_suppressions(list(entries.values()), progress=progress)


def export_suppressions(out: Any) -> int:
    """Write every entry as CSV to ``out`` (a text file), oldest first; returns how many."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((*CSV_COLUMNS, "created_at"))
    count = 0
    for entry in _store().iter_suppressions():
        writer.writerow(
            (
                entry.address,
                entry.reason,
                entry.scope,
                entry.note or "",
                entry.created_at.isoformat(),
            )
        )
        count += 1
    return count


# The names the Django backend and older tests used before these were public.
_prepare = prepare
_write_and_dispatch = write_and_dispatch
