"""The CLI a newcomer cannot misuse silently (issue #19, items 5-7).

Full ids in ``list`` at any width, unique id prefixes wherever an id goes,
bad values refused with the allowed ones named (exit 2), "nothing to do"
exit 1 for ``retry`` and ``cancel`` alike, ``stats --watch --json`` with each
relay's queue depth, and the dev server on the default relay's port 1025.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections import Counter

import pytest
from click.testing import CliRunner

import mailqueue
from mailqueue import Message
from mailqueue.cli import cli
from mailqueue.config import settings_from_env

from .conftest import wait_until


def run(*args: str, columns: int = 80):
    return CliRunner().invoke(
        cli, list(args), catch_exceptions=False, env={"COLUMNS": str(columns)}
    )


def enqueue(to: str = "a@example.com", relay: str | None = None) -> str:
    return mailqueue.enqueue(Message(sender="s@example.com", to=[to], text="x"), relay=relay)


def refused(result, *words: str) -> str:
    """The one ``error:`` line of a refusal (exit 2), holding every one of ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    (line,) = [x for x in result.output.splitlines() if x.startswith("error: ")]
    for word in words:
        assert word in line, line
    return line


# -- ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [80, 100, 120])
def test_list_shows_every_id_in_full(sqlite_stack, columns):
    ids = [enqueue(f"{'x' * 30}{i}@example.com") for i in range(3)]
    output = run("list", columns=columns).output
    assert all(i in output for i in ids), output
    assert max(len(line) for line in output.splitlines()) <= columns


def test_a_unique_prefix_works_for_status_retry_cancel_and_before(stack):
    first = enqueue()
    mid = enqueue()
    prefix = mid.replace("-", "")[:20]  # past the shared time part of the UUIDv7
    assert len({i.replace("-", "")[:20] for i in (first, mid)}) == 2

    status = run("status", "--json", prefix.upper())
    assert status.exit_code == 0 and json.loads(status.output)["id"] == mid
    assert run("status", mid[:23]).exit_code == 0  # with its dashes
    page = run("list", "--json", "--before", prefix)
    assert [m["id"] for m in json.loads(page.output)] == [first]

    cancelled = run("cancel", prefix)
    assert cancelled.exit_code == 0 and cancelled.output.strip() == f"{mid} cancelled"
    assert mailqueue.get_status(mid).status == "cancelled"
    assert mailqueue.get_status(first).status == "queued"


def test_an_ambiguous_prefix_lists_the_matches(sqlite_stack):
    ids = [enqueue() for _ in range(3)]
    # UUIDv7: ids made within the same ~65 s share their first 8 hex digits, and
    # three ids in a row cross such a boundary at most once.
    shared, count = Counter(i[:8] for i in ids).most_common(1)[0]
    assert count >= 2
    matching = sorted(i for i in ids if i.startswith(shared))
    for command in (("status",), ("retry",), ("cancel",)):
        line = refused(run(*command, shared), f"'{shared}' matches {count} messages", *matching)
        assert "give more of the id" in line
    assert {mailqueue.get_status(i).status for i in ids} == {"queued"}  # nothing cancelled


def test_prefixes_too_short_not_hex_or_unknown(sqlite_stack):
    mid = enqueue()
    refused(run("status", mid[:7]), "too short: give at least 8 hex digits")
    refused(run("cancel", "zzzzzzzz"), "is not a message id")
    unknown = run("status", "00000000")
    assert unknown.exit_code == 1 and "00000000" in unknown.output
    assert run("retry", str(uuid.uuid4())).exit_code == 1


# -- bad values ----------------------------------------------------------------------


def test_bad_values_are_refused_naming_the_allowed_ones(sqlite_stack):
    refused(run("list", "--status", "bogus"), "'bogus' is not one of", "'queued'", "'cancelled'")
    refused(run("list", "--limit", "-5"), "--limit", "-5", ">=1")
    refused(run("list", "--limit", "0"), "--limit")
    refused(run("list", "--relay", "nosuch"), "no relay named 'nosuch'", "known: bulk, default")
    refused(run("cancel", "--relay", "nosuch"), "no relay named 'nosuch'", "known: bulk, default")
    refused(
        run("send", "--from", "s@example.com", "--to", "a@example.com"),
        "nothing to send",
        "--subject",
        "--eml",
    )
    refused(run("stats", "--watch", "--interval", "0"), "--interval")
    refused(run("worker", "--loglevel", "LOUD"), "'LOUD' is not one of", "'info'")
    refused(run("worker", "-c", "0"), "--concurrency")
    refused(run("devserver", "--port", "70000"), "--port", "0<=x<=65535")
    refused(run("web", "--port", "-1", "--no-auth-on-loopback"), "--port")
    refused(run("demo", "--messages", "0"), "--messages")
    assert mailqueue.list_messages() == []  # nothing was queued by any of them


def test_a_subject_alone_or_a_body_alone_is_still_sent(sqlite_stack):
    for args in (("--subject", "ping"), ("--text", "body")):
        result = run("send", "--from", "s@example.com", "--to", "a@example.com", *args)
        assert result.exit_code == 0, result.output
    assert len(mailqueue.list_messages()) == 2


def test_nothing_to_do_is_exit_1_for_retry_and_cancel_alike(sqlite_stack):
    mid = enqueue()
    assert run("retry", "--failed").exit_code == 1
    assert run("retry", mid).exit_code == 1  # queued: nothing failed to requeue
    assert run("cancel", "--relay", "bulk").exit_code == 1  # nothing waiting there
    assert run("cancel", mid).exit_code == 0
    again = run("cancel", mid)
    assert again.exit_code == 1 and f"nothing to cancel: {mid} is cancelled" in again.output


# -- stats --watch --json --------------------------------------------------------------


def test_stats_watch_json_has_the_queue_depth_of_each_relay(sqlite_stack):
    enqueue(), enqueue(), enqueue(relay="bulk")
    result = run("stats", "--watch", "--json", "--interval", "0.01", "--count", "2")
    assert result.exit_code == 0
    frames = [json.loads(line) for line in result.output.splitlines()]
    assert len(frames) == 2
    for frame in frames:
        assert frame["messages"]["queued"] == 3
        depth = {d["relay"]: (d["waiting"], d["due"]) for d in frame["queue_depth"]}
        assert depth == {"default": (2, 2), "bulk": (1, 1)}
        assert all(d["oldest_due_age_s"] >= 0 for d in frame["queue_depth"])


# -- the dev server and the default relay ------------------------------------------------


def test_the_dev_server_listens_where_the_default_relay_points(tmp_path):
    assert settings_from_env({}).relay.url == "smtp://127.0.0.1:1025"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 1025))
        except OSError:
            pytest.skip("something else listens on 127.0.0.1:1025")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mailqueue", "devserver", "--maildir", str(tmp_path / "mail")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", 1025)) == 0

        wait_until(listening, timeout=30)
        sent = subprocess.run(
            [sys.executable, "-m", "mailqueue", "send", "--now", "--from", "s@example.com"]
            + ["--to", "a@example.com", "--subject", "hi", "--text", "x"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.split()[:3] == ["sent", "250", "a@example.com"], sent.stdout
        wait_until(lambda: len(list((tmp_path / "mail" / "new").iterdir())) == 1, timeout=30)
    finally:
        server.terminate()
        server.wait(20)
