"""The web app's input boundary and its guards (issue #15, items 6, 7, 10 and 11's web part).

Judged by what a client sees: status codes, JSON errors naming the field,
cookies, headers, and the rows that were (not) written. Time is a clock the
test moves, never a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import mailqueue
from mailqueue.store.models import MessageRow
from mailqueue.web import payload
from mailqueue.web.app import CSRF_COOKIE, SESSION_COOKIE, create_app
from mailqueue.web.security import CONTENT_SECURITY_POLICY, client_key

TOKEN = "web-security-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = {"sender": "app@example.com", "to": ["ana@example.org"], "subject": "Hi", "text": "x"}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(stack) -> Iterator[TestClient]:
    with TestClient(create_app(token=TOKEN)) as c:
        yield c


def count_messages(stack) -> int:
    with stack.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(MessageRow)).scalar()


def csrf_of(response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', response.text).group(1)


def login(c: TestClient, token: str = TOKEN):
    csrf = csrf_of(c.get("/login"))
    return c.post("/login", data={"token": token, "csrf": csrf}, follow_redirects=False)


# -- item 6: the body is bounded before it is read ---------------------------------------------


def call_asgi(
    app, method: str, path: str, headers: dict[str, str], chunks
) -> tuple[int, dict, bytes, int]:
    """Drive the ASGI app directly: ``chunks`` is pulled only as the app asks for it.

    Returns the status, headers, body and how many request bytes the app pulled.
    """
    pulled = 0
    out: dict[str, Any] = {"body": b""}
    chunks = iter(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return out["status"], out["headers"], out["body"], pulled


def test_a_declared_length_over_the_limit_is_refused_before_one_byte_is_read(sqlite_stack):
    sqlite_stack.reconfigure(api_max_body=1024 * 1024)
    app = create_app(token=TOKEN)
    headers = {**AUTH, "content-type": "application/json", "content-length": str(80_000_000)}
    chunk = b" " * (1024 * 1024)
    status, _h, body, pulled = call_asgi(app, "POST", "/api/v1/messages", headers, [chunk] * 80)
    assert status == 413
    answer = json.loads(body)
    assert answer["error"] == "too_large" and answer["field"] == "body"
    assert "1048576 bytes" in answer["detail"] and "MAILQUEUE_API_MAX_BODY" in answer["detail"]
    assert pulled == 0
    # the other POST endpoints never read a body, but refuse a declared huge one all the same
    status, _h, _b, pulled = call_asgi(
        app, "POST", "/api/v1/messages/0190d2a8-0000-7000-8000-000000000000/retry", headers, []
    )
    assert status == 413 and pulled == 0


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit(sqlite_stack):
    limit = 1024 * 1024
    sqlite_stack.reconfigure(api_max_body=limit)
    app = create_app(token=TOKEN)
    headers = {**AUTH, "content-type": "application/json", "transfer-encoding": "chunked"}
    chunk = b" " * (64 * 1024)
    status, _h, body, pulled = call_asgi(
        app, "POST", "/api/v1/messages", headers, [chunk] * (80 * 16)
    )  # 80 MiB offered
    assert status == 413 and json.loads(body)["field"] == "body"
    assert pulled <= limit + len(chunk)
    assert count_messages(sqlite_stack) == 0


def test_the_login_form_anyone_can_post_to_is_bounded_too(sqlite_stack):
    """/login needs no token: its form is read only up to 64 KiB."""
    app = create_app(token=TOKEN)
    form = {"content-type": "application/x-www-form-urlencoded"}
    status, _h, body, pulled = call_asgi(
        app, "POST", "/login", {**form, "content-length": "80000000"}, [b"a" * 65536] * 10
    )
    assert status == 413 and pulled == 0 and b"over the limit" in body
    status, _h, _b, pulled = call_asgi(
        app, "POST", "/login", {**form, "transfer-encoding": "chunked"}, [b"a" * 4096] * 1000
    )
    assert status == 413 and pulled <= payload.FORM_MAX_BODY + 4096


def test_a_body_of_exactly_the_limit_is_read(sqlite_stack):
    raw = json.dumps(GOOD).encode()
    sqlite_stack.reconfigure(api_max_body=len(raw))
    with TestClient(create_app(token=TOKEN)) as c:
        ok = c.post(
            "/api/v1/messages", headers={**AUTH, "content-type": "application/json"}, content=raw
        )
        assert ok.status_code == 201, ok.text
        over = c.post(
            "/api/v1/messages",
            headers={**AUTH, "content-type": "application/json"},
            content=raw + b" ",
        )
        assert over.status_code == 413


def test_the_default_body_limit_follows_the_message_limit():
    from mailqueue.config import Settings, settings_from_env

    default = Settings()
    assert default.api_body_limit == default.max_message_size * 3 // 2 + 64 * 1024
    assert Settings(max_message_size=100 * 1024 * 1024).api_body_limit > 150 * 1024 * 1024
    env = settings_from_env({"MAILQUEUE_API_MAX_BODY": "2048", "MAILQUEUE_API_MAX_DEPTH": "8"})
    assert env.api_body_limit == 2048 and env.api_max_depth == 8
    with pytest.raises(ValueError, match="MAILQUEUE_API_MAX_DEPTH"):
        Settings(api_max_depth=2)


@pytest.fixture
def live_server(sqlite_stack) -> Iterator[tuple[str, int]]:
    """The app under a real uvicorn on a free loopback port."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(token=TOKEN), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "web server did not start"
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(10)


