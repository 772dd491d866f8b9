"""Operator commands: stats --watch, retry --failed --since, cancel --relay, purge, web."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import urllib.error
import urllib.request
import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import mailqueue
from mailqueue import Message
from mailqueue.cli import cli
from mailqueue.store.models import MessageRow, RecipientRow
from mailqueue.store.ops import parse_duration
from mailqueue.worker.service import Deliverer

from .conftest import wait_until

M, R = MessageRow.__table__, RecipientRow.__table__


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def deliver(stack, ids) -> None:
    async def go() -> None:
        d = Deliverer(stack.settings, stack.store)
        try:
            await d.deliver_batch([uuid.UUID(str(i)) for i in ids])
        finally:
            await d.aclose()

    asyncio.run(go())


def age(stack, message_id: str, **delta: float) -> None:
    """Pretend the message and its recipients last changed ``delta`` ago."""
    then = dt.datetime.now(dt.UTC) - dt.timedelta(**delta)
    mid = uuid.UUID(message_id)
    with stack.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.id == mid).values(updated_at=then))
        conn.execute(sa.update(R).where(R.c.message_id == mid).values(updated_at=then))


def statuses(ids) -> list[str]:
    return [mailqueue.get_status(i).status for i in ids]


def test_retry_failed_since_only_takes_recent_failures(stack, smtp_server):
    smtp_server.reject = ["no*@*"]
    old, recent = (
        mailqueue.enqueue(Message(sender="s@example.com", to=[f"no{i}@example.com"], text="x"))
        for i in range(2)
    )
    deliver(stack, [old, recent])
    age(stack, old, hours=3)
    assert statuses([old, recent]) == ["failed", "failed"]

    result = run("retry", "--failed", "--since", "1h")
    assert result.exit_code == 0 and "requeued 1 message(s)" in result.output
    assert statuses([old, recent]) == ["failed", "queued"]

    assert run("retry", "--failed").output.strip() == "requeued 1 message(s)"  # still works
    assert statuses([old, recent]) == ["queued", "queued"]
    assert run("retry", "--since", "1h").exit_code == 2
    assert run("retry", "--failed", "--since", "soon").exit_code == 2


def test_cancel_relay_cancels_waiting_messages_of_that_relay_only(stack, smtp_server):
    bulk = [
        mailqueue.enqueue(
            Message(sender="s@example.com", to=[f"b{i}@example.com"], text="x"), relay="bulk"
        )
        for i in range(3)
    ]
    other = mailqueue.enqueue(Message(sender="s@example.com", to=["o@example.com"], text="x"))
    result = run("cancel", "--relay", "bulk")
    assert result.exit_code == 0 and "cancelled 3 message(s) on relay bulk" in result.output
    assert statuses(bulk) == ["cancelled"] * 3
    assert statuses([other]) == ["queued"]

    result = run("cancel", other)  # the single-message form is unchanged
    assert result.exit_code == 0 and result.output.strip() == f"{other} cancelled"
    assert run("cancel").exit_code == 2
    assert run("cancel", other, "--relay", "bulk").exit_code == 2


def test_purge_deletes_old_terminal_rows_only(stack, smtp_server):
    smtp_server.reject = ["no@*"]
    old_sent, old_failed, new_sent = (
        mailqueue.enqueue(Message(sender="s@example.com", to=[to], text="x"))
        for to in ("a@example.com", "no@example.com", "c@example.com")
    )
    deliver(stack, [old_sent, old_failed, new_sent])
    old_waiting = mailqueue.enqueue(Message(sender="s@example.com", to=["w@example.com"], text="x"))
    for mid in (old_sent, old_failed, old_waiting):
        age(stack, mid, days=40)

    result = run("purge", "--older-than", "30d")
    assert result.exit_code == 0 and "purged 2 message(s)" in result.output
    with stack.engine.connect() as conn:
        left = {str(i) for i in conn.execute(sa.select(M.c.id)).scalars()}
        recipients = conn.execute(sa.select(sa.func.count()).select_from(R)).scalar()
    assert left == {new_sent, old_waiting}
    assert recipients == 2
    assert run("purge").exit_code == 2


def test_stats_watch_refreshes(sqlite_stack):
    mailqueue.enqueue(Message(sender="s@example.com", to=["a@example.com"], text="x"))
    result = run("stats", "--watch", "--json", "--interval", "0.01", "--count", "2")
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert len(lines) == 2 and all(x["messages"]["queued"] == 1 for x in lines)
    result = run("stats", "--watch", "--interval", "0.01", "--count", "2")
    assert result.exit_code == 0
    assert "queued" in result.output and "relay default: 1 waiting, 1 due" in result.output
    plain = run("stats", "--json")
    assert json.loads(plain.output)["messages"]["queued"] == 1


def test_parse_duration():
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    assert parse_duration("15m") == dt.timedelta(minutes=15)
    assert parse_duration("1h") == dt.timedelta(hours=1)
    assert parse_duration("30d") == dt.timedelta(days=30)
    assert parse_duration("2w") == dt.timedelta(weeks=2)
    assert parse_duration("120") == dt.timedelta(seconds=120)
    for bad in ("", "h", "-1d", "tomorrow"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_web_refuses_to_run_open_unless_asked_on_loopback(sqlite_stack, monkeypatch):
    monkeypatch.delenv("MAILQUEUE_WEB_TOKEN", raising=False)
    result = run("web")
    assert result.exit_code == 2 and "--token" in result.output
    result = run("web", "--host", "0.0.0.0", "--no-auth-on-loopback")
    assert result.exit_code == 2 and "loopback" in result.output
    assert run("web", "--token", "x", "--no-auth-on-loopback").exit_code == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_command_serves_the_api_with_the_token(sqlite_stack, spawn):
    port = _free_port()
    mailqueue.enqueue(Message(sender="s@example.com", to=["a@example.com"], text="x"))
    spawn("web", "--port", str(port), env=sqlite_stack.env(MAILQUEUE_WEB_TOKEN="tok-123"))
    url = f"http://127.0.0.1:{port}/api/v1/stats"

    def get(headers):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    wait_until(lambda: get({}) is not None, timeout=20, what="mailqueue web to listen")
    assert get({}) == 401
    req = urllib.request.Request(url, headers={"Authorization": "Bearer tok-123"})
    with urllib.request.urlopen(req, timeout=3) as r:
        assert json.loads(r.read())["messages"]["queued"] == 1


def test_list_filters_by_recipient_relay_and_tag(sqlite_stack):
    a = mailqueue.enqueue(
        Message(sender="s@example.com", to=["ana@example.org"], text="x"),
        relay="bulk",
        metadata={"tag": "welcome"},
    )
    b = mailqueue.enqueue(Message(sender="t@example.com", to=["bob@example.org"], text="x"))

    def ids(*args: str) -> list[str]:
        result = run("list", "--json", *args)
        assert result.exit_code == 0, result.output
        return [m["id"] for m in json.loads(result.output)]

    assert ids() == [b, a]
    assert ids("--recipient", "ana@example.org") == [a]
    assert ids("--relay", "bulk") == [a]
    assert ids("--tag", "welcome") == [a]
    assert ids("--sender", "t@example.com") == [b]
    assert ids("--status", "queued", "--tag", "nope") == []
