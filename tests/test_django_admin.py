"""The Django admin for mailqueue's tables, driven with Django's test ``Client``.

``mailqueue.contrib.django_admin`` is installed in ``tests/django_project``.
On SQLite mailqueue's tables share Django's ``default`` database; on
PostgreSQL they live in the ``pg`` database while Django's own tables (users,
sessions) stay in ``default``: the separate-database case. Messages are made
the way users make them (``mailqueue.enqueue``, delivered by the worker's own
code to the dev SMTP server, which refuses ``bounce*`` addresses), and every
assertion is on what the page shows or what the status table says.

``make test`` runs this file on Django 5.2 and again on 6.1 (``.venv-django61``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
from django.db import connections
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext

import mailqueue
from mailqueue import Message
from mailqueue.contrib.django_admin.apps import check_database
from mailqueue.statuses import MessageStatus
from tests import test_django
from tests.contrib_helpers import deliver
from tests.test_django import DjangoEnv, DjangoStack, dj  # noqa: F401  (fixtures)

LIST = "/admin/mailqueue/message/"


django_env = test_django.django_env  # one project per process, whichever module sets it up


def page(obj_id: str, action: str = "change") -> str:
    return f"{LIST}{obj_id}/{action}/"


@dataclass
class Seeded:
    stack: DjangoStack
    sent: str
    bounced: str
    queued: str
    bulk: str

    @property
    def alias(self) -> str:
        return self.stack.alias


def _clean(stack: DjangoStack) -> None:
    with stack.engine.begin() as conn:
        for table in ("mq_attempt", "mq_recipient", "mq_message", "mq_relay"):
            conn.execute(sa.text(f"DELETE FROM {table}"))


@pytest.fixture
def seeded(dj: DjangoStack, smtp_server) -> Iterator[Seeded]:  # noqa: F811
    """Four messages: one sent, one refused (550, failed), one queued, one on relay ``bulk``."""
    _clean(dj)
    smtp_server.reject.append("bounce*@*")

    def one(subject: str, to: list[str], **kwargs) -> str:
        msg = Message(subject=subject, sender="shop@example.com", to=to, text="hello")
        return mailqueue.enqueue(msg, **kwargs)

    sent = one("Welcome Ana", ["ana@example.org"], metadata={"tag": "welcome"})
    bounced = one(
        "Receipt 42", ["bounce-bo@example.org", "cy@example.org"], metadata={"tag": "receipt"}
    )
    deliver(dj, [sent, bounced])
    queued = one("Newsletter", ["dee@example.org"], metadata={"tag": "news"})
    bulk = one("Bulk offer", ["eve@example.org"], relay="bulk")
    yield Seeded(dj, sent, bounced, queued, bulk)
    _clean(dj)


def _user(name: str, *, superuser: bool = False, perms: tuple[str, ...] = ()) -> Client:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    users = get_user_model()
    users.objects.filter(username=name).delete()
    if superuser:
        user = users.objects.create_superuser(name, f"{name}@example.com", "pw")
    else:
        user = users.objects.create_user(name, f"{name}@example.com", "pw", is_staff=True)
        for codename in perms:
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label="mailqueue", codename=codename)
            )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def boss() -> Client:
    return _user("boss", superuser=True)


def _rows(html: str) -> list[str]:
    """The subjects in the result table, top to bottom."""
    if 'id="result_list"' not in html:
        assert "0 messages" in html, html
        return []
    table = html.split('id="result_list"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<td class="field-subject"><a [^>]*>([^<]*)</a>', table)


def _status(stack: DjangoStack, mid: str) -> tuple[str, dict[str, str]]:
    info = mailqueue.get_status(mid)
    return info.status, {r.address: r.status for r in info.recipients}


# -- the list ---------------------------------------------------------------------------


def test_list_shows_newest_first_and_never_counts_the_table(seeded, boss):
    with CaptureQueriesContext(connections[seeded.alias]) as queries:
        response = boss.get(LIST)
    assert response.status_code == 200
    html = response.content.decode()
    assert _rows(html) == ["Bulk offer", "Newsletter", "Receipt 42", "Welcome Ana"]
    assert "4 messages" in html
    assert "delete_selected" not in html  # no delete action
    assert 'value="retry_failed"' in html and 'value="cancel_messages"' in html
    mq = [q["sql"] for q in queries.captured_queries if "mq_message" in q["sql"]]
    # one capped count and the page itself, whatever the table's size
    assert len(mq) == 2, mq
    counts = [sql for sql in mq if "COUNT(" in sql.upper()]
    assert len(counts) == 1 and "LIMIT 10001" in counts[0], counts


def test_filters_status_relay_tag_and_date(seeded, boss):
    def subjects(query: str) -> list[str]:
        response = boss.get(LIST + query)
        assert response.status_code == 200, response
        return _rows(response.content.decode())

    assert subjects("?status=partial") == ["Receipt 42"]  # one refused, one accepted
    assert subjects("?status=failed") == []
    assert subjects("?status=sent") == ["Welcome Ana"]
    assert subjects("?status=queued") == ["Bulk offer", "Newsletter"]
    assert subjects("?relay=bulk") == ["Bulk offer"]
    assert subjects("?relay=default&status=queued") == ["Newsletter"]
    assert subjects("?tag=receipt") == ["Receipt 42"]
    assert subjects("?tag=nobody-uses-this") == []
    assert subjects("?" + urlencode({"created_at__gte": "2000-01-01 00:00:00+00:00"})) == [
        "Bulk offer",
        "Newsletter",
        "Receipt 42",
        "Welcome Ana",
    ]
    assert subjects("?" + urlencode({"created_at__gte": "2999-01-01 00:00:00+00:00"})) == []
    # the choices come from the status words and the configured relays, not from the rows
    html = boss.get(LIST).content.decode()
    for word in MessageStatus.ALL:
        assert f"?status={word}" in html
    assert "?relay=default" in html and "?relay=bulk" in html
    assert 'name="tag"' in html


def test_search_by_recipient_address_or_message_id(seeded, boss):
    def subjects(term: str) -> list[str]:
        return _rows(boss.get(LIST, {"q": term}).content.decode())

    assert subjects("cy@example.org") == ["Receipt 42"]
    assert subjects(" bounce-bo@example.org ") == ["Receipt 42"]
    assert subjects("dee@example.org") == ["Newsletter"]
    assert subjects("example.org") == []  # exact addresses only: the index answers
    assert subjects(seeded.bulk) == ["Bulk offer"]
    assert subjects(str(uuid.uuid4())) == []


def test_message_page_shows_each_recipient_and_every_attempt(seeded, boss):
    response = boss.get(page(seeded.bounced))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Receipt 42" in html
    recipients = html.split("id='mq-recipients'", 1)[1].split("</table>", 1)[0]
    rows = re.findall(
        r"<tr><td>([^<]+)</td><td>to</td><td class='mq-status'>(\w+)</td>", recipients
    )
    assert rows == [("bounce-bo@example.org", "failed"), ("cy@example.org", "sent")]
    assert "550" in recipients and "5.1.1" in recipients
    attempts = html.split("id='mq-attempts'", 1)[1].split("</table>", 1)[0]
    assert re.findall(
        r"<td>([^<]+@example.org)</td><td class='mq-status'>(\w+)</td>", attempts
    ) == [
        ("bounce-bo@example.org", "failed"),
        ("cy@example.org", "sent"),
    ]
    assert "Subject: Receipt 42" in html  # the header block
    assert "{&quot;tag&quot;: &quot;receipt&quot;}" in html  # the metadata, as JSON
    assert 'id="mq-retry"' in html and 'id="mq-cancel"' in html
    # read-only: no form fields to edit, no save or delete button
    assert 'name="_save"' not in html and "deletelink" not in html

    queued = boss.get(page(seeded.queued)).content.decode()
    assert "No attempt yet." in queued
    assert boss.get(page("not-a-uuid")).status_code == 302  # "does not exist", not a 500
    assert boss.get(page(str(uuid.uuid4()))).status_code == 302


# -- the actions ------------------------------------------------------------------------


def _action(client: Client, action: str, *ids: str, follow: bool = True):
    return client.post(
        LIST, {"action": action, "_selected_action": list(ids), "index": 0}, follow=follow
    )


def _messages(response) -> list[str]:
    """The notes the admin shows at the top of the page (Django's messages framework)."""
    html = response.content.decode()
    if 'class="messagelist"' not in html:
        return []
    notes = html.split('class="messagelist"', 1)[1].split("</ul>", 1)[0]
    return [unescape(text) for text in re.findall(r"<li[^>]*>([^<]*)</li>", notes)]


def test_retry_action_requeues_failed_recipients_only(seeded, boss, smtp_server):
    response = _action(boss, "retry_failed", seeded.bounced, seeded.sent)
    assert response.status_code == 200
    assert _messages(response) == [
        "Retry: 1 of 2 message(s) requeued; their failed and deferred recipients are pending "
        "again. 1 left as they were: no failed or deferred recipient, or a worker is sending "
        "them right now."
    ]
    assert _status(seeded.stack, seeded.bounced) == (
        "queued",
        {"bounce-bo@example.org": "pending", "cy@example.org": "sent"},
    )
    assert _status(seeded.stack, seeded.sent)[0] == "sent"

    # the relay takes it this time; only the requeued recipient is sent again
    smtp_server.reject.clear()
    smtp_server.messages.clear()
    deliver(seeded.stack, [seeded.bounced])
    assert [m.rcpt_tos for m in smtp_server.messages] == [("bounce-bo@example.org",)]
    assert _status(seeded.stack, seeded.bounced)[0] == "sent"


def test_cancel_action_cancels_what_is_not_sent(seeded, boss):
    response = _action(boss, "cancel_messages", seeded.queued, seeded.bulk, seeded.sent)
    assert _messages(response) == [
        "Cancel: 2 recipient(s) cancelled in 2 of 3 message(s). 1 had nothing left to cancel."
    ]
    assert _status(seeded.stack, seeded.queued) == ("cancelled", {"dee@example.org": "cancelled"})
    assert _status(seeded.stack, seeded.bulk) == ("cancelled", {"eve@example.org": "cancelled"})
    assert _status(seeded.stack, seeded.sent) == ("sent", {"ana@example.org": "sent"})
    again = _action(boss, "cancel_messages", seeded.queued)
    assert _messages(again) == [
        "Cancel: 0 recipient(s) cancelled in 0 of 1 message(s). 1 had nothing left to cancel."
    ]


def test_retry_and_cancel_buttons_on_the_message_page(seeded, boss):
    assert boss.get(page(seeded.bounced, "retry")).status_code == 405  # POST only
    response = boss.post(page(seeded.bounced, "retry"))
    assert response.status_code == 302 and response["Location"] == page(seeded.bounced)
    assert _status(seeded.stack, seeded.bounced)[0] == "queued"
    followed = boss.get(response["Location"])
    assert _messages(followed)[0].startswith("Retry: 1 of 1 message(s) requeued")

    boss.post(page(seeded.bounced, "cancel"))
    assert _status(seeded.stack, seeded.bounced) == (
        "partial",
        {"bounce-bo@example.org": "cancelled", "cy@example.org": "sent"},
    )
    assert boss.post(page(str(uuid.uuid4()), "cancel")).status_code == 302


def test_actions_refuse_more_than_the_limit_and_change_nothing(seeded, boss, monkeypatch):
    from mailqueue.contrib.django_admin import admin as mq_admin

    monkeypatch.setattr(mq_admin, "ACTION_LIMIT", 1)
    response = _action(boss, "cancel_messages", seeded.queued, seeded.bulk)
    (text,) = _messages(response)
    assert text.startswith("Nothing done: more than 1 messages selected.")
    assert "mailqueue retry --failed" in text
    assert _status(seeded.stack, seeded.queued)[0] == "queued"
    assert _status(seeded.stack, seeded.bulk)[0] == "queued"


def test_actions_say_when_the_admin_reads_another_database_than_mailqueue(seeded, boss, django_env):
    """mailqueue on PostgreSQL, the admin pointed at the SQLite database: a row only there."""
    if seeded.stack.name != "postgres":
        pytest.skip("needs mailqueue on one database and the admin on the other")
    from mailqueue.api import insert_prepared, prepare, utcnow

    stray = prepare(
        Message(subject="Only in SQLite", sender="a@example.com", to=["b@example.org"], text="x"),
        relay=None,
        send_at=None,
        idempotency_key=None,
        metadata=None,
        now=utcnow(),
    )
    other = sa.create_engine(django_env.sqlite_url)
    try:
        with other.begin() as conn:
            insert_prepared([stray], conn=conn)
        with override_settings(MAILQUEUE_DJANGO_ADMIN_DATABASE="default"):
            assert _rows(boss.get(LIST).content.decode()) == ["Only in SQLite"]
            notes = _messages(_action(boss, "retry_failed", str(stray.id)))
            assert notes[-1] == (
                "1 message(s) not found by mailqueue, left as they were: deleted since the list "
                "was shown, or this admin reads another database (Django's 'default', "
                "MAILQUEUE_DJANGO_ADMIN_DATABASE) than the one mailqueue writes "
                "(MAILQUEUE_DATABASE_URL); they must be the same."
            )
            notes = _messages(_action(boss, "cancel_messages", str(stray.id)))
            assert notes[0] == "Cancel: 0 recipient(s) cancelled in 0 of 1 message(s)."
            assert notes[-1].startswith("1 message(s) not found by mailqueue")
        with other.connect() as conn:
            status = conn.execute(sa.text("SELECT status FROM mq_message")).scalar_one()
        assert status == "queued"
    finally:
        with other.begin() as conn:
            conn.execute(sa.text("DELETE FROM mq_recipient"))
            conn.execute(sa.text("DELETE FROM mq_message"))
        other.dispose()


# -- read-only and permissions ----------------------------------------------------------


def test_rows_cannot_be_added_changed_or_deleted(seeded, boss):
    assert boss.get(LIST + "add/").status_code == 403
    assert boss.post(LIST + "add/", {"subject": "x"}).status_code == 403
    assert (
        boss.post(page(seeded.queued), {"subject": "changed", "status": "sent"}).status_code == 403
    )
    assert boss.get(page(seeded.queued, "delete")).status_code == 403
    assert boss.post(page(seeded.queued, "delete"), {"post": "yes"}).status_code == 403
    response = _action(boss, "delete_selected", seeded.queued, follow=False)
    assert response.status_code in (200, 302)
    assert _status(seeded.stack, seeded.queued)[0] == "queued"
    assert mailqueue.get_status(seeded.queued).subject == "Newsletter"
    # relay pauses: readable, not writable
    assert boss.get("/admin/mailqueue/relay/").status_code == 200
    assert boss.get("/admin/mailqueue/relay/add/").status_code == 403
    index = boss.get("/admin/").content.decode()
    assert "/admin/mailqueue/message/add/" not in index


def test_viewers_see_the_list_but_cannot_retry_or_cancel(seeded):
    viewer = _user("viewer", perms=("view_message",))
    html = viewer.get(LIST).content.decode()
    assert _rows(html) == ["Bulk offer", "Newsletter", "Receipt 42", "Welcome Ana"]
    assert 'value="retry_failed"' not in html
    assert 'id="mq-retry"' not in viewer.get(page(seeded.bounced)).content.decode()
    assert viewer.post(page(seeded.bounced, "retry")).status_code == 403
    _action(viewer, "retry_failed", seeded.bounced)
    assert _status(seeded.stack, seeded.bounced)[0] == "partial"

    steerer = _user("steerer", perms=("view_message", "steer_message"))
    steerer.post(page(seeded.bounced, "retry"))
    assert _status(seeded.stack, seeded.bounced)[0] == "queued"
    assert Client().get(LIST).status_code == 302  # anonymous: to the login page


# -- scale and databases ----------------------------------------------------------------


def test_the_count_is_capped_and_said_so(seeded, boss, monkeypatch):
    from mailqueue.contrib.django_admin import admin as mq_admin

    monkeypatch.setattr(mq_admin.CappedPaginator, "cap", 2)
    html = boss.get(LIST, {"q": ""}).content.decode()
    assert "more than 2 messages" in html
    html = boss.get(LIST + "?status=partial").content.decode()
    assert "more than" not in html and "1 message" in html
    monkeypatch.setattr(mq_admin.CappedPaginator, "cap", 1)
    html = boss.get(LIST, {"status": "queued", "q": "dee@example.org"}).content.decode()
    assert "more than" not in html  # one match
    html = boss.get(LIST, {"status": "queued"}).content.decode()
    assert "more than 1 messages" in html
    # columns other than created_at do not sort (a sort on subject would read the table),
    # not even when ?o= is typed in
    assert "?o=5" not in html and "?o=1" in html  # (0 is the checkbox)
    with CaptureQueriesContext(connections[seeded.alias]) as queries:
        html = boss.get(LIST, {"o": "5.4"}).content.decode()
    assert _rows(html) == ["Bulk offer", "Newsletter", "Receipt 42", "Welcome Ana"]
    (page_sql,) = [
        q["sql"]
        for q in queries.captured_queries
        if "mq_message" in q["sql"] and "COUNT(" not in q["sql"]
    ]
    order_by = page_sql.split("ORDER BY", 1)[1]
    assert "subject" not in order_by and "mail_from" not in order_by, page_sql


def test_the_admin_database_setting_names_where_the_tables_are(seeded, boss):
    with override_settings(
        MAILQUEUE_DJANGO_DATABASE="nowhere", MAILQUEUE_DJANGO_ADMIN_DATABASE=seeded.alias
    ):
        assert check_database() == []
        assert len(_rows(boss.get(LIST).content.decode())) == 4
    with override_settings(MAILQUEUE_DJANGO_ADMIN_DATABASE="nowhere"):
        (error,) = check_database()
    assert error.id == "mailqueue.E001"
    assert "'nowhere'" in error.msg and "DATABASES" in error.hint


# -- the suppression list (issue #17) ---------------------------------------------------


def test_suppressed_recipients_show_and_filter_and_the_list_is_read_only(seeded, boss):
    with seeded.stack.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM mq_suppression"))
    from mailqueue import api

    api.suppress("Fay@Example.org", reason="unsubscribed", scope="list:news.example.com")
    api.suppress("gus@example.org", reason="bounced", note="hard bounce")
    mid = mailqueue.enqueue(
        Message(subject="Weekly", sender="shop@example.com", to="Fay@example.org", text="hi"),
        list_id="news.example.com",
    )
    deliver(seeded.stack, [mid])
    assert _status(seeded.stack, mid) == ("suppressed", {"Fay@example.org": "suppressed"})

    listed = boss.get(LIST + "?" + urlencode({"status": "suppressed"})).content.decode()
    assert _rows(listed) == ["Weekly"]
    detail = unescape(boss.get(page(mid)).content.decode())
    assert "suppressed: unsubscribed (list:news.example.com)" in detail
    assert "news.example.com" in detail

    entries = boss.get("/admin/mailqueue/suppression/").content.decode()
    assert "Fay@example.org" in entries and "gus@example.org" in entries
    bounced = boss.get("/admin/mailqueue/suppression/?reason=bounced").content.decode()
    assert "gus@example.org" in bounced and "Fay@example.org" not in bounced
    found = boss.get("/admin/mailqueue/suppression/?q=Fay@EXAMPLE.org").content.decode()
    assert "Fay@example.org" in found and "gus@example.org" not in found
    assert boss.get("/admin/mailqueue/suppression/add/").status_code == 403
    with seeded.stack.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM mq_suppression"))
