"""Fixtures: real SMTP (the dev server), real databases built from the migrations.

Two stacks run the same tests:

* ``sqlite``:   a fresh SQLite file and kombu's SQLite transport (embedded default);
* ``postgres``: a fresh PostgreSQL database and Redis (production).

PostgreSQL and Redis are found at ``MAILQUEUE_TEST_POSTGRES_URL`` and
``MAILQUEUE_TEST_REDIS_URL`` (defaults: the local servers). When one is
unreachable the tests that need it are skipped with a reason, except with
``CI=true``, where they fail: CI must prove the production stack.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import mailqueue
from mailqueue.config import Settings, configure, settings_from_env
from mailqueue.devserver import DevServer
from mailqueue.migrate import upgrade
from mailqueue.store import Store, dispose_engines, get_engine

POSTGRES_URL = os.environ.get(
    "MAILQUEUE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("MAILQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_unreachable: dict[str, str] = {}


def _check_postgres() -> str | None:
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def _check_redis() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def require(service: str) -> None:
    """Skip (laptop) or fail (CI) when ``service`` is not reachable."""
    if service not in _unreachable:
        check = {"postgres": _check_postgres, "redis": _check_redis}[service]
        _unreachable[service] = check() or ""
    why = _unreachable[service]
    if why:
        if ON_CI:
            pytest.fail(f"CI=true and {service} is unreachable ({why}); CI must run against it")
        pytest.skip(f"{service} unreachable ({why}); skipped its tests")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ANN001
    missing = {k: v for k, v in _unreachable.items() if v}
    if missing:
        terminalreporter.section("services not reachable")
        for name, why in missing.items():
            terminalreporter.write_line(f"{name}: {why} -> its tests were skipped")


@dataclass
class Stack:
    name: str
    settings: Settings

    @property
    def engine(self) -> sa.Engine:
        return get_engine(self.settings.database_url)

    @property
    def store(self) -> Store:
        return Store(self.engine)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a child process (worker, scheduler, CLI) on this stack."""
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
        env.update(
            MAILQUEUE_DATABASE_URL=s.database_url,
            MAILQUEUE_BROKER_URL=s.broker_url,
            MAILQUEUE_QUEUE=s.queue_name,
            MAILQUEUE_RELAY_URL=s.relay.url,
            **{f"MAILQUEUE_RELAY__{n.upper()}__URL": r.url for n, r in s.relays.items()},
            MAILQUEUE_POOL_SIZE=str(s.relay.pool_size),
            MAILQUEUE_RETRY_BASE_S=str(s.retry_base_s),
            MAILQUEUE_RETRY_MAX_S=str(s.retry_max_s),
            MAILQUEUE_SCHEDULER_INTERVAL_S=str(s.scheduler_interval_s),
            MAILQUEUE_LEASE_S=str(s.lease_s),
            MAILQUEUE_REDISPATCH_AFTER_S=str(s.redispatch_after_s),
            MAILQUEUE_BATCH_SIZE=str(s.batch_size),
        )
        env.update(extra)
        return env

    def reconfigure(self, **overrides: object) -> Settings:
        from dataclasses import replace

        relay_fields = {k: overrides.pop(k) for k in list(overrides) if k.startswith("relay_")}
        settings = self.settings
        if relay_fields:
            settings = replace(
                settings,
                relay=replace(settings.relay, **{k[6:]: v for k, v in relay_fields.items()}),
            )
        self.settings = configure(settings, **overrides)
        return self.settings


RELAY_PATHS = ("sequential", "pipelined")
"""The two ways ``smtp.delivery`` sends: one command at a time, or PIPELINING (RFC 2920)."""


def pytest_configure(config: pytest.Config) -> None:
    """The default database and broker live in the user data folder (issue #19):
    the suite (and the processes it starts) keeps its own, never the real home's."""
    if "XDG_DATA_HOME" not in os.environ:
        import tempfile

        os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="mq-test-data-")
    config.addinivalue_line(
        "markers",
        "both_paths: run with the dev server without and with PIPELINING (both send paths)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or module) marked ``both_paths`` that uses ``smtp_server`` runs once per path."""
    if "smtp_server" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_paths"
    ):
        metafunc.parametrize("smtp_server", RELAY_PATHS, indirect=True)


