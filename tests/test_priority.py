"""Priority lanes: a password reset does not wait behind a newsletter, and bulk is not starved.

Real workers over each stack's broker (kombu's SQLite transport on ``sqlite``,
Redis on ``postgres``); order is read where it shows, at the dev SMTP
server, never from timings.
"""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

import mailqueue
from mailqueue import InvalidMessageError, Message
from mailqueue.store.models import MessageRow
from mailqueue.worker.app import flush_dispatch
from tests import test_django, test_flask, test_web_api
from tests.contrib_helpers import deliver, row_count

from .conftest import wait_until

M = MessageRow.__table__
AUTH = test_web_api.AUTH

# The faces' fixtures, as their own tests set them up.
dj, django_env = test_django.dj, test_django.django_env
app, client = test_flask.app, test_web_api.client


def _mail(to: str) -> Message:
    return Message(sender="app@example.com", to=to, subject="s", text="t")


def _positions(smtp_server, prefix: str) -> list[int]:
    """Where the messages to ``prefix*@`` stand in the order the server received them."""
    return [
        n
        for n, received in enumerate(smtp_server.messages)
        if received.rcpt_tos[0].startswith(prefix)
    ]


@pytest.mark.slow
def test_high_enqueued_after_a_bulk_backlog_is_delivered_before_it(stack, smtp_server, spawn):
    """1,000 bulk messages (100 tasks) wait; 5 password resets come after them. The
    resets are among the first delivered, not behind the backlog (one queue, FIFO,
    put them last)."""
    stack.reconfigure(batch_size=10)
    mailqueue.enqueue_many((_mail(f"news{i}@example.com") for i in range(1000)), priority="bulk")
    resets = [mailqueue.enqueue(_mail(f"reset{i}@example.com"), priority="high") for i in range(5)]
    flush_dispatch()

    spawn("worker", "--concurrency", "2", "--loglevel", "WARNING", env=stack.env())
    wait_until(lambda: len(smtp_server.messages) >= 1005, timeout=120, what="1,005 deliveries")

    high = _positions(smtp_server, "reset")
    bulk = _positions(smtp_server, "news")
    assert len(high) == 5 and len(bulk) == 1000
    # At most the tasks the worker had already taken (prefetch) go before them.
    assert max(high) < 300, high
    assert {mailqueue.get_status(i).priority for i in resets} == {"high"}


@pytest.mark.slow
def test_bulk_still_progresses_under_a_steady_high_backlog(stack, smtp_server, spawn):
    """2,000 high messages waiting and 50 bulk ones: bulk is not held until high runs dry
    (one task in ``FAIR_EVERY`` is taken lower lanes first)."""
    stack.reconfigure(batch_size=10)
    mailqueue.enqueue_many((_mail(f"news{i}@example.com") for i in range(50)), priority="bulk")
    mailqueue.enqueue_many((_mail(f"alert{i}@example.com") for i in range(2000)), priority="high")
    flush_dispatch()

    spawn("worker", "--concurrency", "2", "--loglevel", "WARNING", env=stack.env())
    wait_until(lambda: len(smtp_server.messages) >= 2050, timeout=180, what="2,050 deliveries")

    bulk = _positions(smtp_server, "news")
    high = _positions(smtp_server, "alert")
    assert len(bulk) == 50 and len(high) == 2000
    # Every bulk message went out while high ones were still waiting.
    assert max(bulk) < max(high) - 500, (max(bulk), max(high))


def test_the_scheduler_takes_higher_lanes_first(stack):
    """Rows the broker never heard of (it was down) come back highest lane first."""
    stack.reconfigure(dispatch="inline", broker_url="redis://127.0.0.1:1/0")
    bulk = mailqueue.enqueue(_mail("news@example.com"), priority="bulk")
    normal = mailqueue.enqueue(_mail("hello@example.com"))
    high = mailqueue.enqueue(_mail("reset@example.com"), priority="high")
    with stack.engine.begin() as conn:  # all due, none dispatched
        conn.execute(sa.update(M).values(dispatched_at=None))
    taken = stack.store.take_due(limit=10, redispatch_after_s=60)
    assert [str(i) for i, _ in taken] == [high, normal, bulk]
    assert [p for _, p in taken] == [0, 1, 2]


@pytest.mark.parametrize("bad", ["urgent", "", "HIGHEST", 1, ["high"]])
def test_an_unknown_priority_is_refused_whole(sqlite_stack, bad):
    with pytest.raises(InvalidMessageError) as caught:
        mailqueue.enqueue(_mail("a@example.com"), priority=bad)
    assert caught.value.field == "priority"
    assert "high, normal, bulk" in str(caught.value)
    with pytest.raises(InvalidMessageError):
        mailqueue.enqueue_many([_mail("a@example.com"), _mail("b@example.com")], priority=bad)
    with sqlite_stack.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(M)).scalar() == 0


