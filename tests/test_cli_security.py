"""The CLI at the input boundary (#15): masked secrets.

* ``migrate`` and ``repr(settings)`` never show a password, whether it is in
  the URL's userinfo or in a query parameter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import mailqueue
from mailqueue.cli import cli
from mailqueue.config import RelayConfig, Settings, hide_password, settings_from_env


def run(*args: str, stdin: str | None = None) -> Result:
    """The command as an operator runs it, in a terminal wide enough for whole cells."""
    return CliRunner(env={"COLUMNS": "500"}).invoke(
        cli, list(args), input=stdin, prog_name="mailqueue", catch_exceptions=False
    )


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
    "password", ["S3/cr3t-Value", "S3?cr3t-Value", "123?cr3t-Value", "S3#cr3t"]
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
