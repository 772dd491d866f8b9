"""Flask: Flask-Mail's API (``Mail``, ``Message``, ``connect()``, signals) over the queue.

::

    from flask_sqlalchemy import SQLAlchemy
    from mailqueue.contrib.flask import Mail, Message   # was: from flask_mail import ...

    db = SQLAlchemy()
    mail = Mail()                   # MailQueue is the same class

    def create_app():
        app = Flask(__name__)
        app.config["MAIL_DEFAULT_SENDER"] = "shop@example.com"
        db.init_app(app)
        mail.init_app(app, db=db)   # rows go through db.session: your commit sends
        return app

    msg = Message("Your order", recipients=["ana@example.org"], body="Thanks!")
    msg.attach("invoice.pdf", "application/pdf", pdf_bytes)
    mail.send(msg)                  # returns the message id
    db.session.commit()

``init_app`` reads every ``MAILQUEUE_*`` name of the configuration table
(docs/configuration.md) from ``app.config`` (over the environment) and installs them with
:func:`mailqueue.configure`. With ``db=`` (Flask-SQLAlchemy) and no
``MAILQUEUE_DATABASE_URL``, mailqueue uses ``SQLALCHEMY_DATABASE_URI``, and
``send`` writes the rows in ``db.session``: they commit or roll back with
your data and the broker is woken after the commit. A
``MAILQUEUE_DATABASE_URL`` (Flask config or environment) that names another
database than ``db``'s is a ``ConfigError`` at ``init_app``: the workers
would never see the rows. Without ``db=``,
``send`` writes and commits at once. ``send(msg, session=...)`` picks for
one call: any SQLAlchemy ``Session``, or ``False`` for mailqueue's own
transaction.

What Flask-Mail's API means here (the contract its own test suite checks,
``tests/peer/flask_mail``):

- ``app.extensions["mail"]`` is the :class:`MailState` of Flask-Mail's
  config names (``MAIL_DEFAULT_SENDER``, ``MAIL_MAX_EMAILS``,
  ``MAIL_SUPPRESS_SEND``, ``MAIL_ASCII_ATTACHMENTS``…);
  ``app.extensions["mailqueue"]`` is the extension. ``MAIL_SERVER`` and the
  other SMTP names are kept on the state but do not pick the relay: the
  worker delivers through its ``MAILQUEUE_RELAY_URL``.
- ``mail.send`` and ``Connection.send`` *queue* the message. ``TESTING``
  does not stop that (rows are written, nothing is delivered unless a
  worker runs); ``MAIL_SUPPRESS_SEND = True`` does: the message is composed
  and checked exactly as for queueing, the signal fires, no row is written.
- ``with mail.connect() as conn:`` sends in one transaction: ``db.session``
  when the extension has ``db=`` (your commit decides), otherwise
  mailqueue's own, committed when the block ends (every
  ``MAIL_MAX_EMAILS`` messages if set) and rolled back if it raises.
- ``msg.as_bytes()`` is what mailqueue composes for the wire (the same
  ``Date`` and ``Message-ID``; boundaries differ per call).
- Refusals are :class:`~mailqueue.InvalidMessageError`: no sender or
  recipient raises :class:`MessageIncompleteError` (also an
  ``AssertionError``, as Flask-Mail's ``assert``), CR or LF in an address
  or the subject :class:`BadHeaderError` (also a ``HeaderInjectionError``).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import mimetypes
import os
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from email.header import Header
from typing import Any

import blinker

from ..api import (
    MessageInfo,
    SuppressionInfo,
    enqueue,
    get_status,
    get_status_by_key,
    is_suppressed,
    suppress,
    unsuppress,
)
from ..config import compare_databases, hide_password
from ..errors import ConfigError, HeaderInjectionError, InvalidMessageError
from ..message import Attachment as _Attachment
from ..message import Message as _Message
from ..message import build_envelope
from . import apply_config

__all__ = [
    "Attachment",
    "BadHeaderError",
    "Connection",
    "Mail",
    "MailQueue",
    "MailState",
    "Message",
    "MessageIncompleteError",
    "email_dispatched",
    "sanitize_address",
    "sanitize_addresses",
    "signals",
]

log = logging.getLogger("mailqueue.flask")

Address = str | tuple[str, str]

signals = blinker.Namespace()
email_dispatched = signals.signal(
    "email-dispatched",
    doc="""Sent (``sender=app, message=msg``) when ``send`` has queued a message,
