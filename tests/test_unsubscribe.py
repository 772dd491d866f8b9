"""One-click unsubscribe (RFC 8058): per-recipient List-Unsubscribe, and the web's /u/<token>.

Messages go through the worker's own code (``Deliverer.deliver_batch``), and
once through a real ``mailqueue worker``, to the dev SMTP server; the URL is
taken from what the server received and posted to the web app (Starlette's
TestClient), whose suppression the next message then meets.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import mailqueue
from mailqueue import Message
from mailqueue.config import ConfigError, Settings, settings_from_env
from mailqueue.errors import InvalidMessageError
from mailqueue.unsubscribe import Signer
from mailqueue.web.app import create_app

from .conftest import wait_until
from .test_django import dj, django_env  # noqa: F401 - the fixtures, shared
from .test_dkim import (
    deliver,
    dkim_env,
    keys,  # noqa: F401 - the fixture, shared
    signatures,
    verify_each,
    with_dkim,
)

SECRET = "s3cret-for-tests-" + "x" * 20
OLD_SECRET = "an-older-secret-" + "y" * 20
URL = "https://mail.example.com"
WEB_TOKEN = "web-token-for-tests"
LIST = "news.example.com"

CALLS: list[object] = []


def record_hook(found: object) -> None:
    """The MAILQUEUE_ON_UNSUBSCRIBE of these tests."""
    CALLS.append(found)


def failing_hook(found: object) -> None:
    raise RuntimeError("the app's preference store is down")


def unsubscribe_env(**extra: str) -> dict[str, str]:
    return {
        "MAILQUEUE_UNSUBSCRIBE_URL": URL,
        "MAILQUEUE_UNSUBSCRIBE_SECRET": SECRET,
        **extra,
    }


def with_unsubscribe(stack, **overrides: object) -> Settings:
    return stack.reconfigure(unsubscribe_url=URL, unsubscribe_secret=SECRET, **overrides)


def news(**kw: object) -> Message:
    fields: dict[str, object] = dict(
        sender="News <news@example.com>",
        to=["ann@example.org", "bob@example.org"],
        cc=["cat@example.org"],
        bcc=["dan@example.org"],
        subject="This week",
        text="Hello.\n",
    )
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


def parsed(data: bytes):
    return message_from_bytes(data, policy=default_policy)


def one_click_url(data: bytes) -> str:
    value = parsed(data)["List-Unsubscribe"]
    match = re.search(r"<(https://[^>]+)>", str(value))
    assert match, value
    return match.group(1)


def path_of(url: str) -> str:
    assert url.startswith(URL + "/u/")
    return url[len(URL) :]


@pytest.fixture
def web(sqlite_stack):
    with TestClient(create_app(token=WEB_TOKEN), base_url=URL) as client:
        yield client


# -- the token ------------------------------------------------------------------------------


def test_a_token_names_its_address_and_list_and_nothing_else_verifies():
    signer = Signer([SECRET])
    mid = uuid.uuid4()
    token = signer.token("ann@example.org", LIST, mid)
    found = signer.verify(token)
    assert (found.address, found.list_id, found.message_id) == ("ann@example.org", LIST, mid)
    # one character changed anywhere: refused
    for i, ch in enumerate(token):
        altered = token[:i] + ("A" if ch != "A" else "B") + token[i + 1 :]
        assert signer.verify(altered) is None, i
    # another address's payload under this token's MAC: refused
    other = signer.token("bob@example.org", LIST, mid)
    spliced = ".".join([*other.split(".")[:2], token.split(".")[2]])
    assert signer.verify(spliced) is None
    assert signer.verify(token[:-1]) is None
    assert signer.verify("") is None
    assert signer.verify("1..") is None
    # another secret's token: refused
    assert Signer(["some-other-secret-zzzzzzzz"]).verify(token) is None


def test_secrets_rotate_first_signs_all_verify():
    old = Signer([OLD_SECRET]).token("ann@example.org", None, None)
    rotated = Signer([SECRET, OLD_SECRET])
    assert rotated.verify(old).address == "ann@example.org"
    assert rotated.verify(old).list_id is None
    new = rotated.token("ann@example.org", None, None)
    assert Signer([SECRET]).verify(new) is not None
    assert Signer([OLD_SECRET]).verify(new) is None


def test_settings_refuse_a_weak_secret_or_plain_http_and_never_show_the_secret():
    with pytest.raises(ConfigError, match="MAILQUEUE_UNSUBSCRIBE_SECRET: secret number 2 of 2"):
        settings_from_env({"MAILQUEUE_UNSUBSCRIBE_SECRET": f"{SECRET},short"})
    try:
        settings_from_env({"MAILQUEUE_UNSUBSCRIBE_SECRET": f"{SECRET},short"})
    except ConfigError as exc:
        assert SECRET not in str(exc) and "short" not in str(exc).split(";")[0][-8:]
    with pytest.raises(ConfigError, match="https://"):
        settings_from_env({"MAILQUEUE_UNSUBSCRIBE_URL": "http://mail.example.com"})
    with pytest.raises(ConfigError, match="MAILQUEUE_UNSUBSCRIBE_MAILTO"):
        settings_from_env({"MAILQUEUE_UNSUBSCRIBE_MAILTO": "a@b.com, c@d.com"})
    ok = settings_from_env(unsubscribe_env(MAILQUEUE_UNSUBSCRIBE_URL="http://localhost:8025"))
    assert SECRET not in repr(ok)
    assert ok.unsubscribe_url == "http://localhost:8025"


# -- what the relay receives -------------------------------------------------------------


@pytest.mark.both_paths
def test_each_recipient_gets_its_own_signed_link_and_headers(
    stack,
    smtp_server,
    keys,  # noqa: F811 - the fixture
    tmp_path,
):
    settings = with_dkim(stack, keys, tmp_path)
    settings = with_unsubscribe(stack, unsubscribe_mailto="leave@example.com")
    mid = mailqueue.enqueue(news(), list_id=LIST, unsubscribe=True)

    deliver(settings, stack.store, [mid])

    info = mailqueue.get_status(mid)
    assert info.status == "sent"
    received = {m.rcpt_tos: m.data for m in smtp_server.messages}
    everyone = ["ann@example.org", "bob@example.org", "cat@example.org", "dan@example.org"]
    assert sorted(received) == [(a,) for a in everyone]  # one transaction per recipient
    signer = Signer([SECRET])
    for (address,), data in received.items():
        msg = parsed(data)
        token = path_of(one_click_url(data)).removeprefix("/u/")
        found = signer.verify(token)
        assert (found.address, found.list_id, str(found.message_id)) == (address, LIST, mid)
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert f"<mailto:leave@example.com?subject=unsubscribe%20{token}>" in str(
            msg["List-Unsubscribe"]
        )
        assert msg["List-Id"] == f"<{LIST}>"
        # the headers the caller wrote, unchanged; Bcc in none of them
        assert msg["To"] == "ann@example.org, bob@example.org"
        assert msg["Cc"] == "cat@example.org"
        assert "dan@example.org" not in data.decode().split("\r\n\r\n")[0].replace(token, "")
        assert msg.get_all("List-Unsubscribe") and len(msg.get_all("List-Unsubscribe")) == 1
        # DKIM covers the pair, and verifies
        assert verify_each(data, keys.dns()) == [True, True]
        signed = re.sub(rb"\s+", b"", signatures(data)[0][b"h"]).lower().split(b":")
        assert {b"list-unsubscribe", b"list-unsubscribe-post", b"list-id"} <= set(signed)
    tokens = {path_of(one_click_url(d)) for d in received.values()}
    assert len(tokens) == 4


def test_plain_and_list_messages_without_unsubscribe_stay_one_transaction(
    sqlite_stack, smtp_server
):
    settings = with_unsubscribe(sqlite_stack)
    plain = mailqueue.enqueue(news())
    listed = mailqueue.enqueue(news(subject="listed"), list_id=LIST)

    deliver(settings, sqlite_stack.store, [plain, listed])

    by_subject = {parsed(m.data)["Subject"]: m for m in smtp_server.messages}
    assert len(by_subject["This week"].rcpt_tos) == 4
    assert "List-Unsubscribe" not in parsed(by_subject["This week"].data)
    assert "List-Id" not in parsed(by_subject["This week"].data)
    assert len(by_subject["listed"].rcpt_tos) == 4
    assert parsed(by_subject["listed"].data)["List-Id"] == f"<{LIST}>"
    assert "List-Unsubscribe" not in parsed(by_subject["listed"].data)


def test_a_worker_without_the_secret_fails_the_recipients_and_sends_nothing(
    sqlite_stack, smtp_server
):
    with_unsubscribe(sqlite_stack)
    mid = mailqueue.enqueue(news(), list_id=LIST, unsubscribe=True)
    worker_settings = replace(sqlite_stack.settings, unsubscribe_secret=None)

    deliver(worker_settings, sqlite_stack.store, [mid])

    info = mailqueue.get_status(mid)
    assert info.status == "failed"
    assert smtp_server.messages == []
    for r in info.recipients:
        assert "MAILQUEUE_UNSUBSCRIBE_SECRET" in (r.reply or "")
        assert "not sent without the header" in (r.reply or "")


def test_enqueue_refuses_unsubscribe_without_a_url_or_with_its_own_header(sqlite_stack):
    with pytest.raises(InvalidMessageError, match="MAILQUEUE_UNSUBSCRIBE_URL"):
        mailqueue.enqueue(news(), list_id=LIST, unsubscribe=True)
    with_unsubscribe(sqlite_stack)
    with pytest.raises(InvalidMessageError, match="List-Unsubscribe"):
        mailqueue.enqueue(
            news(headers={"List-Unsubscribe": "<https://elsewhere.example/u/1>"}),
            unsubscribe=True,
        )
    with pytest.raises(InvalidMessageError, match="unsubscribe"):
        mailqueue.enqueue(news(), unsubscribe="yes")  # type: ignore[arg-type]
    assert mailqueue.list_messages() == []


# -- the web app -----------------------------------------------------------------------------


def delivered_link(stack, smtp_server, address: str = "ann@example.org") -> str:
    settings = stack.settings
    mid = mailqueue.enqueue(news(to=[address], cc=[], bcc=[]), list_id=LIST, unsubscribe=True)
    deliver(settings, stack.store, [mid])
    (data,) = [m.data for m in smtp_server.messages if m.rcpt_tos == (address,)][-1:]
    return path_of(one_click_url(data))


def next_status(stack, address: str, list_id: str | None = LIST) -> str:
    mid = mailqueue.enqueue(news(to=[address], cc=[], bcc=[], subject="next"), list_id=list_id)
    deliver(stack.settings, stack.store, [mid])
    return mailqueue.get_status(mid).status


def test_one_click_post_suppresses_the_address_for_that_list(
    sqlite_stack, smtp_server, web, monkeypatch
):
    with_unsubscribe(sqlite_stack, on_unsubscribe=f"{__name__}:record_hook")
    CALLS.clear()
    link = delivered_link(sqlite_stack, smtp_server)

    first = web.post(link, data={"List-Unsubscribe": "One-Click"})  # what Gmail sends
    again = web.post(link, data={"List-Unsubscribe": "One-Click"})

    assert first.status_code == again.status_code == 200
    assert "ann@example.org will receive no more mail from the list" in first.text
    assert first.headers["cache-control"] == "no-store"
    assert first.headers["referrer-policy"] == "no-referrer"
    assert "set-cookie" not in first.headers
    assert next_status(sqlite_stack, "ann@example.org") == "suppressed"
    assert next_status(sqlite_stack, "bob@example.org") == "sent"
    assert next_status(sqlite_stack, "ann@example.org", list_id="other.example.com") == "sent"
    # the hook saw each POST
    assert [(c.address, c.list_id) for c in CALLS] == [("ann@example.org", LIST)] * 2


def test_get_shows_a_button_and_does_not_unsubscribe(sqlite_stack, smtp_server, web):
    with_unsubscribe(sqlite_stack)
    link = delivered_link(sqlite_stack, smtp_server)

    page = web.get(link)

    assert page.status_code == 200
    assert '<form method="post"' in page.text and "ann@example.org" in page.text
    assert next_status(sqlite_stack, "ann@example.org") == "sent"
    # the page's own button (a form post, no CSRF token: none is needed)
    assert web.post(link, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert next_status(sqlite_stack, "ann@example.org") == "suppressed"


def test_altered_or_replayed_tokens_are_refused(sqlite_stack, smtp_server, web):
    with_unsubscribe(sqlite_stack)
    link = delivered_link(sqlite_stack, smtp_server)
    other = Signer([SECRET]).token("bob@example.org", LIST, None)
    payload_of_bob = other.split(".")[1]
    version, _, mac = link.removeprefix("/u/").split(".")
    cut = link[:-1] + ("A" if link[-1] != "A" else "B")

    for bad in (cut, f"/u/{version}.{payload_of_bob}.{mac}", "/u/1.abc.def"):
        for method in (web.get, web.post):
            answer = method(bad)
            assert answer.status_code == 400, (bad, answer.text)
            assert "this unsubscribe link is not valid" in answer.text
    assert next_status(sqlite_stack, "ann@example.org") == "sent"
    assert next_status(sqlite_stack, "bob@example.org") == "sent"


def test_a_failing_hook_is_logged_and_the_unsubscribe_stands(
    sqlite_stack, smtp_server, web, caplog
):
    with_unsubscribe(sqlite_stack, on_unsubscribe=f"{__name__}:failing_hook")
    link = delivered_link(sqlite_stack, smtp_server)

    answer = web.post(link)

    assert answer.status_code == 200
    assert "preference store" not in answer.text
    assert "MAILQUEUE_ON_UNSUBSCRIBE callback" in caplog.text
    assert next_status(sqlite_stack, "ann@example.org") == "suppressed"


def test_the_links_need_no_login_but_open_nothing_else(sqlite_stack, smtp_server, web):
    with_unsubscribe(sqlite_stack)
    link = delivered_link(sqlite_stack, smtp_server)
    assert web.get(link).status_code == 200  # no session, no bearer token
    assert web.get("/", follow_redirects=False).status_code == 303  # the rest wants a login
    assert web.get("/api/v1/stats").status_code == 401
    assert web.post("/u/").status_code == 404


def test_too_many_bad_tokens_from_one_address_answer_429(sqlite_stack, smtp_server):
    with_unsubscribe(sqlite_stack, web_auth_failures_per_min=3)
    with TestClient(create_app(token=WEB_TOKEN), base_url=URL) as web:
        link = delivered_link(sqlite_stack, smtp_server)
        for _ in range(3):
            assert web.post("/u/1.forged.token").status_code == 400
        limited = web.post(link)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
    assert next_status(sqlite_stack, "ann@example.org") == "sent"


def test_requests_past_the_per_minute_limit_answer_429(sqlite_stack, smtp_server):
    with_unsubscribe(sqlite_stack, unsubscribe_per_min=2)
    with TestClient(create_app(token=WEB_TOKEN), base_url=URL) as web:
        link = delivered_link(sqlite_stack, smtp_server)
        assert web.get(link).status_code == 200
        assert web.post(link).status_code == 200
        assert web.post(link).status_code == 429


def test_without_a_secret_the_web_says_unavailable(sqlite_stack, web):
    token = Signer([SECRET]).token("ann@example.org", LIST, None)
    answer = web.post(f"/u/{token}")
    assert answer.status_code == 503
    assert SECRET not in answer.text


@pytest.mark.slow
def test_a_real_worker_sends_signed_links_that_unsubscribe(
    sqlite_stack,
    smtp_server,
    keys,  # noqa: F811 - the fixture
    tmp_path: Path,
    spawn,
    web,
):
    with_unsubscribe(sqlite_stack)
    spawn(
        "worker",
        "--concurrency",
        "1",
        "--loglevel",
        "WARNING",
        env=sqlite_stack.env(**dkim_env(keys, tmp_path), **unsubscribe_env()),
    )
    mid = mailqueue.enqueue(news(), list_id=LIST, unsubscribe=True)
    wait_until(lambda: mailqueue.get_status(mid).status == "sent", timeout=60, what="delivery")
    by_rcpt = {m.rcpt_tos: m.data for m in smtp_server.messages}
    assert len(by_rcpt) == 4
    for data in by_rcpt.values():
        assert verify_each(data, keys.dns()) == [True, True]
    assert web.post(path_of(one_click_url(by_rcpt[("bob@example.org",)]))).status_code == 200
    later = mailqueue.enqueue(news(subject="later"), list_id=LIST, unsubscribe=True)
    wait_until(lambda: mailqueue.get_status(later).status == "partial", timeout=60, what="later")
    statuses = {r.address: r.status for r in mailqueue.get_status(later).recipients}
    assert statuses["bob@example.org"] == "suppressed"
    assert statuses["ann@example.org"] == "sent"


# -- the other entrances: CLI, JSON API, Django, Flask -------------------------------------


def _one_click_copies(stack, smtp_server, ids) -> dict[tuple[str, ...], bytes]:
    deliver(stack.settings, stack.store, ids)
    return {m.rcpt_tos: m.data for m in smtp_server.messages}


def _assert_own_links(copies: dict[tuple[str, ...], bytes], mid: str) -> None:
    signer = Signer([SECRET])
    assert copies and all(len(rcpts) == 1 for rcpts in copies)
    for (address,), data in copies.items():
        found = signer.verify(path_of(one_click_url(data)).removeprefix("/u/"))
        assert (found.address, found.list_id, str(found.message_id)) == (address, LIST, mid)
        assert parsed(data)["List-Id"] == f"<{LIST}>"


def test_cli_send_takes_list_id_and_unsubscribe(sqlite_stack, smtp_server):
    from click.testing import CliRunner

    from mailqueue.cli import cli

    with_unsubscribe(sqlite_stack)
    args = ["send", "--from", "news@example.com", "--to", "ann@example.org", "--to",
            "bob@example.org", "--subject", "cli", "--text", "x", "--list-id", LIST]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--unsubscribe"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    mid = result.output.strip()
    _assert_own_links(_one_click_copies(sqlite_stack, smtp_server, [mid]), mid)
    sqlite_stack.reconfigure(unsubscribe_url=None)
    refused = CliRunner().invoke(cli, [*args, "--unsubscribe"])
    assert refused.exit_code == 2 and "MAILQUEUE_UNSUBSCRIBE_URL" in refused.output


def test_the_json_api_takes_list_id_and_unsubscribe(sqlite_stack, smtp_server, web):
    with_unsubscribe(sqlite_stack)
    body = {"sender": "news@example.com", "to": ["ann@example.org", "bob@example.org"],
            "subject": "api", "text": "x", "list_id": LIST, "unsubscribe": True}  # fmt: skip
    auth = {"Authorization": f"Bearer {WEB_TOKEN}"}
    created = web.post("/api/v1/messages", json=body, headers=auth)
    assert created.status_code == 201, created.text
    mid = created.json()["id"]
    _assert_own_links(_one_click_copies(sqlite_stack, smtp_server, [mid]), mid)
    bad = web.post("/api/v1/messages", json={**body, "unsubscribe": "yes"}, headers=auth)
    assert bad.status_code == 400 and bad.json()["field"] == "unsubscribe"


def test_flask_messages_take_list_id_and_unsubscribe(sqlite_stack, smtp_server):
    from mailqueue.contrib.flask import Message as FlaskMessage

    from .test_flask import _plain_app

    with_unsubscribe(sqlite_stack)
    app, mail_ = _plain_app(sqlite_stack, **unsubscribe_env())
    with app.app_context():
        message = FlaskMessage(
            "flask", recipients=["ann@example.org", "bob@example.org"], body="x",
            list_id=LIST, unsubscribe=True,
        )  # fmt: skip
        mid = mail_.send(message)
    _assert_own_links(_one_click_copies(sqlite_stack, smtp_server, [mid]), mid)


def test_django_takes_list_id_and_unsubscribe_headers_and_does_not_send_them(
    dj,  # noqa: F811 - the fixture
    smtp_server,
):
    from django.core.mail import EmailMessage

    from mailqueue.contrib.django import QueuedEmailMessage

    with_unsubscribe(dj)
    by_header = EmailMessage(
        "django", "x", "news@example.com", ["ann@example.org", "bob@example.org"],
        headers={"X-Mailqueue-List-Id": LIST, "X-Mailqueue-Unsubscribe": "1"},
    )  # fmt: skip
    assert by_header.send() == 1
    mid = by_header.mailqueue_id
    copies = _one_click_copies(dj, smtp_server, [mid])
    _assert_own_links(copies, mid)
    assert all(b"X-Mailqueue" not in data for data in copies.values())

    by_keyword = QueuedEmailMessage(
        "kw", "x", "news@example.com", ["cat@example.org"], list_id=LIST, unsubscribe=True
    )
    assert by_keyword.send() == 1
    copies = _one_click_copies(dj, smtp_server, [by_keyword.mailqueue_id])
    _assert_own_links({("cat@example.org",): copies[("cat@example.org",)]}, by_keyword.mailqueue_id)
    with pytest.raises(InvalidMessageError, match="X-Mailqueue-Unsubscribe"):
        EmailMessage(
            "bad", "x", "news@example.com", ["a@example.org"],
            headers={"X-Mailqueue-Unsubscribe": "maybe"},
        ).send()  # fmt: skip


def test_each_acceptance_is_recorded_before_the_next_copy_goes_out(stack, smtp_server):
    """Invariant 2 with one transaction per recipient: a copy the relay accepted is
    ``sent`` in SQL while the attempt is still busy with the next copy, so a worker
    that dies then does not send it again."""
    import threading

    settings = with_unsubscribe(stack, relay_pool_size=1)
    mid = mailqueue.enqueue(news(cc=[], bcc=[]), list_id=LIST, unsubscribe=True)
    smtp_server.faults.reply_delay_s = 0.3  # time to make bob's copy hang in DATA
    worker = threading.Thread(target=deliver, args=(settings, stack.store, [mid]))
    worker.start()
    try:
        wait_until(lambda: smtp_server.messages, timeout=30, what="the first copy")
        smtp_server.faults.hang_in_data = 1
        (first,) = smtp_server.messages
        (accepted,) = first.rcpt_tos
        waiting = {"ann@example.org", "bob@example.org"} - {accepted}

        def recorded() -> bool:
            info = mailqueue.get_status(mid)
            by_address = {r.address: r.status for r in info.recipients}
            return info.status == "sending" and by_address[accepted] == "sent"

        wait_until(recorded, timeout=30, what="the first acceptance in SQL mid-attempt")
        assert {r.address: r.status for r in mailqueue.get_status(mid).recipients}[
            waiting.pop()
        ] == "pending"
    finally:
        smtp_server.stop()  # hangs up on the copy that waits in DATA
        worker.join(60)
    info = mailqueue.get_status(mid)
    assert {r.address: r.status for r in info.recipients}[accepted] == "sent"
    assert info.status == "deferred"
    assert [a.status for a in mailqueue.get_attempts(mid) if a.address == accepted] == ["sent"]


def test_worker_and_web_warn_at_start_when_the_url_has_no_secret():
    from mailqueue.logging_setup import startup_lines

    half = settings_from_env({"MAILQUEUE_UNSUBSCRIBE_URL": URL})
    worker = [text for level, text in startup_lines("worker", half, {}) if level >= 30]
    web = [text for level, text in startup_lines("web", half, {}) if level >= 30]
    assert any("unsubscribe=True fail" in t for t in worker)
    assert any("answer 503" in t for t in web)
    whole = settings_from_env(unsubscribe_env())
    assert not [t for level, t in startup_lines("worker", whole, {}) if level >= 30]
    served = [t for _, t in startup_lines("web", whole, {})]
    assert any("https://mail.example.com/u/… are served without login" in t for t in served)
    assert not any(SECRET in t for t in served)


def test_a_signed_token_for_an_address_the_list_cannot_hold_is_a_plain_400(sqlite_stack, web):
    with_unsubscribe(sqlite_stack)
    token = Signer([SECRET]).token("postmaster", LIST, None)  # a bare name a relay may take
    answer = web.post(f"/u/{token}")
    assert answer.status_code == 400
    assert "cannot be unsubscribed here" in answer.text


def test_the_pages_carry_the_security_headers_and_need_nothing_the_csp_forbids(sqlite_stack, web):
    from mailqueue.web.security import CONTENT_SECURITY_POLICY

    with_unsubscribe(sqlite_stack)
    token = Signer([SECRET]).token("ann@example.org", LIST, None)
    answers = [web.get(f"/u/{token}"), web.post(f"/u/{token}"), web.get("/u/1.bad.token")]
    for answer in answers:
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"  # the URL holds the token
        assert "<script" not in answer.text and "style=" not in answer.text
        assert "<style" not in answer.text


def test_an_unsubscribe_only_app_serves_the_links_and_nothing_else(sqlite_stack, smtp_server):
    with_unsubscribe(sqlite_stack)
    link = delivered_link(sqlite_stack, smtp_server)
    with TestClient(create_app(token=None, unsubscribe_only=True), base_url=URL) as public:
        assert public.get(link).status_code == 200
        assert public.post(link).status_code == 200
        assert public.get("/static/mailqueue.css").status_code == 200
        for path in ("/", "/login", "/api/v1/stats", "/api/v1/messages", "/suppressions"):
            assert public.get(path).status_code == 404, path
        assert public.post("/api/v1/messages", json={}).status_code == 404
    assert next_status(sqlite_stack, "ann@example.org") == "suppressed"


def test_mailqueue_web_unsubscribe_only_needs_the_secret_and_no_token(sqlite_stack):
    from click.testing import CliRunner

    from mailqueue.cli import cli

    refused = CliRunner().invoke(cli, ["web", "--unsubscribe-only", "--port", "0"])
    assert refused.exit_code == 2 and "MAILQUEUE_UNSUBSCRIBE_SECRET" in refused.output
    with_unsubscribe(sqlite_stack)
    both = CliRunner().invoke(cli, ["web", "--unsubscribe-only", "--no-auth-on-loopback"])
    assert both.exit_code == 2 and "--unsubscribe-only" in both.output


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migration_0008_adds_the_flag_false_for_queued_mail_and_downgrades(kind, empty_database):
    """Queued rows from before 0008 read ``unsubscribe = false`` (sent as before);
    the downgrade drops the column without rebuilding mq_message (its indexes stay)."""
    import sqlalchemy as sa
    from alembic import command

    from mailqueue.migrate import alembic_config, upgrade

    url = empty_database

    def run(sql: str, **params: object) -> list[object]:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                result = conn.execute(sa.text(sql), params)
                return list(result.scalars()) if result.returns_rows else []
        finally:
            engine.dispose()

    indexes = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if kind == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'mq_message'"
    )
    upgrade(url, "0007")
    now = "2026-12-06 00:00:00"
    run(
        "INSERT INTO mq_message (id, created_at, updated_at, status, relay, mail_from, "
        "subject, size, content, smtputf8, eightbit, attempts, next_attempt_at, expires_at) "
        "VALUES (:id, :now, :now, 'queued', 'default', 'a@example.com', '', 1, :c, "
        ":f, :f, 0, :now, :now)",
        id=uuid.uuid4().hex if kind == "sqlite" else str(uuid.uuid4()),
        now=now,
        c=b"x",
        f=False,
    )
    upgrade(url, "0008")
    assert run("SELECT unsubscribe FROM mq_message") in ([False], [0])
    command.downgrade(alembic_config(url), "0007")
    engine = sa.create_engine(url)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("mq_message")}
    engine.dispose()
    assert "unsubscribe" not in columns and "list_id" in columns
    assert "ix_mq_message_tag_created" in set(run(indexes))
    upgrade(url, "0008")
