"""Install like a user: the wheel, a clean venv, only the extras a user picks.

The ``dev`` extra that the test suite runs in pulls in half of PyPI, so it
hides a missing dependency (issue #19: ``pip install '.[postgres]'`` and a
Redis broker failed on ``import kombu.transport.redis``, because kombu lists
``packaging`` only under its own ``redis`` extra). Here the wheel is built
from the checkout (``pip wheel --no-deps``), installed into a fresh venv with
one choice of extras, and real commands run from that venv.

The embedded default (no extras) runs in the normal suite; each further
choice costs a venv and an install (15-40 s with a warm pip cache), so those
are marked ``slow``. pip may download from the package index and reuses the
user's pip cache. A wheel that cannot be built or installed is a failure;
only off CI, with the package index unreachable, are the tests skipped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from .conftest import ON_CI, POSTGRES_URL, REDIS_URL, require, wait_until

ROOT = Path(__file__).resolve().parents[1]

# What pip prints when it cannot reach the package index (then, off CI only, skip).
_OFFLINE = (
    "Could not find a version that satisfies",
    "No matching distribution found",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no test settings, no venv of ours, no PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAILQUEUE_", "PYTHON", "VIRTUAL_ENV", "DJANGO_"))
    }
    env.update(extra)
    return env


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        args,
        cwd=cwd,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project's wheel, built from the checkout as ``pip wheel`` builds it for a
    user, and everything the build printed (``-v``: the build backend's own output)."""
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(ROOT)],
        cwd=out,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.fail(f"the wheel did not build:\n{built.stdout}\n{built.stderr}")
    (path,) = out.glob("mailqueue-*.whl")
    return path, built.stdout + built.stderr


@pytest.fixture(scope="module")
def wheel(built_wheel: tuple[Path, str]) -> Path:
    return built_wheel[0]


def test_the_wheel_builds_without_warnings(built_wheel):
    """setuptools says nothing about the build (it warned ~40 lines about each data
    folder it was not told of: issue #19, item 8). pip's own lines, which start with
    ``WARNING:`` at the margin (an index location in the user's pip config, pip run as
    root), are about the machine, not the project, and are left out."""
    _, output = built_wheel
    warnings = [
        line
        for line in output.splitlines()
        if re.search(r"warn|deprecat|!!", line, re.IGNORECASE) and not line.startswith("WARNING: ")
    ]
    assert warnings == [], "\n".join(warnings)


def test_the_wheel_holds_templates_static_files_and_migrations(built_wheel):
    """Every template, style sheet, admin template and migration of the checkout is in the
    wheel (a file left out breaks ``mailqueue web``, the Django admin or ``migrate``)."""
    path, _ = built_wheel
    with zipfile.ZipFile(path) as archive:
        inside = set(archive.namelist())
    wanted = {
        f"mailqueue/{file.relative_to(ROOT / 'mailqueue').as_posix()}"
        for folder in ("web/templates", "web/static", "contrib/django_admin/templates")
        for file in (ROOT / "mailqueue" / folder).rglob("*")
        if file.is_file() and "__pycache__" not in file.parts
    }
    wanted |= {
        f"mailqueue/_migrations/{file.relative_to(ROOT / 'migrations').as_posix()}"
        for file in (ROOT / "migrations").rglob("*")
        if file.is_file() and "__pycache__" not in file.parts
    }
    wanted.add("mailqueue/py.typed")
    assert any(name.endswith(".html") for name in wanted)  # the globs found the templates
    assert any(name.endswith(".css") for name in wanted)
    assert any("/django_admin/templates/admin/" in name for name in wanted)
    assert sorted(wanted - inside) == []