def test_on_the_wire_a_huge_declared_body_gets_413_without_sending_it(live_server):
    """Only the headers are sent: the answer comes without waiting for 80 MB."""
    with socket.create_connection(live_server, timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 80000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, "the server closed the connection without answering"
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 ")


# -- item 6: JSON nesting and what strict JSON excludes ----------------------------------------


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def post_raw(c: TestClient, raw: bytes | str):
    return c.post(
        "/api/v1/messages", headers={**AUTH, "content-type": "application/json"}, content=raw
    )


def test_json_nesting_is_capped_and_never_a_recursion_error(stack, client):
    # depth counts the body object: {"metadata": <30 objects>} is 31 deep, fine at 32
    ok = client.post("/api/v1/messages", headers=AUTH, json={**GOOD, "metadata": nested(30)})
    assert ok.status_code == 201, ok.text
    too_deep = client.post("/api/v1/messages", headers=AUTH, json={**GOOD, "metadata": nested(32)})
    assert too_deep.status_code == 400
    assert too_deep.json()["field"] == "body" and "32" in too_deep.json()["detail"]
    for raw in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        r = post_raw(client, raw)
        assert r.status_code == 400 and r.json()["field"] == "body", r.text
    assert count_messages(stack) == 1


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (b'{"sender": "a@x.org", "to": "b@x.org", "metadata": {"n": NaN}}', "body", "NaN"),
        (b'{"sender": "a@x.org", "to": "b@x.org", "metadata": {"n": -Infinity}}', "body", "Inf"),
        (b'{"to": "b@x.org", "to": "evil@x.org", "sender": "a@x.org"}', "body", "twice"),
        (b'{"sender": "a@x.org", "to": "b@x.org", "subject": "\\ud800"}', "subject", "surrogate"),
        (
            b'{"sender": "a@x.org", "to": "b@x.org", "metadata": {"k": "a\\u0000"}}',
            "metadata",
            "NUL",
        ),
        (
            b'{"sender": "a@x.org", "to": "b@x.org", "idempotency_key": "k\\u0000"}',
            "idempotency_key",
            "NUL",
        ),
        (b'{"sender": "a@x.org", "to": "b@x.org", "text": "a\\u0000b"}', "text", "NUL"),
        (b'{"": {"\\u0000": 1}}', "body", "NUL"),
        (b'{"\\u0000": 1}', "body", "NUL"),
        (b"\xff\xfe{}", "body", "UTF-8"),
        (b'{"sender": ', "body", "not valid JSON"),
        (b"", "body", "not valid JSON"),
    ],
)
def test_what_strict_json_refuses(stack, client, raw, field, words):
    r = post_raw(client, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid" and r.json()["field"] == field
    assert words in r.json()["detail"]
    assert count_messages(stack) == 0


# -- item 7: every field is type-checked -----------------------------------------------------

BAD_FIELDS = [
    ({"send_at": 5}, "send_at"),
    ({"send_at": "next tuesday"}, "send_at"),
    ({"send_at": ["2030-01-01"]}, "send_at"),
    ({"send_at": "9999-12-31T23:00:00+00:00"}, "send_at"),
    ({"send_at": "0001-01-01T00:00:00+14:00"}, "send_at"),
    ({"to": 5}, "to"),
    ({"to": [1, 2]}, "to"),
    ({"to": {"a": "b@x.org"}}, "to"),
    ({"cc": True}, "cc"),
    ({"bcc": [None]}, "bcc"),
    ({"reply_to": 1.5}, "reply_to"),
    ({"sender": ["a@x.org"]}, "sender"),
    ({"subject": 5}, "subject"),
    ({"text": ["x"]}, "text"),
    ({"html": {"x": 1}}, "html"),
    ({"headers": [1, 2]}, "headers"),
    ({"headers": "X-A: b"}, "headers"),
    ({"headers": 0}, "headers"),
    ({"headers": {"X-A": 5}}, "headers"),
    ({"headers": {"X-A": ["b"]}}, "headers"),
    ({"attachments": {"filename": "a"}}, "attachments"),
    ({"attachments": 5}, "attachments"),
    ({"attachments": "abc"}, "attachments"),
    ({"attachments": [5]}, "attachments"),
    ({"attachments": [{"filename": 5, "content_base64": ""}]}, "attachments"),
    ({"attachments": [{"content_base64": "aGk="}]}, "attachments"),
    ({"attachments": [{"filename": "a", "content_base64": 5}]}, "attachments"),
    ({"attachments": [{"filename": "a", "content_base64": None}]}, "attachments"),
    ({"attachments": [{"filename": "a", "content_base64": "!!"}]}, "attachments"),
    ({"attachments": [{"filename": "a", "content_base64": "", "content_type": 5}]}, "attachments"),
    ({"attachments": [{"filename": "a", "content_base64": "", "inline": True}]}, "attachments"),
    ({"metadata": []}, "metadata"),
    ({"metadata": "tag=x"}, "metadata"),
    ({"metadata": {"tag": 5}}, "metadata"),
    ({"metadata": {"tag": "x" * 256}}, "metadata"),
    ({"metadata": {"blob": "x" * (70 * 1024)}}, "metadata"),
    ({"relay": 5}, "relay"),
    ({"relay": "bulk\n"}, "relay"),
    ({"relay": "no-such-relay"}, "relay"),
    ({"idempotency_key": 5}, "idempotency_key"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"idempotency_key": "k" * 256}, "idempotency_key"),
    ({"idempotency_key": "a\nb"}, "idempotency_key"),
    ({"bogus": 1}, "body"),
]


