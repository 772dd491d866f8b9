"""``mailqueue check`` (issue #19): every part of a setup tried for real, no message sent.

Each test runs the real CLI as a child process against real servers: the dev
server with STARTTLS, implicit TLS and AUTH (certificates made by trustme),
the SQLite and the PostgreSQL + Redis stacks, and the usual mistakes (a wrong
password, an untrusted certificate, a relay that is not there, a database
never migrated, a broker that is down). What is asserted is what the operator
sees: one line per check, the exit status, no password, nothing delivered.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from mailqueue.devserver import DevServer

from .conftest import REDIS_URL, require


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(env: dict[str, str], *args: str, cwd: Path | None = None):
    """``mailqueue check ARGS`` in a child process with exactly ``env``'s MAILQUEUE_* names."""
    child = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    child.update({k: v for k, v in env.items() if k.startswith("MAILQUEUE_")})
    result = subprocess.run(
        [sys.executable, "-m", "mailqueue", "check", *args],
        env=child,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def lines(result) -> dict[str, str]:
    """``{check name: whole line}`` of the text output."""
    out = {}
    for line in result.stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        assert verdict in ("ok", "PROBLEM"), line
        out[rest.strip().split(":")[0]] = line
    return out


def tls_relays(server: DevServer, pki: dict[str, str], password: str | None = None) -> dict:
    """The default relay on STARTTLS and a 'bulk' relay on implicit TLS, both with AUTH."""
    auth = f"bob:{password}" if password else "bob"
    secret = "" if password else f"&password_file={pki['password']}"
    query = f"?tls_ca_file={pki['ca']}{secret}&connect_timeout_s=5"
    return {
        "MAILQUEUE_RELAY_URL": f"smtp://{auth}@127.0.0.1:{server.port}{query}&starttls=required",
        "MAILQUEUE_RELAY__BULK__URL": f"smtps://{auth}@127.0.0.1:{server.tls_port}{query}",
    }


def test_everything_ok_on_sqlite_with_starttls_implicit_tls_and_auth(sqlite_stack, tls_server, pki):
    result = check(sqlite_stack.env(**tls_relays(tls_server, pki)))
    assert result.returncode == 0, result.stdout + result.stderr
    seen = lines(result)
    assert list(seen) == ["settings", "database", "broker", "relay default", "relay bulk"]
    assert all(line.startswith("ok ") for line in seen.values())
    assert "STARTTLS TLSv1" in seen["relay default"] and "AUTH as 'bob'" in seen["relay default"]
    assert "implicit TLS TLSv1" in seen["relay bulk"] and "AUTH as 'bob'" in seen["relay bulk"]
    assert "tables at the code's revision" in seen["database"]
    # Logged in twice, QUIT, and not one message sent.
    assert [(user, ok) for _, user, ok in tls_server.auth_attempts] == [("bob", True)] * 2
    assert tls_server.messages == []


def test_everything_ok_on_postgres_and_redis_with_cluster_limits(pg_stack, smtp_server):
    env = pg_stack.env(
        MAILQUEUE_RELAY__BULK__URL=f"{smtp_server.url}?cluster_max_connections=2",
        MAILQUEUE_LIMITS_REDIS_URL=REDIS_URL,
    )
    result = check(env, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True
    by_name = {c["check"]: c for c in data["checks"]}
    assert list(by_name) == [
        "settings",
        "database",
        "broker",
        "relay default",
        "relay bulk",
        "cluster limits",
    ]
    assert all(c["ok"] and c["fix"] is None for c in data["checks"])
    assert by_name["broker"]["detail"] == f"{REDIS_URL} reachable"
    assert "relays bulk" in by_name["cluster limits"]["detail"]
    assert smtp_server.messages == []


def test_a_wrong_password_is_an_auth_error_and_never_shown(sqlite_stack, tls_server, pki):
    result = check(sqlite_stack.env(**tls_relays(tls_server, pki, password="Wr0ngPassw0rd")))
    assert result.returncode == 2
    seen = lines(result)
    for name in ("relay default", "relay bulk"):
        assert seen[name].startswith("PROBLEM  " + name + ": AuthError: ")
        assert "refused the credentials of 'bob'" in seen[name]
        assert "check the relay's user name and password" in seen[name]
    assert seen["database"].startswith("ok ") and seen["broker"].startswith("ok ")
    assert "Wr0ngPassw0rd" not in result.stdout + result.stderr
    assert "bob:***@" in seen["settings"] or "bob:***@" in seen["relay default"]
    assert tls_server.messages == []


def test_an_untrusted_certificate_is_a_tls_error_and_no_credentials_go_out(
    sqlite_stack, tls_server, pki
):
    url = f"smtp://bob@127.0.0.1:{tls_server.port}?password_file={pki['password']}"
    result = check(sqlite_stack.env(MAILQUEUE_RELAY_URL=url, MAILQUEUE_RELAY__BULK__URL=url))
    assert result.returncode == 2
    line = lines(result)["relay default"]
    assert line.startswith("PROBLEM  relay default: TLSError: ")
    assert "did not verify" in line and "tls_ca_file" in line
    assert tls_server.auth_attempts == [] and tls_server.messages == []


def test_an_unreachable_relay_unmigrated_database_and_broker_down_each_say_what_to_do(
    tmp_path,
):
    require("redis")
    port, broker_port = closed_port(), closed_port()
    env = {
        "MAILQUEUE_DATABASE_URL": f"sqlite:///{tmp_path / 'never-migrated.db'}",
        "MAILQUEUE_BROKER_URL": f"redis://:brokerpw@127.0.0.1:{broker_port}/0",
        "MAILQUEUE_LIMITS_REDIS_URL": REDIS_URL,
        "MAILQUEUE_RELAY_URL": f"smtp://127.0.0.1:{port}?connect_timeout_s=3",
    }
    result = check(env, cwd=tmp_path)
    assert result.returncode == 2
    seen = lines(result)
    assert seen["settings"].startswith("ok ")
    assert seen["database"].startswith("PROBLEM  database: ")
    assert "run `mailqueue migrate`" in seen["database"]
    assert not (tmp_path / "never-migrated.db").exists()  # check creates nothing
    assert seen["broker"].startswith(
        f"PROBLEM  broker: cannot reach redis://:***@127.0.0.1:{broker_port}/0"
    )
    assert "check MAILQUEUE_BROKER_URL and that the broker is running" in seen["broker"]
    assert seen["relay default"].startswith("PROBLEM  relay default: ConnectError: cannot connect")
    assert f"127.0.0.1:{port}" in seen["relay default"]
    assert "check the relay's host and port" in seen["relay default"]
    assert "brokerpw" not in result.stdout + result.stderr

    data = json.loads(check(env, "--json", cwd=tmp_path).stdout)
    assert data["ok"] is False
    assert [c["ok"] for c in data["checks"]] == [True, False, False, False]
    assert "brokerpw" not in json.dumps(data)


def test_bad_settings_are_one_problem_and_nothing_else_is_tried(tmp_path):
    bad = check({"MAILQUEUE_POOL_SIZE": "five"}, cwd=tmp_path)
    assert bad.returncode == 2
    (line,) = bad.stdout.splitlines()
    assert line.startswith("PROBLEM  settings: ") and "MAILQUEUE_POOL_SIZE='five'" in line

    no_redis = check(
        {"MAILQUEUE_RELAY_URL": "smtp://127.0.0.1:1025?cluster_max_connections=2"}, cwd=tmp_path
    )
    assert no_redis.returncode == 2
    (line,) = no_redis.stdout.splitlines()
    assert line.startswith("PROBLEM  settings: ") and "set MAILQUEUE_LIMITS_REDIS_URL" in line
    assert list(tmp_path.iterdir()) == []  # no database, no broker file


def test_a_broker_transport_that_cannot_load_names_the_extra(tmp_path):
    """As after ``pip install '.[postgres]'`` with a Redis broker (issue #19, item 4)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    env["MAILQUEUE_BROKER_URL"] = "redis://127.0.0.1:6379/0"
    code = "import sys\nsys.modules['redis'] = None\nfrom mailqueue.cli import main\nmain()"
    result = subprocess.run(
        [sys.executable, "-c", code, "check"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr and result.returncode == 2
    line = lines(result)["broker"]
    assert line.startswith("PROBLEM  broker: redis://127.0.0.1:6379/0: kombu cannot load")
    assert line.endswith("pip install 'mailqueue[redis]' (from a checkout: pip install '.[redis]')")
