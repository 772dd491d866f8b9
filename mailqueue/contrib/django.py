"""Django: an email backend that enqueues instead of sending.

Django 5.2 (``EMAIL_BACKEND``)::

    EMAIL_BACKEND = "mailqueue.contrib.django.EmailBackend"
    MAILQUEUE_DATABASE_URL = "postgresql://app@db/app"    # any MAILQUEUE_* name
    MAILQUEUE_DJANGO_SAME_DATABASE = True                  # rows in Django's transaction

Django 6.1+ (``MAILERS``; the backend's options go in ``OPTIONS``)::

    MAILERS = {
        "default": {
            "BACKEND": "mailqueue.contrib.django.EmailBackend",
            "OPTIONS": {"same_database": True},
        },
        "bulk": {
            "BACKEND": "mailqueue.contrib.django.EmailBackend",
            "OPTIONS": {"relay": "bulk"},
        },
    }

``send_mail``, ``send_mass_mail``, ``EmailMessage`` and
``EmailMultiAlternatives`` (attachments, alternatives, headers) then write
rows instead of talking SMTP; ``send_messages`` returns how many messages
were accepted for delivery, as Django's contract asks. Each sent
``EmailMessage`` gets a ``mailqueue_id`` attribute.

**Addresses** are taken as Django's SMTP backend takes them: lazy strings,
``webmaster@localhost``, IDNA (2008) domains, and bare names with no domain
(``"tester"``), which go to the relay as written for it to qualify or refuse.
Refusals are Django's exception types (``ValueError``; ``BadHeader`` where
Django raises ``BadHeaderError``). With ``fail_silently`` a message that cannot
be queued is logged (WARNING, ``mailqueue.django``), never dropped unseen.

**Transactions.** Two modes, chosen per backend:

* ``same_database`` (``MAILQUEUE_DJANGO_SAME_DATABASE = True``, or the
  ``same_database`` option): the mailqueue tables live in the Django
  database ``database`` (default ``"default"``), and the rows are written
  through Django's own connection, in the current ``transaction.atomic()``.
  They commit or roll back with your data: exactly-once hand-off. The broker
  is woken in ``transaction.on_commit``; if that is lost, the scheduler finds
  the rows anyway. PostgreSQL and SQLite. ``MAILQUEUE_DATABASE_URL`` must name
  that same database (the workers read it): another one is
  ``ImproperlyConfigured`` when the backend is made.
* otherwise (separate databases): the message is validated at once (bad
  input raises in your view), and written to mailqueue's own database in
  ``transaction.on_commit``. A rolled-back transaction sends nothing; once
  the on-commit callback has run, the mail is durable. A process that dies
  between Django's commit and that callback loses the mail (at most once).

**Per-message options**, by either of:

* ``extra_headers`` named ``X-Mailqueue-*`` (removed before the message is
  built, never sent): ``X-Mailqueue-Relay``, ``X-Mailqueue-Send-At``
  (ISO 8601 with a UTC offset), ``X-Mailqueue-Idempotency-Key``,
  ``X-Mailqueue-Metadata`` (a JSON object), ``X-Mailqueue-Tags``
  (comma-separated; stored as ``metadata["tags"]``), ``X-Mailqueue-List-Id``
  and ``X-Mailqueue-Unsubscribe`` (``1``/``true`` or ``0``/``false``; see
  docs/bulk-senders.md). An unknown ``X-Mailqueue-*`` name is refused.
* :class:`QueuedEmailMessage` / :class:`QueuedEmailMultiAlternatives`,
  which take ``relay=``, ``send_at=``, ``idempotency_key=``, ``metadata=``,
  ``tags=``, ``list_id=`` and ``unsubscribe=`` keyword arguments (they win
  over the headers).
"""

from __future__ import annotations

import copy
import datetime as dt
import email.policy
import json
import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import django
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.base import BaseEmailBackend
from django.db import IntegrityError as DjangoIntegrityError
from django.db import connections, transaction
from django.utils.encoding import force_str
from sqlalchemy.exc import IntegrityError

from ..api import (
    PreparedMessage,
    find_by_idempotency_key,
    insert_prepared,
    prepare,
    utcnow,
    wake_prepared,
    write_and_dispatch,
)
from ..config import compare_databases, get_settings, hide_password, setting_sources, url_passwords
from ..errors import HeaderInjectionError, InvalidMessageError
from ..message import (
    Limits,
    Message,
    bare_names_allowed,
    header_fields,
    header_text,
    mime_token,
    mime_type,
    one_address,
    too_many,
)
from ..priority import priority_value
from . import FrameworkConfig, apply_config