def test_priority_words_are_stored_and_shown(sqlite_stack):
    ids = {
        word: mailqueue.enqueue(_mail(f"{word}@example.com"), priority=word)
        for word in ("high", "normal", "bulk")
    }
    ids["default"] = mailqueue.enqueue(_mail("d@example.com"))
    ids["spaced"] = mailqueue.enqueue(_mail("s@example.com"), priority=" High ")
    shown = {k: mailqueue.get_status(v).priority for k, v in ids.items()}
    assert shown == {
        "high": "high",
        "normal": "normal",
        "bulk": "bulk",
        "default": "normal",
        "spaced": "high",
    }
    assert mailqueue.get_status(ids["bulk"]).to_dict()["priority"] == "bulk"


# -- every entrance takes the lane ------------------------------------------------------


def test_json_api_takes_a_priority_and_shows_it(stack, client):
    body = {"sender": "app@example.com", "to": "a@example.com", "text": "x", "priority": "high"}
    created = client.post("/api/v1/messages", json=body, headers=AUTH)
    assert created.status_code in (200, 201, 202), created.text
    mid = created.json()["id"]
    assert client.get(f"/api/v1/messages/{mid}", headers=AUTH).json()["priority"] == "high"
    assert mailqueue.get_status(mid).priority == "high"

    refused = client.post("/api/v1/messages", json={**body, "priority": "asap"}, headers=AUTH)
    assert refused.status_code == 400
    assert "high, normal, bulk" in refused.text
    refused = client.post("/api/v1/messages", json={**body, "priority": 0}, headers=AUTH)
    assert refused.status_code == 400
    with stack.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(M)).scalar() == 1


def test_status_page_shows_the_priority(sqlite_stack, client):
    mid = mailqueue.enqueue(_mail("a@example.com"), priority="bulk")
    login = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
    client.post("/login", data={"token": test_web_api.TOKEN, "csrf": csrf})
    page = client.get(f"/messages/{mid}")
    assert re.search(r'<dd id="message-priority">bulk</dd>', page.text), page.text[:2000]


def test_high_ids_waiting_in_the_hand_off_go_to_the_broker_first(sqlite_stack, monkeypatch):
    """Ids that pile up while the broker is slow leave highest lane first, one lane
    per task: a reset committed after a newsletter chunk is not sent after it."""
    import threading

    from mailqueue.worker import app as worker_app

    sent: list[tuple[int, int]] = []
    entered, release = threading.Event(), threading.Event()
    real = worker_app.dispatch

    def slow(ids, settings, priority):
        entered.set()
        release.wait(60)
        sent.append((priority, len(ids)))
        return real(ids, settings=settings, priority=priority)

    monkeypatch.setattr(worker_app._handoff, "_send", slow)
    mailqueue.enqueue(_mail("first@example.com"))  # the hand-off hangs on this one
    assert entered.wait(30)
    mailqueue.enqueue_many((_mail(f"n{i}@example.com") for i in range(30)), priority="bulk")
    mailqueue.enqueue(_mail("reset@example.com"), priority="high")
    mailqueue.enqueue(_mail("hello@example.com"))
    release.set()
    assert flush_dispatch(timeout=30)
    assert sent[0] == (1, 1)  # already on its way when the others came
    assert sent[1:] == [(0, 1), (1, 1), (2, 30)]


def test_cli_send_priority_and_status_show_it(sqlite_stack):
    from click.testing import CliRunner

    from mailqueue.cli import cli

    runner = CliRunner()
    args = ["send", "--from", "a@example.com", "--to", "b@example.com", "--subject", "s"]
    sent = runner.invoke(cli, [*args, "--text", "t", "--priority", "bulk"])
    assert sent.exit_code == 0, sent.output
    mid = sent.output.strip()
    assert mailqueue.get_status(mid).priority == "bulk"
    shown = runner.invoke(cli, ["status", mid])
    assert "priority=bulk" in shown.output, shown.output
    wrong = runner.invoke(cli, [*args, "--text", "t", "--priority", "urgent"])
    assert wrong.exit_code == 2 and "high" in wrong.output


