"""The first hour (issue #19, items 1-3): mistakes a newcomer makes, through the real CLI.

Each test runs ``python -m mailqueue …`` as a child process with the
environment set as the newcomer set it, and asserts what they see: exit 2,
one ``error:`` line that names the problem and the fix, no traceback, no
password. Long-running commands (worker, scheduler, web) also log at start
which database, broker and relays they use.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailqueue.config import settings_from_env
from mailqueue.logging_setup import startup_lines
from mailqueue.migrate import upgrade
from mailqueue.scheduler import Scheduler
from mailqueue.store import dispose_engines

from .conftest import POSTGRES_URL, require, wait_until

SEND = ("send", "--from", "shop@example.com", "--to", "ana@example.org", "--text", "hi")


def mq(
    *args: str, cwd: Path, prelude: str = "", timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """``mailqueue ARGS`` in ``cwd`` with only the given ``MAILQUEUE_*`` variables."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    # The default folder is the user data folder: keep it inside the test's folder.
    child_env["XDG_DATA_HOME"] = str(cwd / "xdg")
    child_env.update(env)
    code = f"{prelude}\nfrom mailqueue.cli import main\nmain()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one ``error:`` line of a command that exited 2, holding every one of ``words``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def only_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """As :func:`error_line`, for a short-lived command: nothing else on stderr."""
    line = error_line(result, *words)
    assert result.stderr.strip() == line
    return line


@pytest.fixture
def empty_pg() -> Iterator[str]:
    """A PostgreSQL database nobody migrated."""
    require("postgres")
    name = f"mq_empty_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield sa.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# -- 1. an unmigrated database ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("stats",),
        ("list",),
        ("status", "0195f0f0-0000-7000-8000-000000000000"),
        ("relays",),
        ("retry", "0195f0f0-0000-7000-8000-000000000000"),
        ("cancel", "0195f0f0-0000-7000-8000-000000000000"),
        ("purge", "--older-than", "30d"),
        ("stats", "--watch", "--json", "--count", "1"),
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_read_commands_in_a_folder_without_the_database_say_to_migrate(tmp_path, args):
    result = mq(*args, cwd=tmp_path)
    file = tmp_path / "xdg" / "mailqueue" / "mailqueue.db"
    only_line(
        result,
        f"the database at sqlite:///{file} ({file}) does not exist",
        "run `mailqueue migrate`",
        "MAILQUEUE_DATABASE_URL",
    )
    assert not file.exists()  # nothing left behind


@pytest.mark.parametrize(
    "args",
    [SEND, ("list",), ("stats",), ("status", "0195f0f0-0000-7000-8000-000000000000")],
    ids=["send", "list", "stats", "status"],
)
def test_commands_on_an_unmigrated_postgres_say_to_migrate(tmp_path, empty_pg, args):
    result = mq(*args, cwd=tmp_path, MAILQUEUE_DATABASE_URL=empty_pg)
    only_line(result, f"the database at {empty_pg} has no mailqueue tables", "`mailqueue migrate`")


@pytest.mark.parametrize(
    "args",
    [("scheduler",), ("worker", "-P", "solo"), ("web", "--no-auth-on-loopback", "--port", "0")],
    ids=["scheduler", "worker", "web"],
)
def test_long_running_commands_refuse_to_start_on_an_unmigrated_database(tmp_path, empty_pg, args):
    result = mq(
        *args,
        cwd=tmp_path,
        MAILQUEUE_DATABASE_URL=empty_pg,
        MAILQUEUE_BROKER_URL="redis://127.0.0.1:6379/15",
    )
    error_line(result, "has no mailqueue tables", "`mailqueue migrate`")
    start = [line for line in result.stderr.splitlines() if " starting: " in line]
    assert len(start) == 1 and f"database {empty_pg} (environment)" in start[0], result.stderr


def test_a_database_older_than_the_code_says_to_migrate_and_migrate_fixes_it(tmp_path, empty_pg):
    upgrade(empty_pg, "0004")
    dispose_engines()
    result = mq("list", cwd=tmp_path, MAILQUEUE_DATABASE_URL=empty_pg)
    only_line(result, "is at revision 0004, older than this mailqueue's", "`mailqueue migrate`")
    migrated = mq("migrate", cwd=tmp_path, MAILQUEUE_DATABASE_URL=empty_pg)
    assert migrated.returncode == 0, migrated.stderr
    again = mq("list", "--json", cwd=tmp_path, MAILQUEUE_DATABASE_URL=empty_pg)
    assert (again.returncode, again.stdout.strip()) == (0, "[]")


def test_a_database_newer_than_the_code_says_to_upgrade_mailqueue(tmp_path):
    url = f"sqlite:///{tmp_path / 'mq.db'}"
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    dispose_engines()
    result = mq("stats", cwd=tmp_path, MAILQUEUE_DATABASE_URL=url)
    only_line(result, "is at revision 0099, newer than this mailqueue knows", "upgrade mailqueue")


def test_migrate_and_send_on_a_database_a_newer_mailqueue_migrated(tmp_path):
    url = f"sqlite:///{tmp_path / 'mq.db'}"
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    dispose_engines()
    for args in (("migrate",), SEND):
        result = mq(*args, cwd=tmp_path, MAILQUEUE_DATABASE_URL=url)
        only_line(result, f"cannot migrate the database at {url}", "upgrade mailqueue")


def test_the_scheduler_logs_a_failure_once_backs_off_and_says_when_it_recovers(tmp_path, caplog):
    """Tables gone under a running scheduler: one ERROR line (no traceback), not one
    per tick; the waits between failing ticks grow; once ``migrate`` has run, one
    INFO line says it ticks again, and the wait is the interval again."""
    url = f"sqlite:///{tmp_path / 'mq.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # a database file without mailqueue's tables
        conn.execute(sa.text("CREATE TABLE other (x INTEGER)"))
    engine.dispose()
    settings = replace(settings_from_env({}), database_url=url, scheduler_interval_s=0.01)
    scheduler = Scheduler(settings)
    waits: list[float] = []
    migrated = threading.Event()

    class Clock:
        """The scheduler's stop event, recording each wait instead of sleeping it."""

        def is_set(self) -> bool:
            return len(waits) >= 12

        def wait(self, timeout: float) -> bool:
            waits.append(timeout)
            if len(waits) == 6:
                upgrade(url)  # the operator runs `mailqueue migrate`
                migrated.set()
            return False

    scheduler._stop = Clock()  # type: ignore[assignment]
    caplog.set_level(logging.DEBUG, logger="mailqueue.scheduler")
    scheduler.run()
    assert migrated.is_set()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # six failed ticks, one line
    assert errors[0].exc_info is None  # a known state: no traceback
    assert (
        errors[0]
        .getMessage()
        .startswith(f"the database at {url} has no mailqueue tables: run `mailqueue migrate`")
    )
    assert waits[:6] == sorted(waits[:6]) and waits[5] > waits[0]  # backing off
    recovered = [r.getMessage() for r in caplog.records if "ticking again" in r.getMessage()]
    assert recovered == ["ticking again after 6 failed tick(s): no mailqueue tables"]
    assert waits[6:] == [0.01] * 6  # the interval again
    dispose_engines()