PASSWORD = "s3cret-Pa55!"
"""The relay password of the TLS tests (``pki``'s password file, ``tls_server``'s user bob)."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A private CA (trustme), a server certificate for 127.0.0.1/localhost, one for
    another name, a client certificate, as PEM files, and a file holding ``PASSWORD``."""
    import trustme

    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    files: dict[str, str] = {"ca": str(root / "ca.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    for name, hosts in {
        "server": ("127.0.0.1", "localhost"),
        "other": ("mail.example.net",),
        "client": ("client.example.com",),
    }.items():
        cert = ca.issue_cert(*hosts)
        files[name] = str(root / f"{name}.pem")
        files[f"{name}_key"] = str(root / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(files[name])
        cert.private_key_pem.write_to_path(files[f"{name}_key"])
    files["password"] = str(root / "password")
    Path(files["password"]).write_text(PASSWORD + "\n")
    return files


@pytest.fixture
def tls_server(pki: dict[str, str]) -> Iterator[DevServer]:
    """STARTTLS on ``port``, implicit TLS on ``tls_port``, AUTH required (bob)."""
    server = DevServer(
        tls_cert=pki["server"],
        tls_key=pki["server_key"],
        tls_port=0,
        users={"bob": PASSWORD},
        require_auth=True,
    ).start()
    yield server
    server.stop()


@pytest.fixture
def smtp_server(request: pytest.FixtureRequest) -> Iterator[DevServer]:
    """The dev server; it offers PIPELINING only when the test runs on the ``pipelined`` path."""
    server = DevServer(pipelining=getattr(request, "param", "sequential") == "pipelined").start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def new_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    require("postgres")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(False)
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throw-away PostgreSQL database for this test session, migrated to head."""
    with new_pg_database("mq_test") as url:
        upgrade(url)
        yield url


@pytest.fixture
def empty_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """For a migration test parametrized by ``kind`` (``sqlite`` or ``postgres``): the
    URL of a new database with no tables yet."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    with new_pg_database("mq_mig") as url:
        yield url


def _truncate(url: str) -> None:
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM mq_bounce"))
        conn.execute(sa.text("DELETE FROM mq_recipient"))
        conn.execute(sa.text("DELETE FROM mq_message"))
        conn.execute(sa.text("DELETE FROM mq_relay"))  # no pause left over by an earlier test
        conn.execute(sa.text("DELETE FROM mq_suppression"))


def _base_settings(database_url: str, broker_url: str, relay_url: str, queue: str) -> Settings:
    from dataclasses import replace

    base = settings_from_env({})
    relay = replace(
        base.relay, url=relay_url, connect_timeout_s=5, command_timeout_s=10, data_timeout_s=10
    )
    return replace(
        base,
        database_url=database_url,
        broker_url=broker_url,
        queue_name=queue,
        retry_base_s=60.0,
        retry_max_s=600.0,
        scheduler_interval_s=0.5,
        relay=relay,
        # A second named relay (to the same dev server) for tests of per-relay behaviour.
        relays={"bulk": replace(relay, name="bulk")},
    )


def _make_stack(kind: str, tmp_path: Path, relay_url: str, request: pytest.FixtureRequest) -> Stack:
    queue = f"mq-test-{uuid.uuid4().hex[:8]}"
    if kind == "sqlite":
        db = tmp_path / "mailqueue.db"
        settings = _base_settings(
            f"sqlite:///{db}", f"sqla+sqlite:///{tmp_path / 'broker.db'}", relay_url, queue
        )
        upgrade(settings.database_url)
    else:
        require("redis")
        url = request.getfixturevalue("pg_database")
        _truncate(url)
        settings = _base_settings(url, REDIS_URL, relay_url, queue)
    return Stack(kind, configure(settings))


def _stack_fixture(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    smtp_server: DevServer = request.getfixturevalue("smtp_server")
    stack = _make_stack(kind, tmp_path, smtp_server.url, request)
    try:
        yield stack
    finally:
        mailqueue._reset_caches()
        configure(settings_from_env({}))


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """Both stacks, each fresh, configured process-wide, relaying to ``smtp_server``."""
    yield from _stack_fixture(request.param, request, tmp_path)


@pytest.fixture
def pg_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The production stack only (PostgreSQL + Redis), for what exists only there."""
    yield from _stack_fixture("postgres", request, tmp_path)


@pytest.fixture
def sqlite_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The embedded default only (SQLite file + kombu's SQL transport)."""
    yield from _stack_fixture("sqlite", request, tmp_path)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``python -m mailqueue ...`` children; SIGTERM (then kill) after the test."""
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str]) -> Proc:
        log = tmp_path / f"proc-{len(procs)}.log"
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(
                [sys.executable, "-m", "mailqueue", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(popen, log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.popen.poll() is None:
            proc.popen.terminate()
    for proc in procs:
        try:
            proc.popen.wait(20)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> None:
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")


BOUNCE_DOMAIN = "bounce.example.com"
BOUNCE_SECRET = "b" * 32


@pytest.fixture
def verp(stack: Stack, smtp_server: DevServer, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """``stack`` with a bounce domain: each recipient sent with its own VERP return path."""
    monkeypatch.setenv("MAILQUEUE_BOUNCE_SECRET", BOUNCE_SECRET)
    stack.reconfigure(bounce_domain=BOUNCE_DOMAIN)
    return stack


@pytest.fixture
def endpoint(verp: Stack) -> Iterator[Any]:
    """``mailqueue bounces serve``'s server for ``verp``'s bounce domain, on a free port."""
    from mailqueue.bounceserver import BounceServer

    server = BounceServer(settings=verp.settings).start()
    yield server
    server.stop()
