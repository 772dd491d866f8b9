"""The JSON API and the page's access rules, on both stacks, against real deliveries."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

import mailqueue
from mailqueue import Message
from mailqueue.store.models import MessageRow, RecipientRow
from mailqueue.web.app import create_app
from mailqueue.worker.service import Deliverer

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def deliver(stack, ids) -> None:
    async def go() -> None:
        deliverer = Deliverer(stack.settings, stack.store)
        try:
            await deliverer.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await deliverer.aclose()

    asyncio.run(go())


@pytest.fixture
def client(stack):
    with TestClient(create_app(token=TOKEN)) as c:
        yield c


def test_api_shows_a_refused_recipient_and_retry_then_cancel_change_it(stack, smtp_server, client):
    smtp_server.reject = ["nope@*"]
    mid = mailqueue.enqueue(
        Message(sender="app@example.com", to=["ok@example.com", "nope@example.com"], text="x")
    )
    deliver(stack, [mid])

    body = client.get(f"/api/v1/messages/{mid}", headers=AUTH).json()
    assert body["status"] == "partial"
    by = {r["address"]: r for r in body["recipients"]}
    assert by["ok@example.com"]["status"] == "sent"
    assert by["nope@example.com"]["status"] == "failed"
    assert by["nope@example.com"]["smtp_code"] == 550
    assert "nope@example.com" in by["nope@example.com"]["reply"]
    assert "From: app@example.com" in body["headers"]

    stats = client.get("/api/v1/stats", headers=AUTH).json()
    assert stats["messages"]["partial"] == 1
    assert stats["recipients"] == {
        "pending": 0,
        "sent": 1,
        "deferred": 0,
        "failed": 1,
        "cancelled": 0,
        "suppressed": 0,
        "bounced": 0,
        "complained": 0,
    }

    series = client.get("/api/v1/series?window=1h", headers=AUTH).json()
    assert sum(b["sent"] for b in series["buckets"]) == 1
    assert sum(b["failed"] for b in series["buckets"]) == 1
    assert series["bucket_s"] == 60 and len(series["buckets"]) == 60

    r = client.post(f"/api/v1/messages/{mid}/retry", headers=AUTH, json={})
    assert r.status_code == 200 and r.json() == {"requeued": 1, "status": "queued"}
    by = {x.address: x.status for x in mailqueue.get_status(mid).recipients}
    assert by == {"ok@example.com": "sent", "nope@example.com": "pending"}

    r = client.post(f"/api/v1/messages/{mid}/cancel", headers=AUTH, json={})
    assert r.status_code == 200 and r.json()["status"] == "partial"
    by = {x.address: x.status for x in mailqueue.get_status(mid).recipients}
    assert by == {"ok@example.com": "sent", "nope@example.com": "cancelled"}


def test_api_enqueue_validates_whole_and_writes_nothing_on_error(stack, client):
    r = client.post(
        "/api/v1/messages",
        headers=AUTH,
        json={"sender": "app@example.com", "to": ["not an address"], "text": "x"},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid"
    r = client.post(
        "/api/v1/messages",
        headers=AUTH,
        json={"sender": "app@example.com", "to": "a@example.com", "subject": "a\r\nBcc: x@y.z"},
    )
    assert r.status_code == 400
    r = client.post(
        "/api/v1/messages",
        headers=AUTH,
        json={"sender": "a@x.org", "to": "b@x.org", "text": "x", "relay": "r" * 65},
    )
    assert r.status_code == 400 and r.json()["field"] == "relay"
    r = client.post("/api/v1/messages", headers=AUTH, json={"sender": "a@x.org", "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["detail"]
    with stack.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(MessageRow)).scalar() == 0

    r = client.post(
        "/api/v1/messages",
        headers=AUTH,
        json={
            "sender": "app@example.com",
            "to": ["ana@example.org"],
            "subject": "Hello",
            "text": "hi",
            "metadata": {"tag": "welcome"},
            "attachments": [{"filename": "a.txt", "content_base64": "aGVsbG8="}],
        },
    )
    assert r.status_code == 201
    info = mailqueue.get_status(r.json()["id"])
    assert info.status == "queued" and [x.address for x in info.recipients] == ["ana@example.org"]
    listed = client.get("/api/v1/messages?tag=welcome", headers=AUTH).json()["messages"]
    assert [m["id"] for m in listed] == [info.id]


def test_api_list_filters_and_pages_by_keyset(stack, client):
    ids = []
    for i in range(7):
        ids.append(
            mailqueue.enqueue(
                Message(
                    sender="a@example.com" if i % 2 else "b@example.com",
                    to=[f"r{i}@example.com"],
                    text="t",
                ),
                relay="bulk" if i < 3 else None,
                metadata={"tag": "even" if i % 2 == 0 else "odd"},
            )
        )
    newest_first = list(reversed(ids))

    def listed(query: str) -> list[str]:
        r = client.get(f"/api/v1/messages?{query}", headers=AUTH)
        assert r.status_code == 200, r.text
        return [m["id"] for m in r.json()["messages"]]

    page1 = client.get("/api/v1/messages?limit=3", headers=AUTH).json()
    assert [m["id"] for m in page1["messages"]] == newest_first[:3]
    page2 = listed(f"limit=3&before={page1['next_before']}")
    assert page2 == newest_first[3:6]
    assert listed(f"limit=3&before={page2[-1]}") == newest_first[6:]

    assert listed("sender=a@example.com") == [i for i in newest_first if ids.index(i) % 2]
    assert listed("recipient=r4@example.com") == [ids[4]]
    assert listed("relay=bulk") == list(reversed(ids[:3]))
    assert listed("tag=even&relay=bulk") == [ids[2], ids[0]]
    assert listed("status=queued") == newest_first
    assert listed("status=sent") == []
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
    assert listed(f"since={tomorrow}") == []
    assert listed(f"until={tomorrow}") == newest_first
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert listed(f"until={today}") == newest_first  # a bare date includes that day
    assert listed(f"since={today}&until={today}") == newest_first
    bad = client.get("/api/v1/messages?status=nonsense", headers=AUTH)
    assert bad.status_code == 400
    bad = client.get("/api/v1/series?window=2y", headers=AUTH)
    assert bad.status_code == 400 and bad.json()["field"] == "window"
    assert client.get("/api/v1/messages?since=yesterday", headers=AUTH).status_code == 400


def test_api_refuses_without_the_token_and_unknown_ids(stack, client):
    assert client.get("/api/v1/stats").status_code == 401
    assert client.get("/api/v1/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/api/v1/messages", json={}).status_code == 401
    missing = client.get(f"/api/v1/messages/{uuid.uuid4()}", headers=AUTH)
    assert missing.status_code == 404
    assert client.get("/api/v1/messages/not-an-id", headers=AUTH).status_code == 404
    # a form post (what a cross-site page could send) is refused: POSTs must be JSON
    form = client.post(f"/api/v1/messages/{uuid.uuid4()}/retry", headers=AUTH, data={"a": "b"})
    assert form.status_code == 415
    assert client.get("/healthz").json() == {"ok": True}


def test_page_needs_login_and_csrf_for_actions(stack, smtp_server, client):
    smtp_server.reject = ["nope@*"]
    mid = mailqueue.enqueue(Message(sender="app@example.com", to=["nope@example.com"], text="x"))
    deliver(stack, [mid])

    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    login = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', login.text).group(1)
    assert client.post("/login", data={"token": "wrong", "csrf": csrf}).status_code == 401
    assert client.post("/login", data={"token": TOKEN, "csrf": "forged"}).status_code == 403
    ok = client.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
    assert ok.status_code == 303

    page = client.get(f"/messages/{mid}")
    assert page.status_code == 200 and "550" in page.text and TOKEN not in page.text
    forged = client.post(f"/messages/{mid}/retry", data={"csrf": "forged"})
    assert forged.status_code == 403
    # a login starts with a fresh CSRF token: one known before the login is refused
    assert client.post(f"/messages/{mid}/retry", data={"csrf": csrf}).status_code == 403
    assert mailqueue.get_status(mid).status == "failed"
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    done = client.post(f"/messages/{mid}/retry", data={"csrf": csrf})
    assert done.status_code == 200 and "Requeued for delivery" in done.text
    assert mailqueue.get_status(mid).status == "queued"
    # the notice is a fixed text picked by name: a crafted link cannot put words on the page
    crafted = client.get(f"/messages/{mid}?notice=Send+your+token+to+evil@example.com")
    assert crafted.status_code == 200 and "evil@example.com" not in crafted.text


def test_anonymous_mode_answers_loopback_names_only(sqlite_stack):
    app = create_app(token=None, allow_anonymous=True)
    with TestClient(app, base_url="http://127.0.0.1:8025") as c:
        assert c.get("/api/v1/stats").status_code == 200
        assert c.get("/").status_code == 200
    with TestClient(app, base_url="http://attacker.example") as c:
        assert c.get("/api/v1/stats").status_code == 400
    with pytest.raises(ValueError):
        create_app(token=None)


def test_secrets_never_reach_the_page_or_api(stack, smtp_server):
    stack.reconfigure(relay_url=smtp_server.url.replace("smtp://", "smtp://user:hunter2pw@"))
    mid = mailqueue.enqueue(Message(sender="app@example.com", to=["a@example.com"], text="x"))
    with TestClient(create_app(token=TOKEN)) as c:
        texts = [
            c.get(f"/api/v1/messages/{mid}", headers=AUTH).text,
            c.get("/api/v1/messages", headers=AUTH).text,
            c.get("/", headers=AUTH).text,
            c.get(f"/messages/{mid}", headers=AUTH).text,
        ]
    for text in texts:
        assert "hunter2pw" not in text and TOKEN not in text


def test_series_counts_every_recipient_in_its_bucket(stack, smtp_server, client):
    """Outcomes at different seconds of one hour land in that hour's bucket, summed."""
    smtp_server.reject = ["no*@*"]
    ids = mailqueue.enqueue_many(
        Message(sender="s@example.com", to=[f"ok{i}@example.com"], text="x") for i in range(5)
    )
    ids += mailqueue.enqueue_many(
        Message(sender="s@example.com", to=[f"no{i}@example.com"], text="x") for i in range(2)
    )
    deliver(stack, ids)
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    table = RecipientRow.__table__
    with stack.engine.begin() as conn:
        rows = conn.execute(sa.select(table.c.id, table.c.status).order_by(table.c.id)).all()
        for k, (rid, status) in enumerate(rows):
            when = hour + dt.timedelta(seconds=7 * k + 1)
            values = {"updated_at": when}
            if status == "sent":
                values["sent_at"] = when
            conn.execute(sa.update(table).where(table.c.id == rid).values(**values))

    series = client.get("/api/v1/series?window=24h", headers=AUTH).json()
    assert series["bucket_s"] == 3600 and len(series["buckets"]) == 24
    busy = [b for b in series["buckets"] if b["sent"] or b["failed"]]
    assert busy == [
        {"t": hour.isoformat(), "sent": 5, "failed": 2, "failure_rate": round(2 / 7, 4)}
    ]
    assert series["buckets"][-1]["t"] == hour.isoformat()  # the newest bucket is this hour


def test_message_page_and_api_show_every_attempt(stack, smtp_server, client):
    smtp_server.defer = ["later@*"]
    mid = mailqueue.enqueue(Message(sender="app@example.com", to=["later@example.com"], text="x"))
    deliver(stack, [mid])
    smtp_server.defer = []
    table = MessageRow.__table__
    with stack.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(table.c.id == uuid.UUID(str(mid)))
            .values(next_attempt_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    deliver(stack, [mid])

    history = client.get(f"/api/v1/messages/{mid}", headers=AUTH).json()["history"]
    assert [(h["address"], h["status"], h["smtp_code"]) for h in history] == [
        ("later@example.com", "deferred", 450),
        ("later@example.com", "sent", 250),
    ]
    assert "try again later" in history[0]["reply"]

    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
    page = client.get(f"/messages/{mid}").text
    section = page[page.index('id="history"') :]
    assert section.count('data-address="later@example.com"') == 2
    assert "450" in section and "250" in section