@pytest.mark.parametrize(("patch", "field"), BAD_FIELDS, ids=[repr(p)[:60] for p, _ in BAD_FIELDS])
def test_a_bad_field_is_a_400_naming_it_and_writes_nothing(stack, client, patch, field):
    r = client.post("/api/v1/messages", headers=AUTH, json={**GOOD, **patch})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "invalid" and body["field"] == field, body
    assert body["detail"]
    assert count_messages(stack) == 0


@pytest.mark.parametrize("body", [[GOOD], "x", 5, None, True])
def test_a_body_that_is_not_an_object_is_a_400(stack, client, body):
    r = post_raw(client, json.dumps(body))
    assert r.status_code == 400 and r.json()["field"] == "body"
    assert "JSON object" in r.json()["detail"]


def test_null_is_the_same_as_absent_and_a_full_message_is_queued(stack, client):
    nulls = dict.fromkeys(payload.ENQUEUE_FIELDS)
    r = client.post("/api/v1/messages", headers=AUTH, json={**nulls, **GOOD})
    assert r.status_code == 201, r.text
    r = client.post(
        "/api/v1/messages",
        headers=AUTH,
        json={
            **GOOD,
            "cc": "cc@example.org",
            "headers": {"X-Campaign": "spring"},
            "attachments": [
                {
                    "filename": "a.txt",
                    "content_base64": base64.b64encode(b"hello").decode(),
                    "content_type": "text/plain",
                }
            ],
            "send_at": "2030-01-01T10:00:00+02:00",
            "metadata": {"tag": "welcome", "n": [1, {"deep": True}]},
            "idempotency_key": "order-1",
        },
    )
    assert r.status_code == 201, r.text
    info = mailqueue.get_status(r.json()["id"])
    assert sorted(x.address for x in info.recipients) == ["ana@example.org", "cc@example.org"]
    assert info.next_attempt_at.isoformat().startswith("2030-01-01T08:00:00")