def test_django_header_and_backend_option_set_the_lane_and_the_header_stays_home(dj, smtp_server):
    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import EmailBackend, QueuedEmailMessage

    reset = EmailMessage(
        "Reset", "your link", to=["ana@example.org"], headers={"X-Mailqueue-Priority": "high"}
    )
    assert reset.send() == 1
    assert mailqueue.get_status(reset.mailqueue_id).priority == "high"
    deliver(dj, [reset.mailqueue_id])
    (received,) = smtp_server.messages
    assert b"x-mailqueue" not in received.data.lower()  # consumed, never on the wire

    news = QueuedEmailMessage("News", "n", to=["b@example.org"], priority="bulk")
    assert news.send() == 1
    assert mailqueue.get_status(news.mailqueue_id).priority == "bulk"

    backend = EmailBackend(priority="bulk")
    plain = EmailMessage("Digest", "d", to=["c@example.org"])
    urgent = EmailMessage(
        "Alarm", "a", to=["c@example.org"], headers={"X-Mailqueue-Priority": "HIGH"}
    )
    assert backend.send_messages([plain, urgent]) == 2
    assert mailqueue.get_status(plain.mailqueue_id).priority == "bulk"
    assert mailqueue.get_status(urgent.mailqueue_id).priority == "high"  # the message's wins

    bad = EmailMessage("x", "y", to=["c@example.org"], headers={"X-Mailqueue-Priority": "soon"})
    with pytest.raises(InvalidMessageError, match="high, normal, bulk"):
        bad.send()
    with pytest.raises(InvalidMessageError):
        EmailBackend(priority="fast")


def test_flask_message_priority(app, stack, smtp_server):
    from mailqueue.contrib.flask import Message as FlaskMessage
    from tests.flask_app.app import mail

    with app.app_context():
        mid = mail.send(
            FlaskMessage("Reset", recipients=["a@example.com"], body="x", priority="high"),
            session=False,
        )
        with pytest.raises(InvalidMessageError, match="high, normal, bulk"):
            mail.send(
                FlaskMessage("Reset", recipients=["a@example.com"], body="x", priority="now"),
                session=False,
            )
    assert mailqueue.get_status(mid).priority == "high"
    assert row_count(stack, "mq_message") == 1


def _message_indexes(engine: sa.Engine) -> set[str]:
    """Every index on mq_message, expression indexes too (reflection skips those)."""
    query = (
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'mq_message'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'mq_message'"
    )
    with engine.connect() as conn:
        return set(conn.execute(sa.text(query)).scalars())


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migration_0007_gives_existing_rows_the_normal_lane_and_reverses(kind, empty_database):
    """A message written before lanes existed is ``normal`` after the upgrade and is
    dispatched to the queue it always used; the downgrade drops only the column."""
    import uuid

    from alembic import command

    from mailqueue.migrate import alembic_config, upgrade

    url = empty_database

    engine = sa.create_engine(url)
    try:
        upgrade(url, "0005")
        mid = uuid.uuid4()
        now = "2026-01-01 00:00:00"
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO mq_message (id, created_at, updated_at, status, relay, "
                    "mail_from, subject, size, content, smtputf8, eightbit, attempts, "
                    "next_attempt_at, expires_at) VALUES (:id, :t, :t, 'queued', 'default', "
                    "'a@example.com', 's', 1, :c, false, false, 0, :t, :t)"
                ),
                {"id": mid.hex if kind == "sqlite" else mid, "t": now, "c": b"x"},
            )
        upgrade(url, "0007")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT priority FROM mq_message")).scalar() == 1
        indexes = _message_indexes(engine)
        assert "ix_mq_message_tag_created" in indexes  # an expression index (0003)
        command.downgrade(alembic_config(url), "0006")
        assert _message_indexes(engine) == indexes
        columns = {c["name"] for c in sa.inspect(engine).get_columns("mq_message")}
        assert "priority" not in columns and "subject" in columns
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM mq_message")).scalar() == 1
    finally:
        engine.dispose()


def test_a_retried_message_goes_back_to_its_own_lane(stack, smtp_server, monkeypatch):
    from mailqueue import api

    smtp_server.reject = ["nope@*"]
    high = mailqueue.enqueue(_mail("nope@example.com"), priority="high")
    bulk = mailqueue.enqueue(_mail("nope@example.com"), priority="bulk")
    flush_dispatch()
    test_web_api.deliver(stack, [high, bulk])
    assert {mailqueue.get_status(i).status for i in (high, bulk)} == {"failed"}

    lanes: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(
        api, "dispatch", lambda ids, priority: lanes.append((priority, [str(i) for i in ids]))
    )
    assert mailqueue.retry_failed() == 2
    assert lanes == [(0, [high]), (2, [bulk])]
