"""Django integration, as a user has it: a project whose views send mail through mailqueue.

``tests/django_project`` is a real Django project (settings, urls, an app
with a model and a migration). Its views call ``send_mail``,
``send_mass_mail`` and ``EmailMultiAlternatives.send()``; the backend is
``mailqueue.contrib.django.EmailBackend`` (``EMAIL_BACKEND`` on Django 5.2,
``MAILERS`` on 6.1+). The tests drive the views with Django's test
``Client``, deliver in-process with the worker's own code to the dev SMTP
server, and assert on what the server received and on the status rows —
on SQLite and PostgreSQL, in both transaction modes.

The default run (Python 3.11) tests Django 5.2; ``make test`` runs this
file again under Python 3.12 with Django 6.1 (``.venv-django61``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import django
import pytest
import sqlalchemy as sa
from django.core import mail as django_mail
from django.test import Client, override_settings

import mailqueue
from mailqueue.config import configure, settings_from_env
from mailqueue.contrib.status import anymail_statuses, find_by_metadata
from mailqueue.migrate import upgrade
from tests.conftest import (
    POSTGRES_URL,
    REDIS_URL,
    Stack,
    _base_settings,
    _check_postgres,
    require,
    wait_until,
)
from tests.contrib_helpers import all_ids, deliver, parsed, row_count


@dataclass
class DjangoEnv:
    sqlite_url: str
    pg_url: str | None


@pytest.fixture(scope="session")
def django_env(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Configure and set up the test project once: a SQLite and (if reachable) a PG database.

    Django is set up once per process, but pytest runs a session fixture once
    per module that imports it (the admin and peer tests do): a project found
    configured is reused, its databases brought to head (both migrations are
    idempotent), never replaced by a fresh SQLite file Django does not use.
    """
    from django.conf import settings as django_settings

    if django_settings.configured:
        from django.core.management import call_command as django_call

        sqlite_url = f"sqlite:///{django_settings.DATABASES['default']['NAME']}"
        upgrade(sqlite_url)
        pg_url = None
        if "pg" in django_settings.DATABASES:  # the session's database, already at head
            pg_url = request.getfixturevalue("pg_database")
        for alias in django_settings.DATABASES:
            django_call("migrate", database=alias, verbosity=0)
        yield DjangoEnv(sqlite_url, pg_url)
        return
    sqlite_path: Path = tmp_path_factory.mktemp("django") / "app.db"
    sqlite_url = f"sqlite:///{sqlite_path}"
    upgrade(sqlite_url)  # mailqueue's tables (`mailqueue migrate`) next to Django's
    pg_url = None
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
        "MQ_DJANGO_SQLITE": str(sqlite_path),
    }
    if _check_postgres() is None:
        pg_url = request.getfixturevalue("pg_database")  # already holds mailqueue's tables
        url = sa.engine.make_url(pg_url)
        env.update(
            MQ_DJANGO_PG_NAME=url.database,
            MQ_DJANGO_PG_USER=url.username or "",
            MQ_DJANGO_PG_PASSWORD=url.password or "",
            MQ_DJANGO_PG_HOST=url.host or "127.0.0.1",
            MQ_DJANGO_PG_PORT=str(url.port or 5432),
        )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        django.setup()
        from django.conf import settings
        from django.core.management import call_command

        for alias in settings.DATABASES:
            call_command("migrate", database=alias, verbosity=0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield DjangoEnv(sqlite_url, pg_url)
    from django.db import connections

    connections.close_all()


@dataclass
class DjangoStack(Stack):
    alias: str = "default"


@pytest.fixture(params=["sqlite", "postgres"])
def dj(request, django_env, smtp_server, tmp_path):
    """mailqueue configured on the same database as one of the project's Django databases."""
    if request.param == "postgres":
        require("postgres")
        require("redis")
        url, broker, alias = django_env.pg_url, REDIS_URL, "pg"
    else:
        url, broker, alias = (
            django_env.sqlite_url,
            f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "default",
        )
    settings = configure(
        _base_settings(url, broker, smtp_server.url, f"mq-test-{uuid.uuid4().hex[:8]}")
    )
    stack = DjangoStack(request.param, settings, alias=alias)
    with stack.engine.begin() as conn:
        for table in ("mq_recipient", "mq_message", "shop_order"):
            conn.execute(sa.text(f"DELETE FROM {table}"))
    try:
        with override_settings(SHOP_DATABASE=alias, MAILQUEUE_DJANGO_DATABASE=alias):
            yield stack
    finally:
        mailqueue._reset_caches()
        configure(settings_from_env({}))


both_modes = pytest.mark.parametrize("same_database", [True, False], ids=["same-db", "on-commit"])


@both_modes
def test_order_view_queues_receipt_that_reaches_the_smtp_server(dj, smtp_server, same_database):
    with override_settings(MAILQUEUE_DJANGO_SAME_DATABASE=same_database):
        response = Client().post("/order/", {"email": "ana@example.org"})
    assert response.status_code == 200, response.content
    body = response.json()
    order, mid = body["order"], body["mailqueue_id"]
    assert row_count(dj, "shop_order") == 1

    info = mailqueue.get_status(mid)
    assert info.status == "queued"
    assert info.subject == f"Order {order} confirmed"
    assert {(r.address, r.kind) for r in info.recipients} == {
        ("ana@example.org", "to"),
        ("sales@example.com", "cc"),
        ("audit@example.com", "bcc"),
    }
    # Lookups the app can use without having kept the id.
    assert mailqueue.get_status_by_key(f"order-{dj.alias}-{order}").id == mid
    assert [m.id for m in find_by_metadata(order=str(order))] == [mid]

    report = deliver(dj, [mid])
    assert report.claimed == 1

    assert len(smtp_server.messages) == 1
    received = smtp_server.messages[0]
    assert received.mail_from == "shop@example.com"
    assert sorted(received.rcpt_tos) == [
        "ana@example.org",
        "audit@example.com",
        "sales@example.com",
    ]
    msg = parsed(received)
    assert msg["Subject"] == f"Order {order} confirmed"
    assert msg["To"] == "ana@example.org"
    assert msg["Cc"] == "sales@example.com"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["X-Shop-Order"] == str(order)
    assert msg["Bcc"] is None
    assert not [k for k in msg if k.lower().startswith("x-mailqueue")]
    assert msg.get_body(("plain",)).get_content().strip() == f"Thanks for order {order}."
    assert f"<b>{order}</b>" in msg.get_body(("html",)).get_content()
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "receipt.txt"
    assert attachment.get_content().splitlines() == [
        f"order {order}: 42.00 EUR"
    ]  # CRLF on the wire

    info = mailqueue.get_status(mid)
    assert info.status == "sent"
    assert {r.status for r in info.recipients} == {"sent"}
    assert anymail_statuses(info) == {"sent"}
    with dj.engine.connect() as conn:
        meta = conn.execute(sa.text("SELECT meta FROM mq_message")).scalar_one()
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert meta == {"order": str(order), "tags": ["receipt", "shop"]}


@both_modes
def test_declined_order_rolls_back_and_sends_nothing(dj, smtp_server, same_database):
    with override_settings(MAILQUEUE_DJANGO_SAME_DATABASE=same_database):
        response = Client().post("/order/", {"email": "ana@example.org", "card": "declined"})
    assert response.status_code == 402
    assert row_count(dj, "shop_order") == 0
    assert row_count(dj, "mq_message") == 0
    assert row_count(dj, "mq_recipient") == 0
    assert smtp_server.messages == []

    # The next, paid order is queued and delivered as usual.
    with override_settings(MAILQUEUE_DJANGO_SAME_DATABASE=same_database):
        response = Client().post("/order/", {"email": "bo@example.org"})
    assert response.status_code == 200
    deliver(dj, all_ids(dj))
    assert len(smtp_server.messages) == 1
    assert sorted(smtp_server.messages[0].rcpt_tos) == [
        "audit@example.com",
        "bo@example.org",
        "sales@example.com",
    ]


def test_send_mail_and_send_mass_mail_return_djangos_counts(dj, smtp_server):
    client = Client()
    assert client.post("/welcome/", {"email": "new@example.org"}).json() == {"sent": 1}
    assert client.post("/newsletter/", {"email": ["a@example.org", "b@example.org"]}).json() == {
        "sent": 2
    }
    ids = all_ids(dj)
    assert len(ids) == 3
    deliver(dj, ids)

    assert sorted(m.rcpt_tos for m in smtp_server.messages) == [
        ("a@example.org",),
        ("b@example.org",),
        ("new@example.org",),
    ]
    welcome = parsed(smtp_server.received_for("new@example.org")[0])
    assert welcome["From"] == "Shop <shop@example.com>"
    assert welcome.get_body(("html",)).get_content().strip() == "<h1>Welcome</h1>"
    assert welcome.get_body(("plain",)).get_content().strip() == "Hello and welcome."
    news = parsed(smtp_server.received_for("b@example.org")[0])
    assert news["Subject"] == "News for b@example.org"
    assert {mailqueue.get_status(i).status for i in ids} == {"sent"}


def test_settings_options_send_at_relay_and_bad_input(dj, smtp_server):
    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import QueuedEmailMessage

    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    scheduled = EmailMessage(
        "Later",
        "in two hours",
        to=["later@example.org"],
        headers={"X-Mailqueue-Send-At": later.isoformat(), "X-Mailqueue-Relay": "bulk"},
    )
    assert scheduled.send() == 1
    info = mailqueue.get_status(scheduled.mailqueue_id)
    assert info.relay == "bulk"
    assert abs((info.next_attempt_at - later).total_seconds()) < 1
    assert deliver(dj, [info.id]).claimed == 0  # not due: nothing goes out
    assert smtp_server.messages == []

    # The subclass takes the same options as keyword arguments.
    once = QueuedEmailMessage("Once", "x", to=["once@example.org"], idempotency_key="k-1")
    twice = QueuedEmailMessage("Once", "x", to=["once@example.org"], idempotency_key="k-1")
    assert once.send() == 1 and twice.send() == 1
    assert twice.mailqueue_id == once.mailqueue_id
    assert row_count(dj, "mq_message") == 2

    # Bad input is refused whole, in the view's code path, and writes nothing.
    bad = [
        EmailMessage("x", "y", to=["not an address"]),
        EmailMessage("x", "y", to=["ok@example.org"], headers={"X-Mailqueue-Relya": "typo"}),
        EmailMessage("x", "y", to=["ok@example.org"], headers={"X-Mailqueue-Send-At": "soon"}),
    ]
    for message in bad:
        with pytest.raises(mailqueue.InvalidMessageError):
            message.send()
    assert row_count(dj, "mq_message") == 2


def test_a_second_backend_with_its_own_relay(dj, smtp_server):
    """MAILERS["bulk"] on Django 6.1+; ``get_connection(..., relay=)`` on 5.2."""
    from django.core.mail import EmailMessage

    message = EmailMessage("Bulk", "news", to=["many@example.org"])
    if django.VERSION >= (6, 1):
        assert message.send(using="bulk") == 1
    else:
        connection = django_mail.get_connection(
            "mailqueue.contrib.django.EmailBackend", relay="bulk"
        )
        assert connection.send_messages([message]) == 1
    assert mailqueue.get_status(message.mailqueue_id).relay == "bulk"
    deliver(dj, [message.mailqueue_id])
    assert [m.rcpt_tos for m in smtp_server.messages] == [("many@example.org",)]


def test_mailqueue_settings_are_read_from_django_settings(dj, smtp_server, tmp_path):
    """``MAILQUEUE_*`` in settings.py configure mailqueue, over the environment."""
    from django.core.mail import send_mail

    queue = f"mq-test-{uuid.uuid4().hex[:8]}"
    with override_settings(
        MAILQUEUE_DATABASE_URL=dj.settings.database_url,
        MAILQUEUE_BROKER_URL=dj.settings.broker_url,
        MAILQUEUE_RELAY_URL=smtp_server.url,
        MAILQUEUE_QUEUE=queue,
        MAILQUEUE_MESSAGE_LIFETIME_S=3600,
    ):
        assert send_mail("Hi", "there", None, ["cfg@example.org"]) == 1
    current = mailqueue.get_settings()
    assert (current.queue_name, current.message_lifetime_s) == (queue, 3600.0)
    (mid,) = all_ids(dj)
    info = mailqueue.get_status(mid)
    assert dt.timedelta(minutes=59) < info.expires_at - info.created_at <= dt.timedelta(hours=1)


def test_fail_silently_skips_the_bad_message_and_counts_the_rest(dj, smtp_server):
    import warnings

    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import EmailBackend

    with warnings.catch_warnings():
        # Django 6.1 deprecates fail_silently (RemovedInDjango2028Warning); 5.2 does not warn.
        warnings.filterwarnings("ignore", message=".*fail_silently.*")
        backend = EmailBackend(fail_silently=True)
    good = EmailMessage("ok", "fine", to=["good@example.org"])
    bad = EmailMessage("bad", "x", to=["not an address"])
    assert backend.send_messages([bad, good]) == 1
    assert [r.address for r in mailqueue.get_status(good.mailqueue_id).recipients] == [
        "good@example.org"
    ]
    assert not hasattr(bad, "mailqueue_id")
    assert row_count(dj, "mq_message") == 1
    assert EmailBackend().send_messages([]) == 0


# --------------------------------------------------------------------------- issue #16


def test_a_500_error_mails_the_admins_through_a_real_worker(dj, smtp_server, spawn):
    """Default settings (DEBUG off, SERVER_EMAIL root@localhost) and ADMINS set: the
    view's exception becomes Django's "[Django] ERROR" mail, delivered by a
    ``mailqueue worker`` process (EMAIL_BACKEND on 5.2, MAILERS["default"] on 6.1)."""
    from django.conf import global_settings

    spawn("worker", "-P", "solo", "--loglevel", "WARNING", env=dj.env())
    # 5.2 wants (name, address) pairs; 6.1 deprecates them for plain addresses.
    admins = ["ops@example.com"] if django.VERSION >= (6, 0) else [("Ops", "ops@example.com")]
    with override_settings(ADMINS=admins, SERVER_EMAIL=global_settings.SERVER_EMAIL):
        response = Client(raise_request_exception=False).get("/broken/")
    assert response.status_code == 500
    wait_until(lambda: smtp_server.messages, what="the admins' error mail at the relay")
    (received,) = smtp_server.messages
    assert received.mail_from == "root@localhost"
    assert list(received.rcpt_tos) == ["ops@example.com"]
    msg = parsed(received)
    assert msg["From"] == "root@localhost"
    assert msg["To"] == "ops@example.com"
    assert msg["Subject"].startswith(
        "[Django] ERROR (EXTERNAL IP): Internal Server Error: /broken/"
    )
    assert "the broken view broke, as it was written to" in msg.get_body(("plain",)).get_content()
    (mid,) = all_ids(dj)
    wait_until(lambda: mailqueue.get_status(mid).status == "sent", what="the row marked sent")


def test_fail_silently_logs_each_message_it_drops(dj, smtp_server, caplog):
    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import EmailBackend

    backend = EmailBackend(fail_silently=True)
    bad = EmailMessage("Bad one", "x", "from@example.com", ["not an address"])
    good = EmailMessage("Good one", "x", "from@example.com", ["good@example.org"])
    with caplog.at_level(logging.WARNING, logger="mailqueue.django"):
        assert backend.send_messages([bad, good]) == 1
    (record,) = [r for r in caplog.records if r.name == "mailqueue.django"]
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "'Bad one'" in text and "InvalidMessageError" in text
    assert "'not an address' is not one address" in text or "not an address" in text
    assert row_count(dj, "mq_message") == 1


def test_fail_silently_logs_an_unreachable_database_without_its_password(dj, caplog):
    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import EmailBackend

    password = "hunter2-never-logged"
    unreachable = (
        sa.engine.make_url(POSTGRES_URL)
        .set(password=password, port=1, host="127.0.0.1")
        .render_as_string(hide_password=False)
    )
    with override_settings(MAILQUEUE_DATABASE_URL=unreachable):
        backend = EmailBackend(fail_silently=True)
        message = EmailMessage("Lost?", "x", "from@example.com", ["someone@example.org"])
        with caplog.at_level(logging.WARNING, logger="mailqueue.django"):
            assert backend.send_messages([message]) == 0  # nothing was queued
    (record,) = [r for r in caplog.records if r.name == "mailqueue.django"]
    text = record.getMessage()
    assert "'Lost?'" in text and "OperationalError" in text
    assert password not in caplog.text


@pytest.mark.parametrize("fail_silently", [True, False])
def test_a_write_that_fails_after_the_commit_is_logged(dj, caplog, fail_silently):
    """Separate databases: the rows are written after Django's commit. If that write
    fails, the caller's transaction has committed and ``send()`` has long returned:
    the loss is logged on mailqueue.django either way (never raised into the commit)."""
    from django.core.mail import EmailMessage
    from django.db import transaction

    from mailqueue.contrib.django import EmailBackend

    password = "hunter2-never-logged"
    unreachable = (
        sa.engine.make_url(POSTGRES_URL)
        .set(password=password, port=1, host="127.0.0.1")
        .render_as_string(hide_password=False)
    )
    with override_settings(MAILQUEUE_DATABASE_URL=unreachable):
        backend = EmailBackend(fail_silently=fail_silently, same_database=False)
        message = EmailMessage("After commit", "x", "from@example.com", ["someone@example.org"])
        with caplog.at_level(logging.WARNING), transaction.atomic(using=dj.alias):
            assert backend.send_messages([message]) == 1  # validated, to be written on commit
    warnings = [r for r in caplog.records if r.name == "mailqueue.django"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "'After commit'" in warnings[0].getMessage()
    assert "OperationalError" in warnings[0].getMessage()
    assert password not in caplog.text
    assert row_count(dj, "mq_message") == 0


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is Django 6.1's")
def test_fail_silently_is_a_mailers_option(dj, caplog):
    from django.core.mail import EmailMessage, mailers

    mailer = {"BACKEND": "mailqueue.contrib.django.EmailBackend"}
    with override_settings(
        MAILERS={
            "default": mailer,
            "errors": {**mailer, "OPTIONS": {"fail_silently": True, "relay": "bulk"}},
        }
    ):
        backend = mailers["errors"]
        assert (backend.alias, backend.fail_silently, backend.relay) == ("errors", True, "bulk")
        assert mailers["default"].fail_silently is False
        with caplog.at_level(logging.WARNING, logger="mailqueue.django"):
            sent = EmailMessage("x", "y", "from@example.com", ["bad address"]).send(using="errors")
    assert sent == 0
    assert "mailqueue.django" in {r.name for r in caplog.records}
    assert row_count(dj, "mq_message") == 0


def test_idna_2008_domains_with_joiners_reach_the_relay_as_given(dj, smtp_server):
    """Django's own IDNA 2008 cases (tests/mail, test_does_not_reencode_idna): ZERO
    WIDTH JOINER (Sinhala) and NON-JOINER (Persian) domains, and ß, kept as given."""
    from django.core.mail import EmailMessage

    message = EmailMessage(
        from_email='"βόλος" <from@xn--fa-hia.example.com>',
        to=['"faß" <to@xn--10cl1a0b660p.example.com>'],
        cc=['"ශ්‍රී" <cc@xn--nxasmm1c.example.com>'],
        bcc=['"نامه‌ای." <bcc@xn--mgba3gch31f060k.example.com>'],
    )
    assert message.send() == 1
    deliver(dj, [message.mailqueue_id])
    (received,) = smtp_server.messages
    assert received.mail_from == "from@xn--fa-hia.example.com"
    assert sorted(received.rcpt_tos) == [
        "bcc@xn--mgba3gch31f060k.example.com",
        "cc@xn--nxasmm1c.example.com",
        "to@xn--10cl1a0b660p.example.com",
    ]
    msg = parsed(received)
    assert msg["To"].addresses[0].addr_spec == "to@xn--10cl1a0b660p.example.com"
    assert msg["Bcc"] is None
    # A joiner where IDNA 2008 does not allow one (not after a virama) is refused.
    with pytest.raises(ValueError, match="not valid IDNA"):
        EmailMessage("x", "y", "from@example.com", ["a@xn--ab-m1t.com"]).send()


def test_lazy_addresses_and_addresses_without_a_domain(dj, smtp_server):
    """Lazy strings (Django #24416) are read as Django reads them. A bare name with no
    domain (Django #15042) goes to the relay as it is, as from Django's SMTP backend:
    the relay qualifies it or refuses it, and a refusal is that recipient's status.
    The rest of mailqueue (``Message``) still refuses bare names."""
    from django.core.mail import EmailMessage, send_mail
    from django.utils.translation import gettext_lazy as _

    message = EmailMessage(
        from_email=_("tester@localhost"),
        to=[_("to1@example.com")],
        cc=[_("cc1@example.com")],
        bcc=[_("bcc@example.com")],
        reply_to=[_("reply@example.com")],
    )
    assert message.send() == 1
    deliver(dj, [message.mailqueue_id])
    (received,) = smtp_server.messages
    assert received.mail_from == "tester@localhost"
    assert sorted(received.rcpt_tos) == ["bcc@example.com", "cc1@example.com", "to1@example.com"]
    assert parsed(received)["Reply-To"] == "reply@example.com"
    smtp_server.messages.clear()

    smtp_server.reject.append("refused")
    assert send_mail("Subject", "Content", "tester", ["django", "Someone <refused>"]) == 1
    (mid,) = {str(uuid.UUID(i)) for i in all_ids(dj)} - {message.mailqueue_id}
    deliver(dj, [mid])
    (received,) = smtp_server.messages
    assert (received.mail_from, list(received.rcpt_tos)) == ("tester", ["django"])
    msg = parsed(received)
    assert (msg["From"], msg["To"]) == ("tester", "django, Someone <refused>")
    statuses = {r.address: r.status for r in mailqueue.get_status(mid).recipients}
    assert statuses == {"django": "sent", "refused": "failed"}

    # Only plain dot-atom names; anything else is still refused, and only here.
    for entry in ("two words", "ünïcode", "x" * 65):
        with pytest.raises(ValueError):
            send_mail("Subject", "Content", "a@example.com", [entry])
    with pytest.raises(mailqueue.InvalidMessageError, match="has no domain"):
        mailqueue.enqueue(
            mailqueue.Message(subject="s", text="t", sender="a@example.com", to=["django"])
        )
    assert row_count(dj, "mq_message") == 2


def _django_messages() -> dict[str, Any]:
    """The same messages, built afresh for each backend."""
    from django.core.mail import EmailMessage, EmailMultiAlternatives

    alternatives = EmailMultiAlternatives(
        "Alternatives", "text part\nline two\n", "from@example.com", ["to@example.com"]
    )
    alternatives.attach_alternative("<p>html part</p>\n", "text/html")
    alternatives.attach("notes.txt", "line one\nline two\n", "text/plain")
    alternatives.attach("data.bin", b"\x00\x01\x02" * 40, "application/octet-stream")
    non_ascii = EmailMessage(
        "Grüße aus Köln",
        "x\n",
        "from@example.com",
        ["to@example.com"],
        headers={"X-Note": "café ☕ " * 20},  # long: folded as encoded words
    )
    non_ascii.attach("résumé naïve.txt", "contenu\n", "text/plain")  # RFC 2231 file name
    return {
        "plain": EmailMessage("Plain", "Body\nsecond line\n", "from@example.com", ["to@x.org"]),
        # base64 text (Cyrillic): CRLF inside the encoded text, as Django 6.1 sends it
        "base64 text": EmailMessage(
            "Base64", "В южных морях\nвторая строка\n", "from@example.com", ["to@example.com"]
        ),
        "quoted-printable text": EmailMessage(
            "Long", "В южных морях " * 60, "from@example.com", ["to@example.com"]
        ),
        "headers": EmailMessage(
            "Headers",
            "x\n",
            "Sender Name <from@example.com>",
            ["To Example <to@example.com>", "other@example.com"],
            cc=["cc@example.com"],
            bcc=["bcc@example.com"],
            reply_to=["reply@example.com"],
            headers={"X-Custom": "value"},
        ),
        "alternatives and attachments": alternatives,
        "non-ASCII text headers": non_ascii,
        "non-ASCII display name": EmailMessage(
            "Chère maman", "x\n", '"Firstname Sürname" <from@example.com>', ["to@example.com"]
        ),
    }


_DATE = re.compile(rb"^Date: [^\r\n]*", re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^Message-ID: [^\r\n]*", re.MULTILINE)
_BOUNDARY = re.compile(rb'boundary="([^"]+)"')


def _normalised(data: bytes) -> bytes:
    data = _MESSAGE_ID.sub(b"Message-ID: <id>", _DATE.sub(b"Date: <date>", data))
    for i, boundary in enumerate(_BOUNDARY.findall(data)):
        data = data.replace(boundary, b"BOUNDARY-%d" % i)
    return data


def _through_both(dj, smtp_server, name: str) -> tuple[bytes, bytes]:
    """``name`` sent by Django 6.1's SMTP backend, then by mailqueue (and its worker's
    code) to the same dev server: both as received, normalised."""
    from django.core.mail.backends.smtp import EmailBackend as SMTPBackend

    from mailqueue.contrib.django import EmailBackend

    smtp = SMTPBackend(alias="compare", host=smtp_server.host, port=smtp_server.port)
    assert smtp.send_messages([_django_messages()[name]]) == 1
    message = _django_messages()[name]
    assert EmailBackend().send_messages([message]) == 1
    deliver(dj, [message.mailqueue_id])
    by_django, by_mailqueue = smtp_server.messages
    assert by_django.mail_from == by_mailqueue.mail_from
    assert sorted(by_django.rcpt_tos) == sorted(by_mailqueue.rcpt_tos)
    return _normalised(by_django.data), _normalised(by_mailqueue.data)


_SAME_BYTES = [
    "plain",
    "base64 text",
    "quoted-printable text",
    "headers",
    "alternatives and attachments",
    "non-ASCII text headers",  # encoded words, as Django writes them (not raw UTF-8)
    "non-ASCII display name",  # atoms as they are, the other words encoded, as Django does
]


@pytest.mark.skipif(django.VERSION < (6, 1), reason="compares with Django 6.1's SMTP backend")
@pytest.mark.parametrize("name", _SAME_BYTES)
def test_bytes_at_the_relay_are_djangos_61(dj, smtp_server, name):
    """What the relay receives from mailqueue is what Django 6.1's own SMTP backend
    sends for the same message, Date, Message-ID and MIME boundaries aside."""
    by_django, by_mailqueue = _through_both(dj, smtp_server, name)
    assert by_mailqueue == by_django


def test_the_fail_silently_warning_masks_configured_passwords(dj, smtp_server, caplog):
    """Whatever an error's text holds, a password from mailqueue's settings (relay
    URLs, percent-encoded or not) does not reach the log line."""
    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import _dropped

    dj.reconfigure(relay_url=f"smtp://mailer:pa%2Fss-word-1@{smtp_server.host}:{smtp_server.port}")
    error = RuntimeError("relay smtp://mailer:pa%2Fss-word-1@host said no; auth pa/ss-word-1")
    message = EmailMessage("Masked", "x", "from@example.com", ["someone@example.org"])
    with caplog.at_level(logging.WARNING, logger="mailqueue.django"):
        _dropped([message], error)
    (record,) = caplog.records
    text = record.getMessage()
    assert "pa%2Fss-word-1" not in text and "pa/ss-word-1" not in text
    assert "relay smtp://mailer:***@host said no; auth ***" in text