or checked it under ``MAIL_SUPPRESS_SEND``; as Flask-Mail's signal.""",
)

# ESMTP options mailqueue sets itself from the message's content.
_MANAGED_OPTIONS = re.compile(r"(?i)(BODY=(7BIT|8BITMIME)|SMTPUTF8)")


class BadHeaderError(HeaderInjectionError):
    """CR or LF in the subject or an address: raised where Flask-Mail raises its
    ``BadHeaderError``; an :class:`~mailqueue.InvalidMessageError` with ``.field``."""


class MessageIncompleteError(InvalidMessageError, AssertionError):
    """No sender or no recipient: raised where Flask-Mail's ``assert`` fails."""


def sanitize_address(addr: Address, encoding: str = "utf-8") -> str:
    """Flask-Mail's helper: one address as a header would show it (names as encoded words)."""
    name, spec = email.utils.parseaddr(addr) if isinstance(addr, str) else addr
    try:
        name = Header(name, encoding).encode()
    except UnicodeEncodeError:
        name = Header(name, "utf-8").encode()
    if not spec.isascii() and "@" in spec:
        local, domain = spec.split("@", 1)
        spec = "@".join([str(Header(local, encoding)), domain.encode("idna").decode("ascii")])
    return email.utils.formataddr((name, spec))


def sanitize_addresses(addresses: Iterable[Address], encoding: str = "utf-8") -> list[str]:
    return [sanitize_address(a, encoding) for a in addresses]