class Venv:
    """A fresh venv holding only the wheel and the extras it was asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"

    def run(self, *args: str, cwd: Path, env: dict[str, str], timeout: float = 120):
        program = args[0] if args[0].startswith("/") else str(self.bin / args[0])
        return _run([program, *args[1:]], cwd=cwd, env=env, timeout=timeout)


def install(wheel: Path, extras: str, where: Path) -> Venv:
    """``python -m venv`` then ``pip install 'mailqueue-….whl[extras]'``, as a user would."""
    venv = Venv(where / "venv")
    made = _run([sys.executable, "-m", "venv", str(venv.root)], cwd=where)
    assert made.returncode == 0, made.stderr
    target = f"{wheel}[{extras}]" if extras else str(wheel)
    done = _run(
        [str(venv.bin / "python"), "-m", "pip", "install", "--quiet", target],
        cwd=where,
        timeout=900,
    )
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if not ON_CI and any(sign in output for sign in _OFFLINE):
            pytest.skip(f"the package index is unreachable (pip: {output.strip()[-300:]})")
        pytest.fail(f"pip install {target!r} failed:\n{output}")
    return venv


def sqlite_env(where: Path, **extra: str) -> dict[str, str]:
    """The embedded default, with its files in ``where``."""
    return _clean_env(
        MAILQUEUE_DATABASE_URL=f"sqlite:///{where / 'mailqueue.db'}",
        MAILQUEUE_BROKER_URL=f"sqla+sqlite:///{where / 'broker.db'}",
        **extra,
    )


def send_and_check(venv: Venv, where: Path, env: dict[str, str]) -> str:
    """``mailqueue migrate`` then ``mailqueue send``: exit 0, the broker woken, the row queued."""
    migrated = venv.run("mailqueue", "migrate", cwd=where, env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    sent = venv.run(
        "mailqueue",
        *("send", "--from", "app@example.com", "--to", "ana@example.com"),
        *("--subject", "from a clean venv", "--text", "hello"),
        cwd=where,
        env=env,
    )
    assert sent.returncode == 0, sent.stderr
    assert "Traceback" not in sent.stderr, sent.stderr
    # The broker's transport imported and took the task: no fallback to the scheduler.
    assert "scheduler will pick" not in sent.stderr, sent.stderr
    message_id = sent.stdout.strip()
    shown = venv.run("mailqueue", "status", message_id, "--json", cwd=where, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "queued"
    return message_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_wheel_alone_runs_the_embedded_default(wheel, tmp_path, smtp_server):
    """No extras: the embedded default (SQLite, kombu's SQLite transport) queues a
    message, and ``send --now`` delivers one through the SMTP client."""
    venv = install(wheel, "", tmp_path)
    env = sqlite_env(tmp_path, MAILQUEUE_RELAY_URL=smtp_server.url)
    version = venv.run("mailqueue", "--version", cwd=tmp_path, env=env)
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stderr
    send_and_check(venv, tmp_path, env)
    now = venv.run(
        "mailqueue",
        *("send", "--now", "--from", "app@example.com", "--to", "bo@example.com", "--text", "x"),
        cwd=tmp_path,
        env=env,
    )
    assert now.returncode == 0, now.stderr
    assert [m.rcpt_tos for m in smtp_server.messages] == [("bo@example.com",)]


@pytest.fixture
def fresh_pg_database() -> Iterator[str]:
    """An empty PostgreSQL database (the venv's ``mailqueue migrate`` builds it)."""
    require("postgres")
    name = f"mq_install_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(POSTGRES_URL).set(database=name)
    # What a user writes: the plain driver-less URL (psycopg 3 is the one installed).
    yield url.set(drivername="postgresql").render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("extras", ["postgres,redis", "postgres"])
def test_the_production_stack_from_the_wheel(
    wheel, tmp_path, smtp_server, fresh_pg_database, spawn_venv, extras
):
    """PostgreSQL + Redis, with the extras a user of that stack picks (``postgres``
    brings the Redis transport too): ``check`` (unmigrated, then all ok), migrate,
    send, and a worker from the same venv delivers it."""
    import redis

    require("redis")
    venv = install(wheel, extras, tmp_path)
    queue = f"mq-install-{uuid.uuid4().hex[:8]}"
    env = _clean_env(
        MAILQUEUE_DATABASE_URL=fresh_pg_database,
        MAILQUEUE_BROKER_URL=REDIS_URL,
        MAILQUEUE_QUEUE=queue,
        MAILQUEUE_RELAY_URL=smtp_server.url,
    )
    unmigrated = venv.run("mailqueue", "check", cwd=tmp_path, env=env)
    assert unmigrated.returncode == 2, unmigrated.stdout + unmigrated.stderr
    assert "mailqueue migrate" in unmigrated.stdout + unmigrated.stderr
    message_id = send_and_check(venv, tmp_path, env)
    checked = venv.run("mailqueue", "check", cwd=tmp_path, env=env)  # the user's first check
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "PROBLEM" not in checked.stdout, checked.stdout
    assert redis.Redis.from_url(REDIS_URL).llen(queue) == 1  # the task is in Redis; check sent none
    spawn_venv(venv, tmp_path, env, "worker", "-P", "solo", "--loglevel", "WARNING")
    wait_until(lambda: smtp_server.messages, timeout=60, what="the worker's delivery")
    assert [m.rcpt_tos for m in smtp_server.messages] == [("ana@example.com",)]

    def status() -> str:
        shown = venv.run("mailqueue", "status", message_id, "--json", cwd=tmp_path, env=env)
        assert shown.returncode == 0, shown.stderr
        return str(json.loads(shown.stdout)["status"])

    wait_until(lambda: status() == "sent", timeout=30, what="the status to read sent")


@pytest.fixture
def spawn_venv() -> Iterator:
    """Start a long-running ``mailqueue`` command from a venv; stop it after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(venv: Venv, where: Path, env: dict[str, str], *args: str) -> Path:
        log = where / f"{args[0]}-{len(procs)}.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(venv.bin / "mailqueue"), *args],
                    cwd=where,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        return log

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


DJANGO_SCRIPT = """
import django
from django.conf import settings
settings.configure(
    EMAIL_BACKEND="mailqueue.contrib.django.EmailBackend",
    INSTALLED_APPS=[],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "django.db"}},
)
django.setup()
from django.core.mail import EmailMessage
msg = EmailMessage("from Django", "hello", "app@example.com", ["ana@example.com"])
assert msg.send() == 1
print(msg.mailqueue_id)
"""

FLASK_SCRIPT = """
from flask import Flask
from mailqueue.contrib.flask import MailQueue, Message
app = Flask(__name__)
app.config["MAILQUEUE_DEFAULT_SENDER"] = "app@example.com"
mail = MailQueue(app)
with app.app_context():
    print(mail.send(Message("from Flask", recipients=["ana@example.com"], body="hello")))