def test_bad_list_filters_are_400_not_database_errors(stack, client):
    for query, field in [
        ("sender=%00", "sender"),
        ("recipient=a%00b", "recipient"),
        ("tag=%00", "tag"),
        ("before=%00", "before"),
        ("since=0001-01-01T00:00:00%2B14:00", "since"),
        ("limit=" + "9" * 5000, "limit"),
    ]:
        r = client.get(f"/api/v1/messages?{query}", headers=AUTH)
        assert r.status_code == 400, (query, r.text)
        assert r.json()["field"] == field


# -- item 7: hypothesis throws JSON at the endpoint ----------------------------------------------
#
# Random JSON, addresses and texts: whatever it is, a 201 or a 4xx naming a field.


_LINE_BREAKS = "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_address = st.sampled_from(
    [
        "ana@example.org",
        "Bob <bob@example.org>",
        "@example.org",
        "a@b",
        " ",
        "x@y.z, evil@attacker.test",
        '"evil@attacker.test, Someone" <ana@example.org>',
        "ana@ex\u00e4mple.org",
        "\u00e4na@example.org",
        "<>",
        "a" * 300 + "@example.org",
    ]
) | st.text(max_size=40)
_plausible = {
    "sender": _address,
    "to": _address | st.lists(_address, max_size=3),
    "cc": st.lists(_address, max_size=2),
    "bcc": _address,
    "reply_to": st.lists(_address, max_size=2),
    "subject": st.text(max_size=60)
    | st.sampled_from(["=?utf-8?q?x=0D=0ABcc:_evil@attacker.test?=", "a\r\nBcc: e@x.org"]),
    "text": st.text(max_size=60),
    "html": st.text(max_size=60),
    "headers": st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["X-Tag", "X-Tag\n", "Bcc", "From", "Subject"]),
        st.text(max_size=30),
        max_size=3,
    ),
    "attachments": st.lists(
        st.fixed_dictionaries(
            {
                "filename": st.text(max_size=20),
                "content_base64": st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode())
                | st.text(max_size=10),
            },
            optional={
                "content_type": st.text(
                    st.characters(blacklist_characters=_LINE_BREAKS), max_size=30
                )
                | st.sampled_from(["text/plain", "a/b/c", "x", 'text/plain; charset="x"'])
            },
        ),
        max_size=2,
    ),
    "relay": st.text(max_size=10) | st.sampled_from(["default", "bulk", "r" * 64]),
    "send_at": st.datetimes().map(lambda d: d.isoformat()) | st.text(max_size=25),
    "idempotency_key": st.text(max_size=20),
    "metadata": st.dictionaries(st.sampled_from(["tag", "k", ""]), _json, max_size=3),
}
_any_field = st.sampled_from(sorted(_plausible)).flatmap(
    lambda name: st.tuples(st.just(name), _plausible[name] | _json)
)
_bodies = (
    # a good message with one or two fields replaced, so no other field's error masks it
    st.lists(_any_field, min_size=1, max_size=2).map(lambda pairs: {**GOOD, **dict(pairs)})
    | st.fixed_dictionaries(
        {}, optional={name: strategy | _json for name, strategy in _plausible.items()}
    )
    | _json
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_bodies)
def test_random_json_is_never_a_server_error(stack, client, body):
    """Whatever JSON arrives: 201 or a JSON 4xx that names a field; the app never raises."""
    r = post_raw(client, json.dumps(body))
    assert r.status_code in (201, 400, 413), r.text
    answer = r.json()
    if r.status_code != 201:
        assert answer["field"] and answer["detail"], answer