def _force_text(value: Any) -> str:
    """The subject as text, as Flask-Mail has it: lazy strings (Flask-Babel) resolved."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value if isinstance(value, str) else str(value)


def _has_newline(value: str) -> bool:
    return "\n" in value or "\r" in value


def _current_state() -> MailState | None:
    from flask import current_app, has_app_context

    if not has_app_context():
        return None
    state = current_app.extensions.get("mail")
    return state if isinstance(state, MailState) else None


def _pair_text(pair: tuple[str, str]) -> str:
    return f"{pair[0]} <{pair[1]}>"


class Attachment:
    """Flask-Mail's attachment: a file name, a content type, the data, a disposition.

    As Flask-Mail: ``data`` is required, ``content_type`` is guessed from the
    file name (else ``text/plain`` for ``str`` data, ``application/octet-stream``
    for bytes) and ``disposition`` defaults to ``"attachment"``. A
    ``Content-ID`` in ``headers`` makes an ``inline`` attachment a ``cid:``
    part of the HTML; other ``headers`` are refused when the message is sent.
    """

    def __init__(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: bytes | str | None = None,
        disposition: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if data is None:
            raise ValueError("The 'data' argument is required.")
        if content_type is None and filename is not None:
            content_type = mimetypes.guess_type(filename)[0]
        if content_type is None:
            content_type = "text/plain" if isinstance(data, str) else "application/octet-stream"
        self.filename = filename
        self.content_type: str = content_type
        self.data: bytes | str = data
        self.disposition: str = disposition or "attachment"
        self.headers: dict[str, str] = dict(headers or {})

    def to_mailqueue(self, *, ascii_filename: bool = False) -> _Attachment:
        data = self.data.encode() if isinstance(self.data, str) else self.data
        headers = {k.lower(): v for k, v in self.headers.items()}
        cid = headers.pop("content-id", None)
        if headers:
            raise InvalidMessageError(
                f"attachment headers other than Content-ID are not supported: {sorted(headers)}",
                field="attachments",
            )
        filename = self.filename or "attachment"
        if ascii_filename:
            # MAIL_ASCII_ATTACHMENTS, as Flask-Mail: decomposed, non-ASCII dropped.
            filename = unicodedata.normalize("NFKD", filename)
            filename = re.sub(r"\s+", " ", filename.encode("ascii", "ignore").decode()).strip()
        return _Attachment(
            filename=filename,
            content=data,
            content_type=self.content_type,
            inline=self.disposition.lower() == "inline",
            content_id=cid.strip("<>") if cid else None,
        )


class Message:
    """A mail to queue, shaped like Flask-Mail's ``Message``.

    The sender defaults to the app's ``MAIL_DEFAULT_SENDER`` (read when the
    message is made inside an app context, else when it is sent); a
    ``(name, address)`` sender reads back as ``"name <address>"``. ``html``
    is ``alts["html"]``; an HTML-only message goes out as
    multipart/alternative with an empty text part, as Flask-Mail sends it.
    ``date`` (a timestamp) and ``msgId`` become the Date and Message-ID
    fields; ``date`` is set when the message is sent if it is ``None``.

    mailqueue's per-message options are keyword arguments too: ``relay``,
    ``send_at`` (an aware datetime), ``idempotency_key``, ``metadata`` and
    ``list_id`` (the mailing list, for ``list:`` suppressions).
    After a send, ``mailqueue_id`` holds the queued message's id.
    """

    def __init__(
        self,
        subject: str = "",
        recipients: Sequence[Address] | None = None,
        body: str | None = None,
        html: str | None = None,
        alts: dict[str, str] | Iterable[tuple[str, str]] | None = None,
        sender: Address | None = None,
        cc: Sequence[Address] | None = None,
        bcc: Sequence[Address] | None = None,
        attachments: Sequence[Attachment] | None = None,
        reply_to: Address | None = None,
        date: float | None = None,
        charset: str | None = None,
        extra_headers: dict[str, str] | None = None,
        mail_options: list[str] | None = None,
        rcpt_options: list[str] | None = None,
        *,
        relay: str | None = None,
        send_at: dt.datetime | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        list_id: str | None = None,
    ) -> None:
        state = _current_state()
        if not sender and state is not None:
            sender = state.default_sender
        self._sender_pair: tuple[tuple[str, str], str] | None = None
        self.sender = sender  # type: ignore[assignment]  # the setter takes a pair too
        self.subject = subject
        self.recipients: list[Address] = list(recipients or [])
        self.body = body
        self.alts: dict[str, str] = dict(alts or {})
        if html is not None:
            self.html = html
        self.cc: list[Address] = list(cc or [])
        self.bcc: list[Address] = list(bcc or [])
        self.attachments: list[Attachment] = list(attachments or [])
        self.reply_to = reply_to
        self.date = date
        self.msgId: str = email.utils.make_msgid()
        self.charset = charset
        self.extra_headers: dict[str, str] = dict(extra_headers or {})
        self.mail_options: list[str] = list(mail_options or [])
        self.rcpt_options: list[str] = list(rcpt_options or [])
        self.relay = relay
        self.send_at = send_at
        self.idempotency_key = idempotency_key
        self.metadata = metadata
        self.list_id = list_id
        self.mailqueue_id: str | None = None

    @property
    def sender(self) -> str | None:
        return self._sender

    @sender.setter
    def sender(self, value: Address | None) -> None:
        # Flask-Mail turns a pair into "name <address>"; the pair itself is kept
        # for composing, so that a name with a comma stays one address.
        if isinstance(value, tuple):
            text = _pair_text(value)
            self._sender_pair = (value, text)
            self._sender: str | None = text
        else:
            self._sender_pair = None
            self._sender = value

    @property
    def html(self) -> str | None:
        return self.alts.get("html")

    @html.setter
    def html(self, value: str | None) -> None:
        if value is None:
            self.alts.pop("html", None)
        else:
            self.alts["html"] = value

    @property
    def send_to(self) -> set[Address]:
        """Every entry the message goes to (To, Cc and Bcc), as Flask-Mail has it."""
        return {*self.recipients, *self.cc, *self.bcc}

    def add_recipient(self, recipient: Address) -> None:
        self.recipients.append(recipient)

    def attach(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: bytes | str | None = None,
        disposition: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.attachments.append(Attachment(filename, content_type, data, disposition, headers))

    def has_bad_headers(self) -> bool:
        """CR or LF in the subject, the sender, a recipient (To, Cc, Bcc) or Reply-To."""
        return self._bad_header_field() is not None

    def is_bad_headers(self) -> bool:
        return self.has_bad_headers()

    def _bad_header_field(self) -> str | None:
        if _has_newline(_force_text(self.subject)):
            return "subject"
        groups: list[tuple[str, Iterable[Any]]] = [
            ("sender", [self.sender] if self.sender else []),
            ("to", self.recipients),
            ("cc", self.cc),
            ("bcc", self.bcc),
            ("reply_to", [self.reply_to] if self.reply_to else []),
        ]
        for field_name, entries in groups:
            for entry in entries:
                parts = entry if isinstance(entry, tuple) else (entry,)
                if any(isinstance(p, str) and _has_newline(p) for p in parts):
                    return field_name
        return None

    def _sender_input(self, default_sender: Address | None) -> Address | None:
        if self._sender_pair is not None and self._sender_pair[1] == self.sender:
            return self._sender_pair[0]
        return self.sender or default_sender

    def to_mailqueue(
        self,
        default_sender: Address | None = None,
        *,
        ascii_attachments: bool = False,
        _preview: bool = False,
    ) -> _Message:
        """This message as :class:`mailqueue.Message` (what ``send`` queues)."""

        def clean(entry: Any) -> Any:
            # as_string() shows addresses as Flask-Mail does, CR and LF dropped;
            # send() refuses them (BadHeaderError) before composing.
            if not _preview:
                return entry
            if isinstance(entry, tuple):
                return tuple(re.sub(r"[\r\n]", "", p) for p in entry)
            return re.sub(r"[\r\n]", "", entry) if isinstance(entry, str) else entry

        headers = dict(self.extra_headers)
        headers.setdefault("Date", email.utils.formatdate(self.date, localtime=True))
        headers.setdefault("Message-ID", self.msgId)
        html = self.alts.get("html")
        others = sorted(set(self.alts) - {"html"})
        if others:
            raise InvalidMessageError(
                f"alternatives other than html are not supported: {others}", field="alts"
            )
        text = self.body
        if text is None and html is not None:
            text = ""  # Flask-Mail sends HTML with an empty text/plain alternative
        return _Message(
            sender=clean(self._sender_input(default_sender)),
            to=[clean(a) for a in self.recipients],
            cc=[clean(a) for a in self.cc],
            bcc=[clean(a) for a in self.bcc],
            reply_to=[clean(self.reply_to)] if self.reply_to else (),
            subject=_force_text(self.subject),
            text=text,
            html=html,
            attachments=[
                a.to_mailqueue(ascii_filename=ascii_attachments) for a in self.attachments
            ],
            headers=headers,
            charset=self.charset or "utf-8",
        )

    def as_bytes(self) -> bytes:
        """The message as mailqueue would put it on the wire (CRLF, no Bcc)."""
        state = _current_state()
        core = self.to_mailqueue(
            state.default_sender if state is not None else None,
            ascii_attachments=bool(state is not None and state.ascii_attachments),
            _preview=True,
        )
        return build_envelope(core).data

    def as_string(self) -> str:
        return self.as_bytes().decode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return self.as_string()

    def __bytes__(self) -> bytes:
        return self.as_bytes()

    def send(self, connection: Connection) -> None:
        """Send through ``connection`` (Flask-Mail's spelling of ``connection.send(msg)``)."""
        connection.send(self)


class MailState:
    """Flask-Mail's settings of one app, registered as ``app.extensions["mail"]``.

    ``send``, ``send_message``, ``connect`` and ``record_messages`` work on it
    too, as on Flask-Mail's state.
    """

    def __init__(
        self,
        server: str,
        username: str | None,
        password: str | None,
        port: int | None,
        use_tls: bool,
        use_ssl: bool,
        default_sender: Address | None,
        debug: int,
        max_emails: int | None,
        suppress: bool,
        ascii_attachments: bool,
        extension: MailQueue | None = None,
    ) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.port = port
        self.use_tls = use_tls
        self.use_ssl = use_ssl
        self.default_sender = default_sender
        self.debug = debug
        self.max_emails = max_emails
        self.suppress = suppress
        self.ascii_attachments = ascii_attachments
        self.extension = extension

    def __repr__(self) -> str:  # the password stays out of reprs and logs
        return f"MailState(server={self.server!r}, default_sender={self.default_sender!r})"

    def _ext(self) -> MailQueue:
        if self.extension is None:
            raise RuntimeError("this MailState belongs to no MailQueue extension")
        return self.extension

    def send(self, message: Message) -> str | None:
        return self._ext().send(message)

    def send_message(self, *args: Any, **kwargs: Any) -> str | None:
        return self._ext().send_message(*args, **kwargs)

    def connect(self) -> Connection:
        return Connection(self, self._ext())

    def record_messages(self) -> Any:
        return self._ext().record_messages()


class Connection:
    """``with mail.connect() as conn: conn.send(msg)``: many messages, one transaction.

    With Flask-SQLAlchemy (``db=``) the messages go into ``db.session`` and
    your commit decides. Otherwise the block is mailqueue's own transaction:
    committed when it ends (and every ``MAIL_MAX_EMAILS`` messages), rolled
    back when it raises, so nothing of a failed batch is queued.
    """

    def __init__(self, state: MailState, extension: MailQueue) -> None:
        self.mail = state
        self.extension = extension
        self.host: Any = None  # no SMTP connection: the worker delivers
        self.num_emails = 0
        self._session: Any = None
        self._own = False

    def __enter__(self) -> Connection:
        self.num_emails = 0
        session = self.extension._session(None)
        if session is None and not self.mail.suppress:
            session = self.extension._own_session()
            self._own = True
        self._session = session
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        session, self._session = self._session, None
        if not self._own or session is None:
            return
        self._own = False
        try:
            if exc_type is None:
                session.commit()
            else:
                session.rollback()
        finally:
            session.close()

    def send(self, message: Message, envelope_from: Address | None = None) -> str | None:
        """Queue ``message`` in this connection's transaction; returns its id.

        ``envelope_from`` sets MAIL FROM (default: the sender's address).
        """
        session = self._session if self._session is not None else False
        mid = self.extension._send(message, session=session, envelope_from=envelope_from)
        self.num_emails += 1
        if self._own and self.mail.max_emails and self.num_emails >= self.mail.max_emails:
            self.num_emails = 0
            self._session.commit()
        return mid

    def send_message(self, *args: Any, **kwargs: Any) -> str | None:
        return self.send(Message(*args, **kwargs))


def _flask_database_url(app: Any, db: Any) -> str | None:
    """The URL of ``db``'s engine for ``app`` (Flask-SQLAlchemy puts a relative SQLite
    file in the instance folder), else ``SQLALCHEMY_DATABASE_URI`` as written (before
    ``db.init_app(app)``)."""
    try:
        with app.app_context():
            return str(db.engine.url.render_as_string(hide_password=False))
    except Exception:  # noqa: BLE001 - db not set up for this app yet: the URI as written
        uri = app.config.get("SQLALCHEMY_DATABASE_URI")
        if hasattr(uri, "render_as_string"):  # an sqlalchemy URL object
            return str(uri.render_as_string(hide_password=False))
        return str(uri) if uri else None


def _join_app_database(app: Any, db: Any, config: dict[str, Any]) -> None:
    """With ``db=`` the rows go through ``db.session``: mailqueue's database must be the
    app's, or the workers (which read ``MAILQUEUE_DATABASE_URL``) never see the mail.

    No ``MAILQUEUE_DATABASE_URL`` (Flask config, then environment): it becomes the
    app's. One that names another database: :class:`~mailqueue.ConfigError` naming
    both (passwords hidden) and what to set. The same database name on servers
    spelled differently (maybe one server under two names): a WARNING.
    """
    app_url = _flask_database_url(app, db)
    given, source = config.get("MAILQUEUE_DATABASE_URL"), "Flask config"
    if not given:
        given, source = os.environ.get("MAILQUEUE_DATABASE_URL"), "environment"
    if not given:
        if app_url:
            config["MAILQUEUE_DATABASE_URL"] = app_url
        return
    if not app_url:
        return
    verdict = compare_databases(str(given), app_url)
    if verdict == "same":
        return
    what = (
        f"MailQueue(app, db=db) writes mail rows through db.session into the app's database "
        f"{hide_password(app_url)} (SQLALCHEMY_DATABASE_URI), but MAILQUEUE_DATABASE_URL "
        f"({source}) is {hide_password(str(given))}, the database mailqueue's workers and "
        "CLI read"
    )
    if verdict == "unsure":
        log.warning(
            "%s: if both name one server, nothing is wrong; otherwise mail written by this "
            "app is never delivered (set MAILQUEUE_DATABASE_URL to the app's database)",
            what,
        )
        return
    raise ConfigError(
        f"{what}: mail written there would never be delivered. Set MAILQUEUE_DATABASE_URL to "
        "the app's database (in the Flask config and in every worker's environment), or "
        "give no db= to keep mailqueue's rows in a database of their own",
        name="MAILQUEUE_DATABASE_URL",
        source=source,
    )


class MailQueue:
    """The Flask extension: ``MailQueue(app)`` or ``mail = MailQueue(); mail.init_app(app)``.

    ``Mail`` is the same class, under Flask-Mail's name.
    """

    def __init__(self, app: Any = None, db: Any = None) -> None:
        self.app = app
        self.db = db
        self.state: MailState | None = None
        self._config: dict[str, Any] = {}
        if app is not None:
            self.state = self.init_app(app, db=db)

    def init_mail(self, config: Any, debug: bool | int = False, testing: bool = False) -> MailState:
        """Flask-Mail's settings from ``config`` (``testing`` is accepted, as Flask-Mail's
        argument, but does not suppress: ``MAIL_SUPPRESS_SEND`` does)."""
        return MailState(
            config.get("MAIL_SERVER", "127.0.0.1"),
            config.get("MAIL_USERNAME"),
            config.get("MAIL_PASSWORD"),
            config.get("MAIL_PORT", 25),
            config.get("MAIL_USE_TLS", False),
            config.get("MAIL_USE_SSL", False),
            config.get("MAILQUEUE_DEFAULT_SENDER") or config.get("MAIL_DEFAULT_SENDER"),
            int(config.get("MAIL_DEBUG", debug)),
            config.get("MAIL_MAX_EMAILS"),
            bool(config.get("MAIL_SUPPRESS_SEND", False)),
            config.get("MAIL_ASCII_ATTACHMENTS", False),
            extension=self,
        )

    def init_app(self, app: Any, db: Any = None) -> MailState:
        if db is not None:
            self.db = db
        config = dict(app.config)
        if self.db is not None:
            _join_app_database(app, self.db, config)
        apply_config(config, source="Flask config")
        if config.get("MAIL_SERVER") and not config.get("MAILQUEUE_RELAY_URL"):
            log.info(
                "MAIL_SERVER is set but does not pick the relay: mailqueue's worker "
                "delivers through MAILQUEUE_RELAY_URL"
            )
        state = self.init_mail(config, app.debug, app.testing)
        app.extensions["mail"] = state
        app.extensions["mailqueue"] = self
        self._config = config
        self.state = state
        return state

    def _state(self) -> MailState:
        current = _current_state()
        if current is not None and current.extension is self:
            return current
        if self.state is None:
            raise RuntimeError("The current application was not configured with MailQueue")
        return self.state

    @property
    def default_sender(self) -> Address | None:
        return self._state().default_sender if self.state is not None else None

    def __getattr__(self, name: str) -> Any:
        # Flask-Mail's Mail reads its settings through to the state (mail.suppress…).
        if name.startswith("_") or name not in _STATE_FIELDS:
            raise AttributeError(name)
        return getattr(self._state(), name)

    def _session(self, session: Any) -> Any:
        if session is False:
            return None
        if session is None and self.db is not None:
            session = self.db.session
        # Flask-SQLAlchemy's db.session is a scoped_session: use this scope's Session.
        from sqlalchemy.orm import scoped_session

        if isinstance(session, scoped_session):
            session = session()
        return session

    def _own_session(self) -> Any:
        """A session on mailqueue's database, for a ``connect()`` block's transaction."""
        from ..api import open_session

        apply_config(self._config)
        return open_session()

    def _send(
        self, message: Message, *, session: Any, envelope_from: Address | None = None
    ) -> str | None:
        state = self._state()
        if not message.send_to:
            raise MessageIncompleteError("No recipients have been added", field="to")
        sender = message._sender_input(state.default_sender)
        if not sender:
            raise MessageIncompleteError(
                "The message does not specify a sender and a default sender "
                "has not been configured",
                field="sender",
            )
        bad = message._bad_header_field()
        if bad is not None:
            raise BadHeaderError(f"CR or LF in {bad}", field=bad)
        for name in ("mail_options", "rcpt_options"):
            unsupported = [o for o in getattr(message, name) if not _MANAGED_OPTIONS.fullmatch(o)]
            if unsupported:
                raise InvalidMessageError(
                    f"ESMTP options are not supported per message: {unsupported}", field=name
                )
        if message.date is None:
            message.date = time.time()
        core = message.to_mailqueue(sender, ascii_attachments=bool(state.ascii_attachments))
        if envelope_from is not None:
            pair = envelope_from if isinstance(envelope_from, tuple) else None
            spec = pair[1] if pair else email.utils.parseaddr(str(envelope_from))[1]
            from dataclasses import replace

            core = replace(core, envelope_from=spec)
        apply_config(self._config)
        if state.suppress:
            build_envelope(core)  # checked as if queued; nothing is written
            mid = None
        else:
            mid = enqueue(
                core,
                session=self._session(session),
                relay=message.relay,
                send_at=message.send_at,
                idempotency_key=message.idempotency_key,
                metadata=message.metadata,
                list_id=message.list_id,
            )
        message.mailqueue_id = mid
        email_dispatched.send(self._app(), message=message)
        return mid

    def _app(self) -> Any:
        from flask import current_app, has_app_context

        if has_app_context():
            return current_app._get_current_object()  # type: ignore[attr-defined]
        return self.app

    def send(self, message: Message, *, session: Any = None) -> str | None:
        """Queue ``message``; returns its id (``None`` under ``MAIL_SUPPRESS_SEND``).

        In ``session``'s transaction (default: ``db.session`` when the
        extension was given ``db=``): nothing is queued unless it commits.
        ``session=False`` uses mailqueue's own transaction, committed before
        ``send`` returns.
        """
        return self._send(message, session=session)

    def send_message(self, *args: Any, **kwargs: Any) -> str | None:
        """``send(Message(*args, **kwargs))``, as in Flask-Mail."""
        return self.send(Message(*args, **kwargs))

    def connect(self) -> Connection:
        """A :class:`Connection`: ``with mail.connect() as conn: conn.send(msg)``."""
        return Connection(self._state(), self)

    def get_status(self, message_id: str) -> MessageInfo:
        return get_status(message_id)

    def get_status_by_key(self, idempotency_key: str) -> MessageInfo:
        return get_status_by_key(idempotency_key)

    def suppress(
        self,
        address: str,
        *,
        reason: str = "manual",
        scope: str | None = None,
        note: str | None = None,
    ) -> SuppressionInfo:
        """Put ``address`` on the suppression list (``mailqueue.api.suppress``): queued
        and future mail to it ends ``suppressed``, never sent. E.g. in an unsubscribe
        view: ``mail.suppress(addr, reason="unsubscribed", scope="list:news.example.com")``."""
        apply_config(self._config)
        return suppress(address, reason=reason, scope=scope, note=note)

    def unsuppress(self, address: str, *, scope: str | None = None) -> bool:
        """Take ``address`` off the list (``mailqueue.api.unsuppress``)."""
        apply_config(self._config)
        return unsuppress(address, scope=scope)

    def is_suppressed(
        self, address: str, *, sender: str | None = None, list_id: str | None = None
    ) -> bool:
        apply_config(self._config)
        return is_suppressed(address, sender=sender, list_id=list_id)

    @contextmanager
    def record_messages(self) -> Iterator[list[Message]]:
        """Collect the messages ``send`` queues in the block (tests), as Flask-Mail does.

        Unlike Flask-Mail's, they are still queued (unless
        ``MAIL_SUPPRESS_SEND``): ``msg.mailqueue_id`` is each one's id.
        """
        outbox: list[Message] = []

        def record(app: Any, message: Message) -> None:
            outbox.append(message)

        with email_dispatched.connected_to(record):
            yield outbox


_STATE_FIELDS = frozenset(
    [
        "server",
        "username",
        "password",
        "port",
        "use_tls",
        "use_ssl",
        "debug",
        "max_emails",
        "suppress",
        "ascii_attachments",
    ]
)

Mail = MailQueue
