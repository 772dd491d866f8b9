"""Flask: an extension with a ``Message``/``send`` API close to Flask-Mail's.

::

    from flask_sqlalchemy import SQLAlchemy
    from mailqueue.contrib.flask import MailQueue, Message

    db = SQLAlchemy()
    mail = MailQueue()

    def create_app():
        app = Flask(__name__)
        app.config["MAILQUEUE_DEFAULT_SENDER"] = "shop@example.com"
        db.init_app(app)
        mail.init_app(app, db=db)   # rows go through db.session: your commit sends
        return app

    msg = Message("Your order", recipients=["ana@example.org"], body="Thanks!")
    msg.attach("invoice.pdf", "application/pdf", pdf_bytes)
    mail.send(msg)                  # returns the message id
    db.session.commit()

``init_app`` reads every ``MAILQUEUE_*`` name of the README's configuration
table from ``app.config`` (over the environment) and installs them with
:func:`mailqueue.configure`. With ``db=`` (Flask-SQLAlchemy) and no
``MAILQUEUE_DATABASE_URL``, mailqueue uses ``SQLALCHEMY_DATABASE_URI``, and
``send`` writes the rows in ``db.session``: they commit or roll back with
your data and the broker is woken after the commit. Without ``db=``,
``send`` writes and commits at once. ``send(msg, session=...)`` picks for
one call: any SQLAlchemy ``Session``, or ``False`` for mailqueue's own
transaction.

Migrating from Flask-Mail: ``Message(subject, recipients, body, html,
sender, cc, bcc, attachments, reply_to, date, charset, extra_headers)`` and
``msg.attach(filename, content_type, data, disposition, headers)`` keep
their meaning; ``MAIL_DEFAULT_SENDER`` is read when
``MAILQUEUE_DEFAULT_SENDER`` is not set; ``mail.send(msg)`` returns an id
instead of ``None``; ``mail.record_messages()`` records what ``send``
queued, for tests.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..api import MessageInfo, enqueue, get_status, get_status_by_key
from ..message import Attachment as _Attachment
from ..message import Message as _Message
from . import apply_config

__all__ = ["Attachment", "MailQueue", "Message"]

Address = str | tuple[str, str]


@dataclass
class Attachment:
    """Flask-Mail's attachment: a file name, a content type and the bytes."""

    filename: str | None = None
    content_type: str | None = None
    data: bytes | str = b""
    disposition: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def to_mailqueue(self) -> _Attachment:
        data = self.data.encode() if isinstance(self.data, str) else self.data
        inline = (self.disposition or "attachment").lower() == "inline"
        cid = self.headers.get("Content-ID")
        return _Attachment(
            filename=self.filename or "attachment",
            content=data,
            content_type=self.content_type,
            inline=inline,
            content_id=cid.strip("<>") if cid else None,
        )


