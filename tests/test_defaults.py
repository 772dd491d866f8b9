"""Defaults that cannot split one deployment in two (issue #19, item 9).

The default database and broker are absolute files in one folder per user
(``MAILQUEUE_HOME``, else the platform's user data folder), so processes
started in different working directories share them. An older version's
``./mailqueue.db`` in the working directory is kept, with a WARNING in the
start line that says how to move or pin it. Each test runs the real CLI as a
child process with the user data folder (``XDG_DATA_HOME``) inside its own
temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailqueue.config import settings_from_env
from mailqueue.errors import ConfigError
from mailqueue.logging_setup import startup_lines

SEND = ("send", "--from", "shop@example.com", "--to", "ana@example.org", "--text", "hi")


def mq(*args: str, cwd: Path, xdg: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``mailqueue ARGS`` in ``cwd``, as a user whose data folder is ``xdg``."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    child_env["XDG_DATA_HOME"] = str(xdg)
    child_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "mailqueue", *args],
        cwd=cwd,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / name for name in ("project", "elsewhere", "xdg")}
    for path in made.values():
        path.mkdir()
    return made


def test_processes_in_different_directories_share_the_default_database(folders):
    """Migrate in the project folder, send from another, read from ``/`` (where systemd
    starts a service): one database, in the user data folder, and none in either
    working directory."""
    xdg = folders["xdg"]
    ok(mq("migrate", cwd=folders["project"], xdg=xdg))
    message_id = ok(mq(*SEND, cwd=folders["elsewhere"], xdg=xdg)).strip()
    shown = json.loads(ok(mq("status", message_id, "--json", cwd=Path("/"), xdg=xdg)))
    assert shown["status"] == "queued"
    home = xdg / "mailqueue"
    assert (home / "mailqueue.db").is_file()
    assert (home / "mailqueue-broker.db").is_file()  # the send woke the broker there
    assert not list(folders["project"].iterdir())
    assert not list(folders["elsewhere"].iterdir())
    assert home.stat().st_mode & 0o777 == 0o700  # mail is private to its user


def test_mailqueue_home_moves_the_default_files(folders, tmp_path):
    home = tmp_path / "state"
    ok(mq("migrate", cwd=folders["project"], xdg=folders["xdg"], MAILQUEUE_HOME=str(home)))
    assert (home / "mailqueue.db").is_file()
    assert not (folders["xdg"] / "mailqueue").exists()


def test_a_relative_mailqueue_home_is_refused(folders):
    result = mq("stats", cwd=folders["project"], xdg=folders["xdg"], MAILQUEUE_HOME="state")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: MAILQUEUE_HOME='state' is not an absolute path: a relative folder differs "
        "between processes started in different directories; give a full path"
    )


def test_a_home_that_cannot_be_created_says_what_to_set(folders, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = mq(
        "stats", cwd=folders["project"], xdg=folders["xdg"], MAILQUEUE_HOME=str(blocker / "sub")
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot create mailqueue's default folder {blocker / 'sub'} (")
    assert line.endswith(
        "set MAILQUEUE_HOME to a writable folder, or MAILQUEUE_DATABASE_URL and "
        "MAILQUEUE_BROKER_URL"
    )


def test_an_older_versions_database_in_the_working_directory_is_kept(folders):
    """Mail queued by an older version (default ``./mailqueue.db``) is not abandoned:
    in that directory the default is still that file."""
    project, xdg = folders["project"], folders["xdg"]
    old = {"MAILQUEUE_DATABASE_URL": "sqlite:///mailqueue.db"}  # the old default, spelled out
    ok(mq("migrate", cwd=project, xdg=xdg, **old))
    message_id = ok(mq(*SEND, cwd=project, xdg=xdg, **old)).strip()
    shown = json.loads(ok(mq("status", message_id, "--json", cwd=project, xdg=xdg)))
    assert shown["status"] == "queued"
    assert not (xdg / "mailqueue" / "mailqueue.db").exists()


def test_the_start_line_warns_about_an_older_file_and_says_how_to_move_or_pin_it(
    folders, monkeypatch
):
    project, xdg = folders["project"], folders["xdg"]
    (project / "mailqueue.db").touch()
    monkeypatch.chdir(project)
    env = {"XDG_DATA_HOME": str(xdg)}
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    settings = settings_from_env(env)
    assert settings.database_url == f"sqlite:///{project / 'mailqueue.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{xdg / 'mailqueue' / 'mailqueue-broker.db'}"
    lines = startup_lines("web", settings, env)
    assert [level for level, _ in lines] == [logging.INFO, logging.WARNING]
    assert lines[1][1] == (
        f"web uses {project / 'mailqueue.db'}, left in the working directory by an older "
        "mailqueue whose default was relative: a process started in another directory uses "
        f"{xdg / 'mailqueue'} instead and never sees this mail. Either move the file(s) into "
        f"{xdg / 'mailqueue'} (with every mailqueue process stopped), or pin them in every "
        f"process with MAILQUEUE_DATABASE_URL=sqlite:///{project / 'mailqueue.db'}"
    )


def test_mailqueue_home_is_a_choice_an_older_file_does_not_override(folders, monkeypatch):
    project = folders["project"]
    (project / "mailqueue.db").touch()
    monkeypatch.chdir(project)
    home = folders["elsewhere"]
    env = {"MAILQUEUE_HOME": str(home)}
    settings = settings_from_env(env)
    assert settings.database_url == f"sqlite:///{home / 'mailqueue.db'}"
    assert [level for level, _ in startup_lines("worker", settings, env)] == [logging.INFO]


def test_the_start_line_names_the_default_folder(folders, monkeypatch):
    monkeypatch.chdir(folders["project"])
    env = {"MAILQUEUE_HOME": str(folders["elsewhere"])}
    ((level, text),) = startup_lines("scheduler", settings_from_env(env), env)
    file = folders["elsewhere"] / "mailqueue.db"
    assert text.startswith(
        f"scheduler starting: database sqlite:///{file} (default, in MAILQUEUE_HOME, file {file});"
    )


def test_a_setting_in_the_environment_wins_over_the_default_folder(tmp_path):
    env = {"MAILQUEUE_HOME": str(tmp_path / "h"), "MAILQUEUE_DATABASE_URL": "sqlite:////x/y.db"}
    settings = settings_from_env(env)
    assert settings.database_url == "sqlite:////x/y.db"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'h' / 'mailqueue-broker.db'}"


def test_mailqueue_home_relative_is_a_config_error_in_process():
    with pytest.raises(ConfigError, match="MAILQUEUE_HOME='rel' is not an absolute path"):
        settings_from_env({"MAILQUEUE_HOME": "rel"})