# -- 2. every long-running process says what it uses --------------------------------


def test_a_worker_logs_its_database_broker_and_relay_and_warns_about_an_old_relative_file(
    tmp_path,
):
    (tmp_path / "mailqueue.db").touch()  # what an older version left in the working directory
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    child_env["MAILQUEUE_RELAY_URL"] = "smtp://mailer:hunter2@127.0.0.1:2599"
    child_env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    home = tmp_path / "xdg" / "mailqueue"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "mailqueue", "worker", "-P", "solo"],
            cwd=tmp_path,
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "WARNING mailqueue.startup" in log.read_text(), what="start lines")
    finally:
        worker.terminate()
        worker.wait(30)
    text = log.read_text()
    assert "hunter2" not in text
    assert (
        f"INFO mailqueue.startup: worker starting: database sqlite:///{tmp_path / 'mailqueue.db'} "
        f"(default of an older version, in the working directory, file {tmp_path / 'mailqueue.db'}"
        f"); broker sqla+sqlite:///{home / 'mailqueue-broker.db'} "
        f"(default, user data folder, file {home / 'mailqueue-broker.db'}); relays "
        "default=smtp://mailer:***@127.0.0.1:2599 (environment)"
    ) in text
    assert (
        f"WARNING mailqueue.startup: worker uses {tmp_path / 'mailqueue.db'}, left in the "
        "working directory by an older mailqueue whose default was relative"
    ) in text
    assert (
        f"move the file(s) into {home} (with every mailqueue process stopped), or pin them in "
        f"every process with MAILQUEUE_DATABASE_URL=sqlite:///{tmp_path / 'mailqueue.db'}"
    ) in text


def test_start_lines_hide_passwords_and_name_every_relay():
    settings = settings_from_env(
        {
            "MAILQUEUE_DATABASE_URL": "postgresql://app:dbsecret@db.internal/mail",
            "MAILQUEUE_BROKER_URL": "redis://:brokersecret@redis.internal:6379/0",
            "MAILQUEUE_RELAY__BULK__URL": "smtps://bulk:relaysecret@bulk.example.net",
        }
    )
    lines = startup_lines("scheduler", settings, {"MAILQUEUE_DATABASE_URL": "x"})
    assert lines == [
        (
            logging.INFO,
            "scheduler starting: database postgresql://app:***@db.internal/mail (environment); "
            "broker redis://:***@redis.internal:6379/0 (default); relays "
            "default=smtp://127.0.0.1:1025 (default), bulk=smtps://bulk:***@bulk.example.net "
            "(default)",
        )
    ]  # no warning: no default left over from an older version


