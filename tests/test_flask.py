"""Flask integration, as a user has it: ``tests/flask_app`` with Flask-SQLAlchemy and MailQueue.

The app's view writes an order and queues its receipt in ``db.session``;
the tests drive it with Flask's test client, deliver in-process with the
worker's own code to the dev SMTP server, and assert on what the server
received and on the status rows, on SQLite and PostgreSQL. The last tests
cover status back to the app: Anymail's words and ``MAILQUEUE_ON_TERMINAL``.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest

import mailqueue
from mailqueue import Message as CoreMessage
from mailqueue.contrib.status import anymail_status, anymail_statuses
from mailqueue.errors import HeaderInjectionError, InvalidMessageError
from tests import contrib_helpers
from tests.contrib_helpers import all_ids, deliver, parsed, row_count
from tests.flask_app.app import create_app, db, mail


@pytest.fixture
def app(stack):
    app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": stack.settings.database_url,
            # MAILQUEUE_DATABASE_URL defaults to SQLALCHEMY_DATABASE_URI (db= given)
            "MAILQUEUE_BROKER_URL": stack.settings.broker_url,
            "MAILQUEUE_QUEUE": stack.settings.queue_name,
            "MAILQUEUE_RELAY_URL": stack.settings.relay.url,
            "MAILQUEUE_DEFAULT_SENDER": ("Shop", "shop@example.com"),
        }
    )
    with app.app_context():
        db.session.execute(db.text("DELETE FROM flask_order"))
        db.session.commit()
    yield app
    with app.app_context():
        db.session.remove()
        for engine in db.engines.values():
            engine.dispose()


def test_committed_order_queues_receipt_that_reaches_the_smtp_server(app, stack, smtp_server):
    settings = mailqueue.get_settings()
    assert (settings.database_url, settings.queue_name) == (
        stack.settings.database_url,
        stack.settings.queue_name,
    )
    with mail.record_messages() as outbox:
        response = app.test_client().post("/orders", data={"email": "ana@example.org"})
    assert response.status_code == 200, response.text
    order, mid = response.json["order"], response.json["mailqueue_id"]
    assert [(m.subject, m.mailqueue_id) for m in outbox] == [(f"Order {order}", mid)]
    assert row_count(stack, "flask_order") == 1
    assert mail.get_status(mid).status == "queued"
    assert mailqueue.get_status_by_key(f"flask-order-{order}").id == mid

    assert deliver(stack, [mid]).claimed == 1

    (received,) = smtp_server.messages
    assert received.mail_from == "shop@example.com"
    assert sorted(received.rcpt_tos) == [
        "ana@example.org",
        "audit@example.com",
        "sales@example.com",
    ]
    msg = parsed(received)
    assert msg["From"] == "Shop <shop@example.com>"
    assert msg["Subject"] == f"Order {order}"
    assert msg["Cc"] == "sales@example.com"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["X-Shop-Order"] == str(order)
    assert msg["Bcc"] is None
    assert msg.get_body(("plain",)).get_content().strip() == f"Thanks for order {order}."
    assert f"<b>{order}</b>" in msg.get_body(("html",)).get_content()
    (attachment,) = list(msg.iter_attachments())
    assert (attachment.get_filename(), attachment.get_content_type()) == ("receipt.csv", "text/csv")
    assert attachment.get_content().splitlines() == ["order,total", f"{order},42.00"]

    info = mailqueue.get_status(mid)
    assert info.status == "sent"
    assert anymail_statuses(info) == {"sent"}


def test_declined_order_rolls_back_and_sends_nothing(app, stack, smtp_server):
    response = app.test_client().post(
        "/orders", data={"email": "ana@example.org", "card": "declined"}
    )
    assert response.status_code == 402
    assert row_count(stack, "flask_order") == 0
    assert row_count(stack, "mq_message") == 0
    assert row_count(stack, "mq_recipient") == 0
    assert smtp_server.messages == []


def test_outside_a_transaction_and_flask_mail_style_send_message(app, stack, smtp_server):
    response = app.test_client().post("/contact", data={"text": "Hello there"})
    assert response.status_code == 200
    contact_id = response.json["mailqueue_id"]
    assert mailqueue.get_status(contact_id).status == "queued"  # committed before the response

    with app.app_context():
        report_id = mail.send_message(
            "Report", recipients=[("Ops Team", "ops@example.com")], body="numbers"
        )
        db.session.commit()  # in db.session: queued by this commit
    assert row_count(stack, "mq_message") == 2

    deliver(stack, all_ids(stack))
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == [
        ("ops@example.com",),
        ("team@example.com",),
    ]
    report = parsed(smtp_server.received_for("ops@example.com")[0])
    assert report["To"] == "Ops Team <ops@example.com>"
    assert report.get_body(("plain",)).get_content().strip() == "numbers"
    assert {mailqueue.get_status(i).status for i in (contact_id, report_id)} == {"sent"}


def test_anymail_words_and_the_terminal_callback(stack, smtp_server):
    """Anymail words we produce; MAILQUEUE_ON_TERMINAL is called for terminal messages only."""
    stack.reconfigure(on_terminal="tests.contrib_helpers:record_terminal")
    contrib_helpers.terminal_calls.clear()
    smtp_server.reject = ["refused@*"]
    smtp_server.defer = ["later@*", "never@*"]

    mixed = mailqueue.enqueue(
        CoreMessage(
            sender="app@example.com",
            to=["ok@example.com", "refused@example.com", "later@example.com"],
            subject="mixed",
            text="x",
        )
    )
    info = mailqueue.get_status(mixed)
    assert anymail_statuses(info) == {"queued"}

    deliver(stack, [mixed])
    info = mailqueue.get_status(mixed)
    assert info.status == "deferred"
    words = {r.address: anymail_status(r) for r in info.recipients}
    assert words == {
        "ok@example.com": "sent",
        "refused@example.com": "rejected",
        "later@example.com": "deferred",
    }
    assert contrib_helpers.terminal_calls == []  # deferred is not terminal

    # A recipient still deferred when the message's lifetime runs out: "bounced".
    stack.reconfigure(message_lifetime_s=1.0)
    doomed = mailqueue.enqueue(
        CoreMessage(sender="app@example.com", to="never@example.com", subject="doomed", text="x")
    )
    deliver(stack, [doomed])
    info = mailqueue.get_status(doomed)
    assert (info.status, info.recipients[0].error) == ("failed", "Expired")
    assert anymail_status(info.recipients[0]) == "bounced"
    assert [(c.id, c.status) for c in contrib_helpers.terminal_calls] == [(doomed, "failed")]

    # A cancelled recipient reads as "failed" in Anymail's words.
    stack.reconfigure(message_lifetime_s=3600.0)
    cancelled = mailqueue.enqueue(
        CoreMessage(sender="app@example.com", to="c@example.com", subject="c", text="x")
    )
    mailqueue.cancel(cancelled)
    assert anymail_statuses(mailqueue.get_status(cancelled)) == {"failed"}

    # A message reaching a terminal status by delivery calls back with what get_status says.
    contrib_helpers.terminal_calls.clear()
    done = mailqueue.enqueue(
        CoreMessage(sender="app@example.com", to="fine@example.com", subject="ok", text="x")
    )
    deliver(stack, [done])
    (call,) = contrib_helpers.terminal_calls
    assert (call.id, call.status, call.recipients[0].smtp_code) == (done, "sent", 250)
    assert dt.datetime.now(dt.UTC) - call.updated_at < dt.timedelta(minutes=1)


# --------------------------------------------------------------------------- Flask-Mail's API
# What Flask-Mail's own suite (tests/peer/flask_mail) does not cover: the
# transaction of mail.connect(), MAIL_SUPPRESS_SEND, MAIL_MAX_EMAILS, the
# exception types, and what reaches the relay.


def _plain_app(stack, **config):
    """A Flask-Mail style app: ``Mail(app)``, no Flask-SQLAlchemy."""
    from flask import Flask

    from mailqueue.contrib.flask import Mail

    app = Flask("plain")
    app.config.update(
        TESTING=True,
        MAIL_DEFAULT_SENDER="app@example.com",
        MAILQUEUE_DATABASE_URL=stack.settings.database_url,
        MAILQUEUE_BROKER_URL=stack.settings.broker_url,
        MAILQUEUE_QUEUE=stack.settings.queue_name,
        MAILQUEUE_RELAY_URL=stack.settings.relay.url,
        **config,
    )
    return app, Mail(app)


def test_connect_in_a_flask_sqlalchemy_transaction_follows_its_commit(app, stack, smtp_server):
    from mailqueue.contrib.flask import Message

    with app.app_context():
        with mail.connect() as conn:
            for n in range(3):
                conn.send(Message(f"rolled back {n}", recipients=["ana@example.org"], body="x"))
        db.session.rollback()
    assert row_count(stack, "mq_message") == 0

    with app.app_context():
        with mail.connect() as conn:
            ids = [
                conn.send(Message(f"kept {n}", recipients=[f"u{n}@example.org"], body="x"))
                for n in range(3)
            ]
        db.session.commit()
    assert sorted(str(uuid.UUID(i)) for i in all_ids(stack)) == sorted(ids)
    deliver(stack, ids)
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == [
        ("u0@example.org",),
        ("u1@example.org",),
        ("u2@example.org",),
    ]


def test_connect_without_flask_sqlalchemy_is_one_transaction(sqlite_stack, smtp_server):
    from mailqueue.contrib.flask import Message

    app, mail_ = _plain_app(sqlite_stack)
    with app.app_context():
        with pytest.raises(RuntimeError), mail_.connect() as conn:
            conn.send(Message("a", recipients=["a@example.org"], body="x"))
            raise RuntimeError("the batch fails half way")
        assert row_count(sqlite_stack, "mq_message") == 0

        with mail_.connect() as conn:
            conn.send_message("b", recipients=["b@example.org"], body="x")
            conn.send(Message("c", recipients=["c@example.org"], body="x"), "bounce@example.com")
    deliver(sqlite_stack, all_ids(sqlite_stack))
    assert sorted((m.mail_from, m.rcpt_tos) for m in smtp_server.messages) == [
        ("app@example.com", ("b@example.org",)),
        ("bounce@example.com", ("c@example.org",)),
    ]


def test_mail_max_emails_commits_every_n_messages(sqlite_stack):
    from mailqueue.contrib.flask import Message

    app, mail_ = _plain_app(sqlite_stack, MAIL_MAX_EMAILS=2)
    with app.app_context(), pytest.raises(RuntimeError), mail_.connect() as conn:
        for n in range(3):
            conn.send(Message(str(n), recipients=["a@example.org"], body="x"))
        raise RuntimeError("after three")
    assert row_count(sqlite_stack, "mq_message") == 2  # the first two were committed


def test_suppress_send_checks_and_records_but_queues_nothing(sqlite_stack):
    from mailqueue.contrib.flask import BadHeaderError, Message

    app, mail_ = _plain_app(sqlite_stack, MAIL_SUPPRESS_SEND=True)
    with app.app_context(), mail_.record_messages() as outbox:
        assert mail_.send(Message("hi", recipients=["a@example.org"], body="x")) is None
        with mail_.connect() as conn:
            conn.send_message("hi again", recipients=["b@example.org"], body="x")
        with pytest.raises(BadHeaderError):
            mail_.send(Message("x", recipients=["a@example.org\r\nBcc: evil@example.org"]))
        with pytest.raises(InvalidMessageError) as refused:
            mail_.send(Message("x", recipients=["a@example.org, evil@example.org"], body="x"))
    assert refused.value.field == "to"
    assert [(m.subject, m.mailqueue_id) for m in outbox] == [("hi", None), ("hi again", None)]
    assert row_count(sqlite_stack, "mq_message") == 0


def test_refusals_are_invalid_message_errors_of_flask_mails_kinds(sqlite_stack):
    from mailqueue.contrib.flask import BadHeaderError, Message, MessageIncompleteError

    app, mail_ = _plain_app(sqlite_stack)
    with app.app_context():
        app.extensions["mail"].default_sender = None
        with pytest.raises(AssertionError) as no_sender:
            mail_.send(Message("x", recipients=["a@example.org"], body="x"))
        app.extensions["mail"].default_sender = "app@example.com"
        with pytest.raises(AssertionError) as no_rcpt:
            mail_.send(Message("x", body="x"))
        with pytest.raises(HeaderInjectionError) as bad:
            mail_.send(Message("x\r\nBcc: evil@example.org", recipients=["a@example.org"]))
        with pytest.raises(InvalidMessageError) as option:
            mail_.send(Message("x", recipients=["a@example.org"], rcpt_options=["NOTIFY=SUCCESS"]))
        mail_.send(Message("x", recipients=["a@example.org"], mail_options=["BODY=8BITMIME"]))
    assert isinstance(no_sender.value, MessageIncompleteError)
    assert isinstance(no_sender.value, InvalidMessageError)
    assert (no_sender.value.field, no_rcpt.value.field) == ("sender", "to")
    assert isinstance(bad.value, BadHeaderError)
    assert bad.value.field == "subject"
    assert option.value.field == "rcpt_options"
    assert row_count(sqlite_stack, "mq_message") == 1


def test_flask_mail_messages_reach_the_relay_as_as_bytes_shows(sqlite_stack, smtp_server):
    from mailqueue.contrib.flask import Message

    app, mail_ = _plain_app(sqlite_stack)
    with app.app_context():
        assert app.extensions["mail"] is mail_.state
        assert app.extensions["mailqueue"] is mail_
        # A pair's name may hold a comma: still one address (Flask-Mail shows "name <addr>").
        sender = Message("html only", sender=("Doe, Jane", "jane@example.com"))
        assert sender.sender == "Doe, Jane <jane@example.com>"
        sender.add_recipient("ana@example.org")
        sender.html = "<p>Hi</p>"
        mid = mail_.send(sender)
        assert sender.date is not None and sender.mailqueue_id == mid
        shown = sender.as_bytes()
    deliver(sqlite_stack, [mid])
    (received,) = smtp_server.messages
    assert received.rcpt_tos == ("ana@example.org",)
    (boundary,) = re.findall(rb'boundary="([^"]+)"', received.data)
    (shown_boundary,) = re.findall(rb'boundary="([^"]+)"', shown)
    assert received.data == shown.replace(shown_boundary, boundary)
    msg = parsed(received)
    assert msg["From"].addresses[0].display_name == "Doe, Jane"
    assert msg["Message-ID"] == sender.msgId
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hi</p>"
    assert msg.get_body(("plain",)).get_content().strip() == ""


def test_a_lazy_subject_is_sent_as_its_text(sqlite_stack, smtp_server):
    """Flask-Babel's lazy_gettext() subjects work, as with Flask-Mail (force_text)."""
    from mailqueue.contrib.flask import Message

    class Lazy:
        def __str__(self) -> str:
            return "Willkommen"

    app, mail_ = _plain_app(sqlite_stack)
    with app.app_context():
        mid = mail_.send(Message(Lazy(), recipients=["a@example.org"], body="x"))  # type: ignore[arg-type]
    deliver(sqlite_stack, [mid])
    assert parsed(smtp_server.messages[0])["Subject"] == "Willkommen"


def test_the_extension_suppresses_and_list_mail_to_that_address_is_withheld(
    app, stack, smtp_server
):
    from mailqueue.contrib.flask import Message as FlaskMessage

    with app.app_context():
        entry = mail.suppress(
            "Ana@Example.org", reason="unsubscribed", scope="list:news.example.org"
        )
        assert (entry.address, entry.scope) == ("Ana@example.org", "list:news.example.org")
        assert mail.is_suppressed("Ana@example.org", list_id="news.example.org")
        news = FlaskMessage(
            "News", recipients=["Ana@example.org"], body="hi", list_id="news.example.org"
        )
        receipt = FlaskMessage("Receipt", recipients=["Ana@example.org"], body="thanks")
        ids = [mail.send(news, session=False), mail.send(receipt, session=False)]
    deliver(stack, ids)
    assert [mailqueue.get_status(i).status for i in ids] == ["suppressed", "sent"]
    assert [parsed(m)["Subject"] for m in smtp_server.messages] == ["Receipt"]
    with app.app_context():
        assert mail.unsuppress("Ana@example.org", scope="list:news.example.org") is True
