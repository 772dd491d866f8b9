"""The CLI at the input boundary (#15): refusals, hostile output, masked secrets.

* Bad input to ``mailqueue send`` is exit 2 with one line on stderr
  (``error: <field>: <reason>``), never a traceback, and nothing is queued.
* Whatever came from a message or a relay is printed as written: Rich markup
  in it is not interpreted, and terminal control characters are printed as
  escapes, so stored mail cannot crash ``list``/``status``, plant a link or
  rewrite the operator's terminal.
* ``migrate`` and ``repr(settings)`` never show a password, whether it is in
  the URL's userinfo or in a query parameter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import mailqueue
from mailqueue import Message
from mailqueue.cli import cli
from mailqueue.config import RelayConfig, Settings, hide_password, settings_from_env
from mailqueue.store.models import AttemptRow, MessageRow, RecipientRow
from mailqueue.store.relays import pause_relay
from mailqueue.worker.service import Deliverer

M, R, A = MessageRow.__table__, RecipientRow.__table__, AttemptRow.__table__

# What an attacker puts where an operator will read it: Rich markup (a closing
# tag that used to crash the table, a link, a style, an emoji code) ...
MARKUP = "[/bold] [link=https://evil.test]click me[/link] [red]alarm[/red] :warning:"
# ... and terminal control sequences: an OSC 8 hyperlink, clear screen, cursor
# up, a carriage return that overwrites the line, BEL, a C1 CSI, a bidi override.
CONTROLS = (
    "\x1b]8;;https://evil.test\x1b\\link\x1b]8;;\x1b\\ \x1b[2J\x1b[1A\rFAKE \x07 \x9b31m \u202eevil"
)
RAW_CONTROLS = ("\x1b", "\r", "\x07", "\x9b", "\u202e")
SEND = ("send", "--from", "shop@example.com", "--text", "hello")
SHOWN_CONTROLS = ("\\x1b]8;;https://evil.test", "\\x1b[2J", "\\x1b[1A", "\\r", "\\x07", "\\x9b31m")


def run(*args: str, stdin: str | None = None) -> Result:
    """The command as an operator runs it, in a terminal wide enough for whole cells."""
    return CliRunner(env={"COLUMNS": "500"}).invoke(
        cli, list(args), input=stdin, prog_name="mailqueue", catch_exceptions=False
    )


def count_messages(stack) -> int:
    with stack.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(M)).scalar()


def deliver(stack, *ids: str) -> None:
    async def go() -> None:
        d = Deliverer(stack.settings, stack.store)
        try:
            await d.deliver_batch([uuid.UUID(i) for i in ids])
        finally:
            await d.aclose()

    asyncio.run(go())


def assert_harmless(text: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in text, f"{char!r} reached the terminal"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "args, starts",
    [
        (["--to", "to@"], "error: "),
        (["--to", "a@example.com", "--header", "X-Tag\n: v"], "error: Invalid value for --header"),
        (["--to", "a@example.com", "--header", "X-Tag: a\nBcc: evil@example.net"], "error: "),
        (["--to", "a@example.com", "--subject", "a\x00b"], "error: subject: "),
        (["--to", "a@example.com", "--subject", "hi\r\nBcc: evil@example.net"], "error: subject: "),
        (["--to", "a@example.com", "--html", "@missing-file.html"], "error: html: cannot read"),
        (["--to", "a@example.com", "--send-at", "tomorrow"], "error: send_at: 'tomorrow' is not"),
        (
            ["--to", "a@example.com", "--send-at", "2030-01-01T09:00"],
            "error: send_at: '2030-01-01T09:00' has no UTC offset",
        ),
        (["--to", "a@example.com", "--relay", "nope"], "error: relay: no relay named 'nope'"),
        (["--to", "a@example.com", "--charset", "x\x1b]0;t\x07\x1b[2J"], "error: charset: "),
        (["--to", "a@example.com", "--text-subtype", "plain\nX-Injected: 1"], "error: "),
        (
            ["--to", "a@example.com", "--attach", "missing.pdf"],
            "error: Invalid value for '--attach'",
        ),
        (["--to", "a@example.com", "--inline", "missing.png"], "error: Invalid value for --inline"),
        (["--to", "a@example.com", "--header", "no colon"], "error: Invalid value for --header"),
        (["--to", "a@example.com", "--now", "--send-at", "2030-01-01T09:00Z"], "error: --now"),
    ],
)
def test_bad_send_input_is_exit_2_with_one_line_and_nothing_queued(
    sqlite_stack, tmp_path, monkeypatch, args, starts
):
    monkeypatch.chdir(tmp_path)
    result = run(*SEND, *args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), result.stderr
    assert "Traceback" not in result.output
    assert_harmless(result.stderr)
    assert count_messages(sqlite_stack) == 0


def test_unreadable_standard_input_is_refused_as_text(sqlite_stack):
    result = CliRunner().invoke(
        cli, [*SEND[:3], "--to", "a@example.com", "--text", "-"], input=b"\xff\xfe bad"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: text: standard input is not UTF-8 text")
    assert count_messages(sqlite_stack) == 0


def test_the_installed_command_refuses_with_one_line_too(sqlite_stack, tmp_path):
    """Through ``python -m mailqueue`` (``main()``), as scripts call it."""
    env = sqlite_stack.env()
    for extra, first in (
        (["--to", "to@"], "error: "),
        (["--to", "a@example.com", "--html", "@missing.html"], "error: html: cannot read"),
        (["--to", "a@example.com", "--subject", "[/bold]", "--send-at", "x"], "error: send_at: "),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "mailqueue", *SEND, *extra],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(first), done.stderr
    assert count_messages(sqlite_stack) == 0


def test_not_found_and_usage_errors_are_one_line_too(sqlite_stack):
    missing = run("status", str(uuid.uuid4()))
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: no message with id ")
    assert len(missing.stderr.splitlines()) == 1
    usage = run("send", "--to", "a@example.com")
    assert usage.exit_code == 2
    assert usage.stderr.splitlines() == [
        "error: Missing option '--from'. (see 'mailqueue send --help')"
    ]
    hostile = run("\x1b]0;owned\x07\x1b[2J\nFAKE")  # click quotes it as it is
    assert hostile.exit_code == 2
    assert hostile.stderr.splitlines() == [
        "error: No such command '\\x1b]0;owned\\x07\\x1b[2J\\nFAKE'. (see 'mailqueue --help')"
    ]


def test_send_at_keeps_the_message_until_then(sqlite_stack):
    result = run(*SEND, "--to", "a@example.com", "--send-at", "2030-01-01T09:00:00+02:00")
    assert result.exit_code == 0, result.output
    info = mailqueue.get_status(result.stdout.strip())
    assert info.status == "queued"
    assert info.next_attempt_at == dt.datetime(2030, 1, 1, 7, 0, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- hostile output


def test_list_and_status_print_markup_from_a_message_as_written(sqlite_stack, smtp_server):
    """A subject and a relay reply full of Rich markup: exit 0, shown literally."""
    smtp_server.on_recipient = lambda address: (
        f"550 5.7.1 {MARKUP}" if address.startswith("victim") else True
    )
    mid = mailqueue.enqueue(
        Message(
            sender="shop@example.com",
            to=["victim@example.com", "ok@example.com"],
            subject=MARKUP,
            text="x",
        )
    )
    deliver(sqlite_stack, mid)
    assert {r.address: r.status for r in mailqueue.get_status(mid).recipients} == {
        "victim@example.com": "failed",
        "ok@example.com": "sent",
    }

    listed = run("list")
    assert listed.exit_code == 0, listed.output
    assert MARKUP[:40] in listed.stdout  # the list shows 40 characters of a subject

    status = run("status", mid, "--history")
    assert status.exit_code == 0, status.output
    assert f"subject {MARKUP!r}" in status.stdout
    assert f"5.7.1 {MARKUP}" in status.stdout  # the reply, in the table and in the history
    assert status.stdout.count(MARKUP) == 3
    assert "\x1b" not in listed.output + status.output


def test_control_characters_from_the_store_are_printed_escaped(sqlite_stack):
    """Rows written by a worker (or by anything else with database access)."""
    mid = mailqueue.enqueue(
        Message(sender="shop@example.com", to=["a@example.com"], subject="s", text="x")
    )
    with sqlite_stack.engine.begin() as conn:
        conn.execute(
            sa.update(M)
            .where(M.c.id == uuid.UUID(mid))
            .values(subject=CONTROLS, relay="r\x1b[8m", last_error="Err\x1b[5m")
        )
        conn.execute(sa.update(R).values(reply=f"550 {CONTROLS}", status="failed"))
        rid = conn.execute(sa.select(R.c.id)).scalar()
        conn.execute(
            sa.insert(A).values(
                message_id=uuid.UUID(mid),
                recipient_id=rid,
                status="failed",
                smtp_code=550,
                reply=f"550 {CONTROLS}",
                worker="w\x1b]0;owned\x07",
                at=dt.datetime.now(dt.UTC),
            )
        )

    listed = run("list")
    status = run("status", mid, "--history")
    for result in (listed, status):
        assert result.exit_code == 0, result.output
        assert_harmless(result.output)
    assert "\\x1b]8;;https://ev" in listed.stdout and "Err\\x1b[5m" in listed.stdout
    for shown in (*SHOWN_CONTROLS, "\\u202eevil", "relay=r\\x1b[8m", "w\\x1b]0;owned\\x07"):
        assert shown in status.stdout, shown

    as_json = json.loads(run("status", mid, "--json", "--history").stdout)
    assert as_json["subject"] == CONTROLS  # scripts get the exact value, JSON-escaped


def test_a_paused_relays_reply_is_shown_escaped(sqlite_stack):
    pause_relay(sqlite_stack.engine, "bulk", error="AuthError", reply=f"535 {MARKUP} {CONTROLS}")

    relays = run("relays")
    assert relays.exit_code == 0, relays.output
    assert f"535 {MARKUP}" in relays.stdout
    assert "PAUSED until" in relays.stdout

    stats = run("stats")
    assert stats.exit_code == 0, stats.output
    assert f"AuthError: 535 {MARKUP}" in stats.stderr
    for result in (relays, stats):
        assert_harmless(result.output)
        assert "\\x1b[2J" in result.output and "\\r" in result.output


def test_send_now_prints_the_relays_reply_escaped(sqlite_stack, smtp_server):
    smtp_server.on_recipient = lambda address: f"550 5.7.1 {MARKUP} \x1b[2Jgone \x1b]0;t\x07"
    result = run(*SEND, "--to", "a@example.com", "--now")
    assert result.exit_code == 3, result.output
    assert f"550  a@example.com  5.7.1 {MARKUP} \\x1b[2Jgone \\x1b]0;t\\x07" in result.stdout
    assert_harmless(result.output)


# --------------------------------------------------------------------------- secrets in URLs

SECRET = "S3cr3t-Value"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "PASSWORD",
        "Password",
        "passwd",
        "pwd",
        "secret",
        "token",
        "access_token",
        "Access-Token",
        "api_key",
        "apikey",
        "sslpassword",
        "SSLPassword",
        "client_secret",
        "pass%77ord",  # percent-encoded "password"
    ],
)
def test_secret_query_parameters_are_masked(name):
    url = f"postgresql+psycopg://mail@db:5432/mail?sslmode=require&{name}={SECRET}&application_name=mq"
    shown = hide_password(url)
    assert SECRET not in shown
    assert shown == (
        f"postgresql+psycopg://mail@db:5432/mail?sslmode=require&{name}=***&application_name=mq"
    )


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://mail:S3cr3t-Value@db/mail", "postgresql://mail:***@db/mail"),
        ("redis://:S3cr3t-Value@redis:6379/0", "redis://:***@redis:6379/0"),
        ("smtp://user:S3cr3t-Value@relay:587", "smtp://user:***@relay:587"),
        # unencoded '/', '?', '#', '@' in the password: masked however it is parsed
        ("postgresql://mail:S3/cr3t-Value@db/mail", "postgresql://mail:***@db/mail"),
        ("postgresql://mail:S3?cr3t-Value@db/mail", "postgresql://mail:***@db/mail"),
        ("postgresql://mail:S3#cr3t-Value@db/mail", "postgresql://mail:***@db/mail"),
        ("postgresql://mail:S3@cr3t-Value@db/mail", "postgresql://mail:***@db/mail"),
        (
            "postgresql://mail:S3cr3t-Value@db/mail?password=S3cr3t-Value",
            "postgresql://mail:***@db/mail?password=***",
        ),
        # a value holding ';' or '#' is masked up to the next '&'
        (
            "mysql://db/mail?a=1;password=S3cr3t;-Value#x&b=2",
            "mysql://db/mail?a=1;password=***&b=2",
        ),
        # nothing secret: unchanged (key files are named, not secret; their passphrase is)
        ("sqlite:///var/lib/mailqueue.db", "sqlite:///var/lib/mailqueue.db"),
        (
            "postgresql://mail@db/mail?sslkey=/etc/k.pem",
            "postgresql://mail@db/mail?sslkey=/etc/k.pem",
        ),
        ("postgresql://db:5432/mail?password", "postgresql://db:5432/mail?password"),
    ],
)
def test_userinfo_passwords_are_masked_however_they_are_spelled(url, shown):
    assert hide_password(url) == shown


def test_repr_of_settings_never_holds_a_secret():
    settings = Settings(
        database_url=f"postgresql://mail:{SECRET}1@db/mail?sslpassword={SECRET}2",
        broker_url=f"redis://:{SECRET}3@redis:6379/0?password={SECRET}4",
        limits_redis_url=f"redis://limits:6379/1?token={SECRET}5",
        relay=RelayConfig(url=f"smtp://user:{SECRET}6@relay.example:587"),
    )
    for text in (repr(settings), str(settings)):
        assert SECRET not in text
        assert "postgresql://mail:***@db/mail?sslpassword=***" in text
        assert "redis://:***@redis:6379/0?password=***" in text
        assert "redis://limits:6379/1?token=***" in text
        assert "smtp://user:***@relay.example:587" in text


def test_relay_urls_are_shown_through_the_same_mask():
    relay = RelayConfig(url=f"smtp://user:{SECRET}@relay.example:587?pool_size=3")
    assert relay.safe_url == "smtp://user:***@relay.example:587"
    assert relay.describe()["url"] == "smtp://user:***@relay.example:587"
    assert SECRET not in repr(relay)
    named = RelayConfig(url="smtp://relay.example:587?username=ana@example.com")
    assert named.safe_url == "smtp://relay.example:587"  # an '@' in the query is no password


@pytest.mark.parametrize(
    "password",
    ["S3/cr3t-Value", "123/cr3t-Value", "S3?cr3t-Value", "123?cr3t-Value", "S3#cr3t", "S3?a=cr3t"],
)
def test_a_relay_url_with_an_unencoded_password_is_refused_without_showing_it(password):
    with pytest.raises(ValueError, match="percent-encode|not a number") as caught:
        RelayConfig(url=f"smtp://user:{password}@relay.example:587")
    assert "cr3t" not in str(caught.value)
    assert "smtp://user:***@relay.example:587" in str(caught.value)


def test_migrate_masks_a_password_given_as_a_query_parameter(tmp_path):
    db = tmp_path / "mq.db"
    url = f"sqlite:///{db}?password={SECRET}"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "mailqueue", "migrate"],
        env={**_clean_env(), "MAILQUEUE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"database at head: sqlite:///{db}?password=***\n"
    assert SECRET not in done.stdout + done.stderr


def test_migrate_masks_both_spellings_on_postgresql(pg_database):
    """PostgreSQL reads ``?password=`` (it wins over the userinfo): the real
    password, moved into the query, still connects and is never printed."""
    url = sa.engine.make_url(pg_database)
    secret = url.password or SECRET  # a trust-auth server ignores it
    with_query = url.set(password=None).update_query_dict({"password": secret})
    try:
        for candidate in (with_query, with_query.set(password=secret)):
            mailqueue.configure(database_url=candidate.render_as_string(hide_password=False))
            result = run("migrate")
            assert result.exit_code == 0, result.output
            assert f"password={secret}" not in result.output
            assert f":{secret}@" not in result.output
            assert "password=***" in result.output
    finally:
        mailqueue.configure(settings_from_env({}))


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}


def test_logs_mask_urls_and_secret_parameters_through_the_same_function():
    from mailqueue.logging_setup import scrub

    line = (
        f"connecting to postgresql://h/db?sslpassword={SECRET}&x=1 "
        f"access_token={SECRET} api-key: {SECRET} relay=bulk"
    )
    assert scrub(line) == (
        "connecting to postgresql://h/db?sslpassword=***&x=1 "
        "access_token=*** api-key: *** relay=bulk"
    )