HOSTILE = [
    pytest.param(
        {"to": "ana@example.org, evil@attacker.test"},
        "to",
        id="two-in-one-to",
    ),
    pytest.param(
        {"bcc": ["ana@example.org, evil@attacker.test"]},
        "bcc",
        id="two-in-one-bcc",
    ),
    pytest.param(
        {"headers": {"X-Tag\n": "a"}},
        "headers",
        id="header-name-newline",
    ),
    pytest.param({"headers": {"X-Tag": "a\r\nBcc: evil@attacker.test"}}, "headers", id="crlf"),
    pytest.param({"subject": "a\nBcc: evil@attacker.test"}, "subject", id="subject-lf"),
    pytest.param({"text": "a\u0000"}, "text", id="text-nul"),
    pytest.param(
        {"attachments": [{"filename": "a\r\nX: y", "content_base64": ""}]},
        "attachments",
        id="filename-crlf",
    ),
    pytest.param({"sender": ""}, "sender", id="e"),
    pytest.param({"to": "to@"}, "to", id="to@"),
    pytest.param({"cc": ["a@"]}, "cc", id="cc"),
    pytest.param(
        {"sender": "=?utf-8?q?x=0D=0ABcc:_evil@attacker.test?= <ana@example.org>"},
        "sender",
        id="encoded-crlf-display-name",
    ),
    pytest.param(
        {"attachments": [{"filename": "a", "content_base64": "", "content_type": "text/p\nlain"}]},
        "attachments",
        id="content-type-lf",
    ),
]


@pytest.mark.parametrize(("patch", "field"), HOSTILE)
def test_hostile_message_values_are_a_400_naming_the_field(stack, client, patch, field):
    r = client.post("/api/v1/messages", headers=AUTH, json={**GOOD, **patch})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert count_messages(stack) == 0


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    params=st.dictionaries(
        st.sampled_from(
            ["status", "sender", "recipient", "relay", "tag", "since", "until", "before", "limit"]
        ),
        st.text(max_size=20),
        max_size=4,
    )
)
def test_random_list_filters_are_never_a_server_error(stack, client, params):
    r = client.get("/api/v1/messages", headers=AUTH, params=params)
    assert r.status_code in (200, 400, 404), r.text  # 404: ``before`` names no message
    assert r.json()
    r = client.get("/", headers=AUTH, params=params)
    assert r.status_code in (200, 400, 404), r.text


# -- item 10: sessions -------------------------------------------------------------------------


def test_each_login_gets_a_new_random_session_that_logout_ends(sqlite_stack):
    app = create_app(token=TOKEN)
    with TestClient(app) as first, TestClient(app) as second:
        assert login(first).status_code == 303
        assert login(second).status_code == 303
        one, two = first.cookies[SESSION_COOKIE], second.cookies[SESSION_COOKIE]
        assert one != two and TOKEN not in one and len(one) >= 40
        assert login(first).status_code == 303
        assert first.cookies[SESSION_COOKIE] not in (one, two)  # again a new one
        kept = first.cookies[SESSION_COOKIE]
        assert first.get("/", follow_redirects=False).status_code == 200

        page = first.get("/")
        bye = first.post("/logout", data={"csrf": csrf_of(page)}, follow_redirects=False)
        assert bye.status_code == 303 and bye.headers["location"] == "/login"
        assert SESSION_COOKIE not in first.cookies

    # someone who copied the cookie before the logout gets nothing with it
    with TestClient(app, cookies={SESSION_COOKIE: kept}) as thief:
        r = thief.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    # the other browser's session is untouched
    with TestClient(app, cookies={SESSION_COOKIE: two}) as other:
        assert other.get("/", follow_redirects=False).status_code == 200