__all__ = [
    "BadHeader",
    "EmailBackend",
    "OPTION_HEADERS",
    "QueuedEmailMessage",
    "QueuedEmailMultiAlternatives",
    "to_mailqueue",
]

log = logging.getLogger("mailqueue.django")

OPTION_HEADERS = {
    "x-mailqueue-relay": "relay",
    "x-mailqueue-send-at": "send_at",
    "x-mailqueue-idempotency-key": "idempotency_key",
    "x-mailqueue-metadata": "metadata",
    "x-mailqueue-tags": "tags",
    "x-mailqueue-priority": "priority",
    "x-mailqueue-list-id": "list_id",
    "x-mailqueue-unsubscribe": "unsubscribe",
}
"""``extra_headers`` names (any case) read as options and stripped before sending."""


_SMTP_POLICY: dict[str, Any] = {"policy": email.policy.SMTP} if django.VERSION >= (6, 0) else {}
"""What Django's SMTP backend passes to ``EmailMessage.message()`` (Django 6+)."""

if django.VERSION < (6, 1):
    from django.core.mail import BadHeaderError as _DjangoBadHeader
else:  # Django 6.1 deprecates BadHeaderError: its SMTP backend raises ValueError
    _DjangoBadHeader = ValueError  # type: ignore[misc, assignment]


class BadHeader(HeaderInjectionError, _DjangoBadHeader):
    """A header value that could add a line or a recipient: raised where Django's
    own SMTP backend raises ``BadHeaderError`` (before 6.1) or ``ValueError``."""