# -- 3. configuration and connection mistakes: one line, exit 2 ----------------------


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MAILQUEUE_RELAY_URL": "http://mail.example.com"},
         ["relay 'default': the URL must start with smtp:// or smtps://, not http://",
          "smtp://user@mail.example.com:587"]),
        ({"MAILQUEUE_POOL_SIZE": "five"},
         ["MAILQUEUE_POOL_SIZE='five' is not a whole number (e.g. 10)"]),
        ({"MAILQUEUE_CONFIG": "missing.toml"},
         ["MAILQUEUE_CONFIG=missing.toml: cannot read the file (No such file or directory)",
          "fix the path or unset MAILQUEUE_CONFIG"]),
        ({"MAILQUEUE_CONFIG": "broken.toml"}, ["MAILQUEUE_CONFIG=broken.toml is not valid TOML"]),
        ({"MAILQUEUE_RELAY__BULK__URL": "smtp://b", "MAILQUEUE_RELAY__BULK__POOLSIZE": "3"},
         ["MAILQUEUE_RELAY__BULK__POOLSIZE (environment): unknown option 'poolsize'",
          "did you mean MAILQUEUE_RELAY__BULK__POOL_SIZE?"]),
        ({"MAILQUEUE_DATABSE_URL": "sqlite:////tmp/x.db"},
         ["MAILQUEUE_DATABSE_URL (environment) is not a mailqueue setting",
          "did you mean MAILQUEUE_DATABASE_URL?"]),
        ({"MAILQUEUE_DATABASE_URL": "mysq://mail:dbsecret@db/mail"},
         ["MAILQUEUE_DATABASE_URL='mysq://mail:***@db/mail' names no database SQLAlchemy knows",
          "postgresql://user@host/db"]),
        ({"MAILQUEUE_DATABASE_URL": "not a url"},
         ["MAILQUEUE_DATABASE_URL='not a url' is not a database URL"]),
        ({"MAILQUEUE_DATABASE_URL": "postgresql://mail:dbsecret@127.0.0.1:1/mail"},
         ["cannot use the database at postgresql://mail:***@127.0.0.1:1/mail",
          "Connection refused", "check MAILQUEUE_DATABASE_URL and that the server is up"]),
    ],
    ids=["relay-scheme", "number", "toml-missing", "toml-broken", "relay-option",
         "unknown-name", "database-scheme", "database-garbage", "database-unreachable"],
)  # fmt: skip
def test_configuration_mistakes_are_one_line_and_exit_2(tmp_path, env, words):
    (tmp_path / "broken.toml").write_text("[mailqueue\nbatch_size = 1\n")
    for args in (("list",), SEND):
        result = mq(*args, cwd=tmp_path, **env)
        line = only_line(result, *words)
        assert "secret" not in line


def test_a_worker_with_a_broker_url_kombu_cannot_use(tmp_path):
    result = mq(
        "worker",
        "-P",
        "solo",
        cwd=tmp_path,
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mq.db'}",
        MAILQUEUE_BROKER_URL="reddis://:brokersecret@127.0.0.1:6379/0",
    )
    error_line(
        result,
        "MAILQUEUE_BROKER_URL='reddis://:***@127.0.0.1:6379/0': No such transport: reddis",
        "use redis://host:6379/0",
    )
    assert "brokersecret" not in result.stderr


def test_a_missing_database_driver_names_the_extra_to_install(tmp_path):
    result = mq(
        "stats",
        cwd=tmp_path,
        prelude="import sys; sys.modules['psycopg'] = None  # as if not installed",
        MAILQUEUE_DATABASE_URL="postgresql://mail@127.0.0.1/mail",
    )
    only_line(
        result,
        "the database at postgresql://mail@127.0.0.1/mail needs the 'psycopg' driver",
        "pip install 'mailqueue[postgres]'",
    )


def test_the_dev_server_on_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mq("devserver", "--port", str(port), cwd=tmp_path)
    only_line(result, "--port: cannot listen", "address already in use", "give another --port")


def test_the_web_page_on_a_port_in_use_says_so_after_its_start_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mq(
            "web",
            "--no-auth-on-loopback",
            "--port",
            str(port),
            cwd=tmp_path,
            MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mq.db'}",
        )
    error_line(result, "--port: cannot listen", "give another --port")
    assert f"web starting: database sqlite:///{tmp_path / 'mq.db'} (environment" in result.stderr


def test_send_html_from_a_missing_file(tmp_path):
    result = mq(*SEND[:-2], "--html", "@nope.html", cwd=tmp_path)
    only_line(result, "html: cannot read 'nope.html': No such file or directory")


def test_debug_shows_the_traceback(tmp_path):
    result = mq("--debug", "list", cwd=tmp_path, MAILQUEUE_POOL_SIZE="five")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "ConfigError: MAILQUEUE_POOL_SIZE='five' is not a whole number" in result.stderr