def test_logout_needs_the_csrf_token(sqlite_stack):
    with TestClient(create_app(token=TOKEN)) as c:
        login(c)
        session = c.cookies[SESSION_COOKIE]
        forged = c.post("/logout", data={"csrf": "forged"}, follow_redirects=False)
        assert forged.status_code == 403
        assert c.post("/logout", follow_redirects=False).status_code == 403
        assert c.get("/logout").status_code == 405
        assert c.cookies[SESSION_COOKIE] == session
        assert c.get("/", follow_redirects=False).status_code == 200  # still logged in


def test_a_session_expires_after_its_lifetime(sqlite_stack):
    sqlite_stack.reconfigure(web_session_s=3600.0)
    clock = Clock()
    with TestClient(create_app(token=TOKEN, clock=clock)) as c:
        r = login(c)
        assert "max-age=3600" in r.headers["set-cookie"].lower()
        clock.now += 3599
        assert c.get("/", follow_redirects=False).status_code == 200
        clock.now += 1
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_cookies_are_httponly_strict_and_secure_over_https(sqlite_stack):
    app = create_app(token=TOKEN)
    with TestClient(app, base_url="https://mail.example.com") as c:
        r = login(c)
        cookies = [v.lower() for k, v in r.headers.multi_items() if k == "set-cookie"]
        session = next(v for v in cookies if v.startswith(SESSION_COOKIE))
        assert "httponly" in session and "samesite=strict" in session and "secure" in session
        assert any(v.startswith(CSRF_COOKIE) and "secure" in v for v in cookies)
    with TestClient(app) as c:
        r = login(c)
        session = next(
            v.lower()
            for k, v in r.headers.multi_items()
            if k == "set-cookie" and SESSION_COOKIE in v
        )
        assert "httponly" in session and "secure" not in session  # plain http on loopback


def test_login_redirects_only_to_this_site(sqlite_stack):
    with TestClient(create_app(token=TOKEN)) as c:
        for nxt, expected in [
            ("/messages", "/messages"),
            ("//evil.example", "/"),
            ("/\\evil.example", "/"),
            ("https://evil.example", "/"),
        ]:
            csrf = csrf_of(c.get("/login"))
            r = c.post(
                "/login",
                params={"next": nxt},
                data={"token": TOKEN, "csrf": csrf},
                follow_redirects=False,
            )
            assert r.status_code == 303 and r.headers["location"] == expected


# -- item 10: failed attempts ------------------------------------------------------------------


def test_wrong_logins_are_limited_per_address_with_retry_after(sqlite_stack):
    sqlite_stack.reconfigure(web_auth_failures_per_min=3)
    clock = Clock()
    app = create_app(token=TOKEN, clock=clock)
    with TestClient(app, client=("203.0.113.7", 5000)) as c:
        for _ in range(3):
            assert login(c, "guess").status_code == 401
            clock.now += 1
        limited = login(c, "guess")
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert "try again in" in limited.text and TOKEN not in limited.text
        # while limited, even the right token is not looked at
        assert login(c).status_code == 429
        # another address is not affected
        with TestClient(app, client=("198.51.100.9", 5000)) as other:
            assert login(other).status_code == 303
        clock.now += 60
        assert login(c).status_code == 303