"""


@pytest.mark.slow
@pytest.mark.parametrize("extras, script", [("django", DJANGO_SCRIPT), ("flask", FLASK_SCRIPT)])
def test_a_framework_extra_queues_mail_from_the_framework(wheel, tmp_path, extras, script):
    """``mailqueue[django]`` / ``mailqueue[flask]``: the framework's own send queues a
    message on the embedded default, and the CLI of the same venv shows it queued."""
    venv = install(wheel, extras, tmp_path)
    env = sqlite_env(tmp_path)
    migrated = venv.run("mailqueue", "migrate", cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    (tmp_path / "send_one.py").write_text(script)
    sent = venv.run(str(venv.bin / "python"), "send_one.py", cwd=tmp_path, env=env)
    assert sent.returncode == 0, sent.stderr
    assert "scheduler will pick" not in sent.stderr, sent.stderr
    message_id = sent.stdout.strip().splitlines()[-1]
    shown = venv.run("mailqueue", "status", message_id, "--json", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "queued"


@pytest.mark.slow
def test_the_web_extra_serves_the_status_page(wheel, tmp_path, spawn_venv):
    """``mailqueue[web]``: ``mailqueue web`` starts and answers its JSON API."""
    venv = install(wheel, "web", tmp_path)
    env = sqlite_env(tmp_path, MAILQUEUE_WEB_TOKEN="tok-install")
    send_and_check(venv, tmp_path, env)
    port = free_port()
    log = spawn_venv(venv, tmp_path, env, "web", "--port", str(port))

    def stats() -> dict | None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/stats",
            headers={"Authorization": "Bearer tok-install"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except OSError:
            return None

    wait_until(lambda: stats() is not None, timeout=60, what=f"mailqueue web ({log})")
    assert "queued" in json.dumps(stats())


def test_make_demo_says_what_its_first_install_does(tmp_path):
    """The first ``make demo`` installs for a minute or two (issue #19, item 8): each
    step is announced before it runs, and the long install is not ``--quiet`` (pip
    prints each package and its progress). ``make -n`` lists the steps without running
    them, in a folder with no ``.venv`` yet."""
    (tmp_path / "pyproject.toml").touch()
    planned = _run(["make", "-n", "-f", str(ROOT / "Makefile"), "demo"], cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    steps = [line for line in planned.stdout.splitlines() if not line.startswith("make")]
    install = next(i for i, line in enumerate(steps) if "-e '.[dev]'" in line)
    assert "--quiet" not in steps[install]
    assert "installing mailqueue" in steps[install - 1] and steps[install - 1].startswith("echo")
    announced = [line for line in steps if line.startswith('echo "==> [')]
    assert len(announced) == 3  # venv, pip, the install
    assert steps[-1].endswith("mailqueue demo")