class Message:
    """A mail to queue, shaped like Flask-Mail's ``Message``.

    mailqueue's per-message options are keyword arguments too: ``relay``,
    ``send_at`` (an aware datetime), ``idempotency_key`` and ``metadata``.
    """

    def __init__(
        self,
        subject: str = "",
        recipients: Sequence[Address] | None = None,
        body: str | None = None,
        html: str | None = None,
        sender: Address | None = None,
        cc: Sequence[Address] | None = None,
        bcc: Sequence[Address] | None = None,
        attachments: Sequence[Attachment] | None = None,
        reply_to: Address | None = None,
        date: float | None = None,
        charset: str | None = None,
        extra_headers: dict[str, str] | None = None,
        *,
        relay: str | None = None,
        send_at: dt.datetime | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.subject = subject
        self.recipients = list(recipients or [])
        self.body = body
        self.html = html
        self.sender = sender
        self.cc = list(cc or [])
        self.bcc = list(bcc or [])
        self.attachments = list(attachments or [])
        self.reply_to = reply_to
        self.date = date
        self.charset = charset
        self.extra_headers = dict(extra_headers or {})
        self.relay = relay
        self.send_at = send_at
        self.idempotency_key = idempotency_key
        self.metadata = metadata

    @property
    def send_to(self) -> set[str]:
        """Every address the message goes to (To, Cc and Bcc), as Flask-Mail has it."""
        found = set()
        for a in (*self.recipients, *self.cc, *self.bcc):
            found.add(a[1] if isinstance(a, tuple) else email.utils.parseaddr(a)[1])
        return found

    def add_recipient(self, recipient: Address) -> None:
        self.recipients.append(recipient)

    def attach(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: bytes | str = b"",
        disposition: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.attachments.append(
            Attachment(filename, content_type, data, disposition, dict(headers or {}))
        )

    def to_mailqueue(self, default_sender: Address | None = None) -> _Message:
        headers = dict(self.extra_headers)
        if self.date is not None:
            headers.setdefault("Date", email.utils.formatdate(self.date, localtime=True))
        return _Message(
            sender=self.sender or default_sender,
            to=self.recipients,
            cc=self.cc,
            bcc=self.bcc,
            reply_to=[self.reply_to] if self.reply_to else (),
            subject=self.subject,
            text=self.body,
            html=self.html,
            attachments=[a.to_mailqueue() for a in self.attachments],
            headers=headers,
            charset=self.charset or "utf-8",
        )


class MailQueue:
    """The Flask extension: ``MailQueue(app)`` or ``mail = MailQueue(); mail.init_app(app)``."""

    def __init__(self, app: Any = None, db: Any = None) -> None:
        self.db = db
        self._recorders: list[list[tuple[Message, str]]] = []
        if app is not None:
            self.init_app(app, db=db)

    def init_app(self, app: Any, db: Any = None) -> None:
        if db is not None:
            self.db = db
        config = dict(app.config)
        if self.db is not None and not config.get("MAILQUEUE_DATABASE_URL"):
            config["MAILQUEUE_DATABASE_URL"] = config.get("SQLALCHEMY_DATABASE_URI")
        apply_config(config)
        app.extensions["mailqueue"] = self
        self._config = config

    @property
    def default_sender(self) -> Address | None:
        config = getattr(self, "_config", {})
        return config.get("MAILQUEUE_DEFAULT_SENDER") or config.get("MAIL_DEFAULT_SENDER")

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

    def send(self, message: Message, *, session: Any = None) -> str:
        """Queue ``message``; returns its id.

        In ``session``'s transaction (default: ``db.session`` when the
        extension was given ``db=``): nothing is queued unless it commits.
        ``session=False`` uses mailqueue's own transaction, committed before
        ``send`` returns.
        """
        apply_config(getattr(self, "_config", {}))
        mid = enqueue(
            message.to_mailqueue(self.default_sender),
            session=self._session(session),
            relay=message.relay,
            send_at=message.send_at,
            idempotency_key=message.idempotency_key,
            metadata=message.metadata,
        )
        for recorder in self._recorders:
            recorder.append((message, mid))
        return mid

    def send_message(self, *args: Any, **kwargs: Any) -> str:
        """``send(Message(*args, **kwargs))``, as in Flask-Mail."""
        return self.send(Message(*args, **kwargs))

    def get_status(self, message_id: str) -> MessageInfo:
        return get_status(message_id)

    def get_status_by_key(self, idempotency_key: str) -> MessageInfo:
        return get_status_by_key(idempotency_key)

    @contextmanager
    def record_messages(self) -> Iterator[list[tuple[Message, str]]]:
        """Collect ``(message, id)`` for everything ``send`` queues in the block (tests).

        Unlike Flask-Mail's, the messages are still queued: check their rows
        with ``mail.get_status(id)``.
        """
        recorded: list[tuple[Message, str]] = []
        self._recorders.append(recorded)
        try:
            yield recorded
        finally:
            self._recorders.remove(recorded)