def test_wrong_bearer_tokens_are_limited_per_address(sqlite_stack):
    sqlite_stack.reconfigure(web_auth_failures_per_min=5)
    clock = Clock()
    app = create_app(token=TOKEN, clock=clock)
    wrong = {"Authorization": "Bearer not-the-token"}
    with TestClient(app, client=("2001:db8:1:2::10", 5000)) as c:
        for _ in range(5):
            assert c.get("/api/v1/stats", headers=wrong).status_code == 401
        r = c.get("/api/v1/stats", headers=wrong)
        assert r.status_code == 429 and r.json()["error"] == "too_many_attempts"
        assert int(r.headers["retry-after"]) == 60
        assert TOKEN not in r.text
        assert c.get("/api/v1/stats", headers=AUTH).status_code == 429
        assert c.post("/api/v1/messages", headers=AUTH, json=GOOD).status_code == 429
        # no Authorization at all is not a guess: a plain 401
        assert c.get("/api/v1/stats").status_code == 401
    # the same /64 shares the budget; the next /64 has its own
    with TestClient(app, client=("2001:db8:1:2::99", 5000)) as same_net:
        assert same_net.get("/api/v1/stats", headers=AUTH).status_code == 429
    with TestClient(app, client=("2001:db8:1:3::10", 5000)) as next_net:
        assert next_net.get("/api/v1/stats", headers=AUTH).status_code == 200
    clock.now += 30
    with TestClient(app, client=("2001:db8:1:2::10", 5000)) as c:
        r = c.get("/api/v1/stats", headers=AUTH)
        assert r.status_code == 429 and int(r.headers["retry-after"]) == 30
        clock.now += 30
        assert c.get("/api/v1/stats", headers=AUTH).status_code == 200


def test_client_key_groups_ipv6_by_64_and_unwraps_mapped_ipv4():
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2::10") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:2::10") != client_key("2001:db8:1:3::10")
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key(None) == "unknown"


# -- item 10: headers on every response -------------------------------------------------------


def test_every_response_carries_the_security_headers(stack, monkeypatch):
    app = create_app(token=TOKEN)
    with TestClient(app, raise_server_exceptions=False) as c:
        responses = {
            "login page": c.get("/login"),
            "redirect": c.get("/", follow_redirects=False),
            "api 401": c.get("/api/v1/stats"),
            "api 200": c.get("/api/v1/stats", headers=AUTH),
            "api 400": c.post("/api/v1/messages", headers=AUTH, json={"to": 5}),
            "no route": c.get("/nowhere"),
            "stylesheet": c.get("/static/mailqueue.css"),
        }
        login(c)
        responses["status page"] = c.get("/")

        def broken() -> None:
            raise RuntimeError("the database went away")

        monkeypatch.setattr(mailqueue.api, "stats", broken)
        responses["server error"] = c.get("/api/v1/stats", headers=AUTH)
    assert responses["server error"].status_code == 500
    for what, r in responses.items():
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, what
        assert r.headers["x-frame-options"] == "DENY", what
        assert r.headers["x-content-type-options"] == "nosniff", what
        assert r.headers["referrer-policy"] == "same-origin", what
    csp = CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp and "script-src" not in csp


def test_pages_need_nothing_the_csp_forbids(stack, smtp_server):
    """No inline script, style or handler anywhere: the CSP can stay strict."""
    mid = mailqueue.enqueue(
        mailqueue.Message(sender="app@example.com", to=["a@example.org"], text="x"),
        metadata={"tag": "t"},
    )
    with TestClient(create_app(token=TOKEN)) as c:
        pages = [c.get("/login").text]
        login(c, "wrong")
        pages.append(c.get("/login").text)
        login(c)
        pages += [c.get("/").text, c.get(f"/messages/{mid}").text, c.get("/messages/nope").text]
        css = c.get("/static/mailqueue.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for html in pages:
        assert '<link rel="stylesheet" href="/static/mailqueue.css">' in html
        assert not re.search(r"<script|<style|\sstyle=|\son[a-z]+=|javascript:", html, re.I)