class _QueuedOptions:
    """Takes mailqueue's per-message options as keyword arguments, the rest goes to Django."""

    mailqueue_options: dict[str, Any]

    def __init__(
        self,
        *args: Any,
        relay: str | None = None,
        send_at: dt.datetime | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        priority: str | None = None,
        list_id: str | None = None,
        unsubscribe: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        options = dict(
            relay=relay,
            send_at=send_at,
            idempotency_key=idempotency_key,
            metadata=metadata,
            tags=tags,
            priority=priority,
            list_id=list_id,
            unsubscribe=unsubscribe,
        )
        self.mailqueue_options = {k: v for k, v in options.items() if v is not None}


class QueuedEmailMessage(_QueuedOptions, EmailMessage):
    """An ``EmailMessage`` with mailqueue's per-message options as keyword arguments."""


class QueuedEmailMultiAlternatives(_QueuedOptions, EmailMultiAlternatives):
    """An ``EmailMultiAlternatives`` with mailqueue's per-message options."""


def _parse_option(name: str, value: Any) -> Any:
    if name == "send_at" and not isinstance(value, dt.datetime):
        try:
            value = dt.datetime.fromisoformat(str(value))
        except ValueError:
            raise InvalidMessageError(
                f"X-Mailqueue-Send-At: {value!r} is not an ISO 8601 date-time", field="send_at"
            ) from None
    if name == "send_at" and value.tzinfo is None:
        raise InvalidMessageError("send_at must carry a UTC offset", field="send_at")
    if name == "metadata" and not isinstance(value, dict):
        try:
            value = json.loads(str(value))
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise InvalidMessageError(
                "X-Mailqueue-Metadata must be a JSON object", field="metadata"
            )
    if name == "unsubscribe" and not isinstance(value, bool):
        word = str(value).strip().lower()
        if word not in ("1", "true", "yes", "0", "false", "no"):
            raise InvalidMessageError(
                f"X-Mailqueue-Unsubscribe: {value!r} is not 1/true/yes or 0/false/no",
                field="unsubscribe",
            )
        value = word in ("1", "true", "yes")
    if name == "tags" and isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    return value


def _check_django_input(message: EmailMessage, headers: dict[str, Any], limits: Limits) -> None:
    """What Django will put in headers and parts, checked before Django composes it.

    The same rules and limits as ``mailqueue.Message`` (docs/security.md), so
    that a hostile value is refused here, not half-handled by Django's composer
    (which also takes many seconds on a megabyte subject).
    """
    header_text(message.subject, "subject", limits)
    header_fields([(name, str(value)) for name, value in headers.items()], limits)
    entries = [*message.to, *message.cc, *message.bcc]
    if len(entries) > limits.max_recipients:
        raise too_many(len(entries), limits.max_recipients, "recipients", "MAX_RECIPIENTS", "to")
    for entry in message.reply_to:
        _one_address(entry, "reply_to")
    mime_token(message.content_subtype, "content_subtype")
    if message.encoding is not None:
        mime_token(str(message.encoding), "encoding")
    for name, body in [("body", message.body)] + [
        ("alternatives", alt[0]) for alt in getattr(message, "alternatives", [])
    ]:
        if isinstance(body, str) and "\0" in body:
            raise InvalidMessageError("contains NUL, which no mail body may carry", field=name)
    for alt in getattr(message, "alternatives", []):
        mime_type(alt[1], "alternatives")
    for attachment in message.attachments:
        if isinstance(attachment, tuple):  # (filename, content, mimetype); MIME objects as built
            filename, _content, mimetype = attachment
            if filename is not None:
                header_text(filename, "attachments", limits)
            if mimetype is not None:
                mime_type(mimetype, "attachments")


def _one_address(entry: Any, field_name: str) -> str:
    """One Django address entry (a string, maybe lazy, Django ticket #24416) as
    mailqueue's one address."""
    return one_address(force_str(entry), field_name=field_name)


_ADDRESS_FIELDS = frozenset({"from", "sender", "to", "cc", "bcc", "reply-to"})


class _Folded(str):
    """A header whose text is what Django's SMTP backend writes for it.

    mailqueue serialises with the SMTPUTF8 policy, which would write non-ASCII
    header text as raw UTF-8 (needing SMTPUTF8 at the relay) where Django 6's
    SMTP backend writes encoded words. An object with a ``name`` is a header
    object to the ``email`` package: it is stored as it is and asked to
    ``fold()`` itself, which this one does as Django's backend would (the
    SMTP policy). ``str()`` of it is the decoded text, which mailqueue checks
    as usual (controls, encoded words) before and after serialising.
    """

    name: str
    _folded: str

    def __new__(cls, header: Any) -> _Folded:
        obj = super().__new__(cls, str(header))
        obj.name = header.name
        obj._folded = header.fold(policy=email.policy.SMTP)
        return obj

    def fold(self, *, policy: Any) -> str:
        return self._folded


def _keep_djangos_folding(mime: Any) -> None:
    """Non-ASCII text fields (not address fields: mailqueue writes those itself)
    keep the encoded words Django 6's SMTP backend writes, in every part."""
    for part in mime.walk():
        names = [name.lower() for name in part]
        for name, value in part.items():
            if name.lower() in _ADDRESS_FIELDS or str(value).isascii():
                continue
            if names.count(name.lower()) > 1:
                continue  # (replace_header would take the first; Django writes each once)
            if not hasattr(value, "fold") or not hasattr(value, "name"):
                continue
            part.replace_header(name, _Folded(value))


def to_mailqueue(message: EmailMessage) -> tuple[Message, dict[str, Any]]:
    """A Django message as a mailqueue ``Message`` (Django's own MIME) and its options."""
    options: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    for name, value in message.extra_headers.items():
        key = name.lower()
        if key.startswith("x-mailqueue-"):
            if key not in OPTION_HEADERS:
                known = ", ".join(h.title() for h in OPTION_HEADERS)
                raise InvalidMessageError(f"unknown header {name!r} (known: {known})", field=name)
            options[OPTION_HEADERS[key]] = _parse_option(OPTION_HEADERS[key], value)
        else:
            headers[name] = value
    for name, value in getattr(message, "mailqueue_options", {}).items():
        options[name] = _parse_option(name, value)
    tags = options.pop("tags", None)
    if tags:
        options["metadata"] = {**options.get("metadata", {}), "tags": list(tags)}

    _check_django_input(message, headers, get_settings().limits)
    # The envelope comes from Django's address lists, one address per entry, checked
    # the way Django's SMTP backend checks them (sanitize_address), never from the
    # headers Django writes: a header can say more than its entries meant.
    # (Entries may be lazy strings, Django ticket #24416: read as Django reads them.)
    recipients = [
        _one_address(a, kind)
        for kind, entries in (("to", message.to), ("cc", message.cc), ("bcc", message.bcc))
        for a in entries
        if a
    ]
    envelope_from = _one_address(message.from_email, "from_email")
    clean = copy.copy(message)
    clean.extra_headers = headers
    # Django builds the MIME as its SMTP backend would: on Django 6 with the SMTP
    # policy, so that text parts (base64 ones included) carry CRLF line ends.
    mime = clean.message(**_SMTP_POLICY)
    if _SMTP_POLICY:
        _keep_djangos_folding(mime)
    if message.bcc:
        # mailqueue takes the kind from it, then strips it
        mime["Bcc"] = ", ".join(force_str(a) for a in message.bcc)
    # Sent as an object: mailqueue serializes it, writes its address fields itself
    # and reads the finished header block back (see message._serialize_checked).
    return Message(eml=mime, envelope_from=envelope_from, envelope_to=recipients), options


# --------------------------------------------------------------------------- writing


def _plain(value: Any) -> Any:
    # psycopg2 cannot adapt uuid.UUID unless told to; PostgreSQL casts the text.
    return str(value) if isinstance(value, uuid.UUID) else value


class _DjangoExecutor:
    """Runs mailqueue's INSERTs on a Django connection (so they join its transaction)."""

    def __init__(self, alias: str) -> None:
        # Driver-neutral dialects: values come out as plain Python objects (JSON as
        # text, UUIDs as below) that Django's psycopg, psycopg2 and sqlite3 all take.
        from sqlalchemy.dialects.postgresql.base import PGDialect
        from sqlalchemy.dialects.sqlite.base import SQLiteDialect

        self.connection = connections[alias]
        self.dialect: Any
        vendor = self.connection.vendor
        if vendor == "postgresql":
            self.dialect = PGDialect()
        elif vendor == "sqlite":
            self.dialect = SQLiteDialect()
        else:
            raise ImproperlyConfigured(
                f"mailqueue same_database mode supports PostgreSQL and SQLite, not {vendor}"
            )

    def execute(self, statement: Any, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = statement.table
        columns = list(rows[0])
        processors = [
            table.c[c].type.dialect_impl(self.dialect).bind_processor(self.dialect) for c in columns
        ]
        quote = self.connection.ops.quote_name
        sql = "INSERT INTO {} ({}) VALUES ({})".format(
            quote(table.name),
            ", ".join(quote(c) for c in columns),
            ", ".join(["%s"] * len(columns)),
        )
        params = [
            [_plain(p(row[c]) if p else row[c]) for c, p in zip(columns, processors, strict=True)]
            for row in rows
        ]
        with self.connection.cursor() as cursor:
            cursor.executemany(sql, params)

    def find_by_key(self, key: str) -> str | None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT id FROM mq_message WHERE idempotency_key = %s", [key])
            row = cursor.fetchone()
        return None if row is None else str(uuid.UUID(str(row[0])))


def _write_in_django_transaction(alias: str, prepared: list[PreparedMessage]) -> list[str]:
    """Rows through Django's connection, in its transaction; the broker after the commit."""
    executor = _DjangoExecutor(alias)
    ids: list[str] = []
    due: list[PreparedMessage] = []
    with transaction.atomic(using=alias):
        for message in prepared:
            existing = message.idempotency_key and executor.find_by_key(message.idempotency_key)
            if existing:
                ids.append(existing)
                continue
            try:
                with transaction.atomic(using=alias):  # a savepoint: a lost race is not fatal
                    insert_prepared([message], conn=executor)
            except DjangoIntegrityError:
                existing = message.idempotency_key and executor.find_by_key(message.idempotency_key)
                if not existing:
                    raise
                ids.append(existing)
                continue
            ids.append(str(message.id))
            due.append(message)
        if due:
            transaction.on_commit(lambda: wake_prepared(due), using=alias)
    return ids


def _write_own_database(prepared: list[PreparedMessage]) -> list[str]:
    """Rows in mailqueue's database (its own transaction), then the broker."""
    ids: list[str] = []
    for message in prepared:
        key = message.idempotency_key
        existing = find_by_idempotency_key(key) if key else None
        if existing is not None:
            ids.append(str(existing))
            continue
        try:
            ids.extend(str(i) for i in write_and_dispatch([message], None))
        except IntegrityError:
            existing = find_by_idempotency_key(key) if key else None
            if existing is None:
                raise
            ids.append(str(existing))
    return ids


def _secrets() -> list[str]:
    """The passwords mailqueue's settings hold, to be kept out of a log line."""
    settings = get_settings()
    urls = [settings.database_url, settings.broker_url, getattr(settings, "limits_redis_url", None)]
    relays = [settings.relay, *settings.relays.values()]
    found: list[str] = []
    for url in [*urls, *(r.url for r in relays)]:
        found += url_passwords(url)
    for relay in relays:
        try:
            password = relay.password
        except Exception:  # noqa: BLE001 - an unreadable password file: nothing to hide
            password = None
        if password:
            found.append(password)
    return sorted({p for p in found if p}, key=len, reverse=True)


def _dropped(messages: Sequence[EmailMessage], exc: BaseException) -> None:
    """The WARNING that ``fail_silently`` owes: which message was not queued, and why."""
    reason = f"{type(exc).__name__}: {exc}"
    try:
        secrets = _secrets()
    except Exception:  # noqa: BLE001 - settings that cannot be read: say less, not nothing
        secrets, reason = [], type(exc).__name__
    for secret in secrets:
        reason = reason.replace(secret, "***")
    for message in messages:
        log.warning(
            "fail_silently: not queued, not sent: subject %r from %r to %d recipient(s): %s",
            force_str(message.subject)[:200],
            force_str(message.from_email),
            len(message.recipients()),
            reason,
        )


def _django_config() -> FrameworkConfig:
    """Every ``MAILQUEUE_*`` name in Django's settings (unknown ones are refused later)."""
    names = [n for n in dir(django_settings) if n.startswith("MAILQUEUE_")]
    return FrameworkConfig("Django settings", ((n, getattr(django_settings, n)) for n in names))


def _django_database_url(alias: str) -> str | None:
    """Django's database ``alias`` as a URL without its password (``sqlite://`` for an
    in-memory SQLite database; ``None`` for a backend mailqueue cannot share)."""
    connection = connections[alias]
    config = connection.settings_dict
    name = str(config.get("NAME") or "")
    if connection.vendor == "sqlite":
        if not name or name == ":memory:" or name.startswith("file:"):
            return "sqlite://"
        return f"sqlite:///{os.path.abspath(name)}"
    if connection.vendor == "postgresql":
        user, host = str(config.get("USER") or ""), str(config.get("HOST") or "")
        port = str(config.get("PORT") or "")
        server = "" if host.startswith("/") else host
        netloc = (f"{quote(user, safe='')}@" if user else "") + server
        netloc += f":{port}" if port else ""
        socket = f"?host={quote(host)}" if host.startswith("/") else ""
        return f"postgresql://{netloc}/{quote(name, safe='')}{socket}"
    return None


_same_database_checked: set[tuple[str, str]] = set()
"""``(Django's URL, mailqueue's URL)`` pairs already checked (a backend is made per send)."""


def _check_same_database(alias: str) -> None:
    """same_database mode writes the rows through Django's connection: mailqueue's
    ``database_url`` (what its workers and CLI read) must name that database.

    Another database: ``ImproperlyConfigured`` naming both (no password) and what to
    set. The same database name on servers spelled differently, or an in-memory
    SQLite database (a test run): a WARNING. Checked once per pair of URLs.
    """
    django_url = _django_database_url(alias)
    mailqueue_url = get_settings().database_url
    if django_url is None or (django_url, mailqueue_url) in _same_database_checked:
        return
    verdict = compare_databases(mailqueue_url, django_url)
    if verdict != "same":
        if hasattr(django_settings, "MAILQUEUE_DATABASE_URL"):
            source = "Django settings"
        else:
            source = setting_sources()["database"]
        what = (
            f"mailqueue's same_database mode writes mail rows through Django's database "
            f"{alias!r} ({django_url}), but mailqueue's database is "
            f"{hide_password(mailqueue_url)} ({source}), the one its workers and CLI read"
        )
        advice = (
            f'set MAILQUEUE_DATABASE_URL = "{django_url}" (with its password, if any) in '
            "Django's settings and in every worker's environment, or turn same_database off"
        )
        if verdict == "different" and django_url != "sqlite://":
            raise ImproperlyConfigured(
                f"{what}: mail written there would never be delivered; {advice}"
            )
        log.warning("%s: unless both name one database, mail is never delivered; %s", what, advice)
    _same_database_checked.add((django_url, mailqueue_url))


class EmailBackend(BaseEmailBackend):
    """Enqueue Django mail in mailqueue (see the module's documentation).

    Options (``MAILERS[...]["OPTIONS"]`` on Django 6.1+, or ``get_connection``
    keyword arguments), each defaulting to a Django setting:

    * ``relay`` (``MAILQUEUE_DJANGO_RELAY``): the relay name for this backend's mail;
    * ``priority`` (``MAILQUEUE_DJANGO_PRIORITY``, default ``"normal"``): the lane
      of this backend's mail, ``high``, ``normal`` or ``bulk`` (a message's
      ``X-Mailqueue-Priority`` header or ``priority=`` option wins);
    * ``database`` (``MAILQUEUE_DJANGO_DATABASE``, default ``"default"``): the
      Django database whose transaction decides;
    * ``same_database`` (``MAILQUEUE_DJANGO_SAME_DATABASE``, default False):
      write the rows through that database's connection;
    * ``fail_silently`` (default False): a message that cannot be queued is
      skipped, not raised, and logged as a WARNING on ``mailqueue.django``
      with the reason (never a password); ``send_messages`` counts only the
      messages queued. Django's ``mail_admins`` for 500 errors passes it (5.2);
      on 6.1 give it in ``OPTIONS`` of the mailer the error mail uses.
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        relay: str | None = None,
        priority: str | None = None,
        database: str | None = None,
        same_database: bool | None = None,
        **kwargs: Any,
    ) -> None:
        # fail_silently is this backend's own option (as for Django's SMTP backend),
        # so Django 6.1's BaseEmailBackend neither warns about it nor refuses it in
        # MAILERS[...]["OPTIONS"]; alias and unknown options go to it.
        super().__init__(**kwargs)
        self.fail_silently = bool(fail_silently)
        self.relay = (
            relay if relay is not None else getattr(django_settings, "MAILQUEUE_DJANGO_RELAY", None)
        )
        self.priority = (
            priority
            if priority is not None
            else getattr(django_settings, "MAILQUEUE_DJANGO_PRIORITY", None)
        )
        priority_value(self.priority, field="priority")  # a wrong word fails at startup
        self.database = str(
            database or getattr(django_settings, "MAILQUEUE_DJANGO_DATABASE", "default")
        )
        if same_database is None:
            same_database = getattr(django_settings, "MAILQUEUE_DJANGO_SAME_DATABASE", False)
        self.same_database = bool(same_database)
        apply_config(_django_config())
        if self.same_database:
            _check_same_database(self.database)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Validate and enqueue; the number of messages accepted (Django's contract)."""
        if not email_messages:
            return 0
        prepared: list[PreparedMessage] = []
        sent: list[EmailMessage] = []
        now = utcnow()
        for message in email_messages:
            if not message.recipients():
                continue
            try:
                try:
                    # As Django's SMTP backend: a bare name with no domain is handed
                    # to the relay, which qualifies or refuses it (docs/django.md).
                    with bare_names_allowed():
                        mq_message, options = to_mailqueue(message)
                        options.setdefault("relay", self.relay)
                        options.setdefault("priority", self.priority)
                        new = prepare(
                            mq_message,
                            relay=options.get("relay"),
                            send_at=options.get("send_at"),
                            idempotency_key=options.get("idempotency_key"),
                            metadata=options.get("metadata"),
                            now=now,
                            priority=options.get("priority"),
                            list_id=options.get("list_id"),
                            unsubscribe=options.get("unsubscribe", False),
                        )
                except HeaderInjectionError as exc:
                    raise BadHeader(exc.reason, field=exc.field) from None
                prepared.append(new)
                sent.append(message)
            except Exception as exc:
                if self.fail_silently:
                    _dropped([message], exc)
                    continue
                raise
        if not prepared:
            return 0
        try:
            if self.same_database:
                ids = _write_in_django_transaction(self.database, prepared)
                for message, mid in zip(sent, ids, strict=True):
                    message.mailqueue_id = mid  # type: ignore[attr-defined]
            else:
                for message, new in zip(sent, prepared, strict=True):
                    message.mailqueue_id = str(new.id)  # type: ignore[attr-defined]
                self._on_commit(prepared, sent)
        except Exception as exc:
            if self.fail_silently:
                _dropped(sent, exc)
                return 0
            raise
        return len(prepared)

    def _on_commit(self, prepared: list[PreparedMessage], sent: list[EmailMessage]) -> None:
        def write() -> None:
            ids = _write_own_database(prepared)
            for message, mid in zip(sent, ids, strict=True):
                message.mailqueue_id = mid  # type: ignore[attr-defined]

        def after_commit() -> None:
            try:
                write()
            except Exception as exc:
                _dropped(sent, exc)  # after the caller's commit: logged here in any case
                if not self.fail_silently:
                    raise

        if connections[self.database].in_atomic_block:
            # robust: an error here (after your commit) is logged, not raised
            transaction.on_commit(after_commit, using=self.database, robust=True)
        else:
            write()  # an error: raised, or dropped with its WARNING (fail_silently)
