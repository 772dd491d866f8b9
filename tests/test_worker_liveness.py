"""Alive means working (issue #21): a worker that cannot consume exits non-zero, says so
to a probe and a metric, and a stop the way it is deployed finishes what is in flight.

Real ``mailqueue worker`` processes against a real broker and the dev SMTP server;
outcomes judged by exit statuses, what the SMTP server received and the status table.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

import mailqueue
from mailqueue import Message
from mailqueue.cli import cli

from .conftest import Proc, wait_until
from .test_delivery import deliver
from .test_faults import all_terminal, received, statuses
from .test_faults import private_redis as private_redis  # the fixture
from .test_metrics import _free_port, sample, scrape

CONSUMING = ("mailqueue_worker_consuming", ())


def consuming(port: int) -> float | None:
    try:
        return scrape(port).get(CONSUMING)
    except OSError:
        return None


def check_health(env: dict[str, str], max_age: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailqueue", "worker", "--check-health", "--max-age", str(max_age)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --------------------------------------------------------------------------- the probe


def test_check_health_reads_the_heartbeat_file(tmp_path, monkeypatch):
    beat = tmp_path / "worker.health"
    runner = CliRunner()
    monkeypatch.delenv("MAILQUEUE_HEALTH_FILE", raising=False)
    out = runner.invoke(cli, ["worker", "--check-health"])
    assert out.exit_code == 1 and "MAILQUEUE_HEALTH_FILE is not set" in out.output

    monkeypatch.setenv("MAILQUEUE_HEALTH_FILE", str(beat))
    out = runner.invoke(cli, ["worker", "--check-health"])
    assert out.exit_code == 1 and "no heartbeat" in out.output

    beat.touch()
    out = runner.invoke(cli, ["worker", "--check-health", "--max-age", "30"])
    assert out.exit_code == 0 and "consuming" in out.output

    old = time.time() - 120
    os.utime(beat, (old, old))
    out = runner.invoke(cli, ["worker", "--check-health", "--max-age", "30"])
    assert out.exit_code == 1 and "not consuming" in out.output


def test_a_bad_stall_setting_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setenv("MAILQUEUE_WORKER_STALL_S", "soon")
    out = CliRunner().invoke(cli, ["worker"])
    assert out.exit_code == 2 and "MAILQUEUE_WORKER_STALL_S='soon'" in out.output


@pytest.mark.slow
def test_a_consuming_worker_is_healthy_and_a_stopped_one_is_not(
    stack, smtp_server, spawn, tmp_path
):
    """Both brokers (Redis and the SQL transport): heartbeat, gauge, and exit 0 on SIGTERM."""
    port = _free_port()
    env = stack.env(
        MAILQUEUE_HEALTH_FILE=str(tmp_path / "worker.health"),
        MAILQUEUE_METRICS_PORT=str(port),
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = spawn("worker", "-c", "1", "-l", "WARNING", env=env)
    wait_until(lambda: check_health(env).returncode == 0, timeout=60, what="a healthy probe")
    wait_until(lambda: consuming(port) == 1, what="mailqueue_worker_consuming 1")
    mid = mailqueue.enqueue(Message(sender="a@example.com", to="x@example.com", text="t"))
    wait_until(lambda: mailqueue.get_status(mid).status == "sent", what="a delivery")

    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(60) == 0, worker.output()
    probe = check_health(env)
    assert probe.returncode == 1 and "no heartbeat" in probe.stderr


# --------------------------------------------------------------------------- dead consumers


@pytest.mark.slow
def test_a_broker_that_never_comes_back_ends_the_worker_with_status_1(
    pg_stack, smtp_server, spawn, private_redis, tmp_path
):
    private_redis.start()
    pg_stack.reconfigure(broker_url=private_redis.url)
    port = _free_port()
    env = pg_stack.env(
        MAILQUEUE_WORKER_STALL_S="8",
        MAILQUEUE_HEALTH_FILE=str(tmp_path / "worker.health"),
        MAILQUEUE_METRICS_PORT=str(port),
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = spawn("worker", "-c", "1", "-l", "WARNING", env=env)
    wait_until(lambda: consuming(port) == 1, timeout=60, what="the worker to consume")

    private_redis.kill()  # and never started again
    wait_until(lambda: consuming(port) == 0, timeout=30, what="mailqueue_worker_consuming 0")
    wait_until(
        lambda: check_health(env, max_age=3).returncode == 1, timeout=30, what="an unhealthy probe"
    )
    status = worker.popen.wait(90)
    out = worker.output()
    assert status == 1, out
    assert "has not consumed from the broker" in out and "MAILQUEUE_WORKER_STALL_S" in out


UNRECOVERABLE = """
import sys
from celery import bootsteps
from mailqueue.cli import cli
from mailqueue.worker.app import get_app

class RestoreUnackedFails(bootsteps.StartStopStep):
    # What kombu's restore_unacked raised on a channel that died with Redis (issue #21).
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

get_app().steps["consumer"].add(RestoreUnackedFails)
cli(["worker", "-P", "solo", "-l", "WARNING"])
"""


@pytest.mark.slow
def test_an_unrecoverable_consumer_error_ends_the_worker_with_status_1(
    pg_stack, smtp_server, tmp_path
):
    """Celery logs 'Unrecoverable error' and stops with 1; the process used to exit 0."""
    script = tmp_path / "worker_with_a_broken_consumer.py"
    script.write_text(UNRECOVERABLE)
    run = subprocess.run(
        [sys.executable, str(script)],
        env=pg_stack.env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Unrecoverable error" in run.stderr and "hostname" in run.stderr


# --------------------------------------------------------------------------- the window


def test_each_committed_outcome_is_timed_from_its_reply(stack, smtp_server):
    """``mailqueue_record_lag_seconds``: one observation per message whose outcome was
    committed, the time a kill would have made it a resend."""
    before = sample("mailqueue_record_lag_seconds_count")
    smtp_server.reject = ["no@*"]
    ids = mailqueue.enqueue_many(
        [Message(sender="a@example.com", to=f"w{i}@example.com", text="t") for i in range(3)]
        + [Message(sender="a@example.com", to="no@example.com", text="t")]
    )
    deliver(stack, ids)
    assert [mailqueue.get_status(i).status for i in ids] == ["sent", "sent", "sent", "failed"]
    assert sample("mailqueue_record_lag_seconds_count") == before + 4
    assert sample("mailqueue_record_lag_seconds_sum") > 0


# --------------------------------------------------------------------------- stops


MOMENTS = ("start", "idle", "mid-batch")
UNIT = Path(__file__).resolve().parents[1] / "ops" / "systemd" / "mailqueue-worker@.service"


def _unit_concurrency() -> str:
    """The worker concurrency the shipped systemd unit runs: the stop tests use the same."""
    found = re.search(r"^ExecStart=.*--concurrency[ =](\d+)", UNIT.read_text(), re.MULTILINE)
    assert found, f"{UNIT} no longer names --concurrency: update this test with it"
    return found.group(1)


def _spawn_group_leader(env: dict[str, str], log: Path) -> Proc:
    """``mailqueue worker`` as the shipped unit runs it (prefork), in its own process
    group: the group is what systemd's default KillMode and supervisors signal."""
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "mailqueue", "worker", "--concurrency", _unit_concurrency()]
            + ["--loglevel", "INFO"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Proc(popen, log)


def _stop_tries(
    stack, smtp_server, spawn, tmp_path, tries: int, rng: random.Random, targets: tuple[str, ...]
) -> None:
    stack.reconfigure(batch_size=5, lease_s=30.0)
    smtp_server.faults.reply_delay_s = 0.02  # a batch takes long enough to stop in its middle
    env = stack.env()
    addresses: list[str] = []
    for n in range(tries):
        target = targets[n % len(targets)]
        moment = MOMENTS[(n // len(targets)) % len(MOMENTS)]
        log = tmp_path / f"worker-{n}-{target}-{moment}.log"
        before = len(smtp_server.messages)
        batch = [f"t{n}r{i}@example.com" for i in range(30)] if moment == "mid-batch" else []
        proc = _spawn_group_leader(env, log)
        try:
            if moment == "start":
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                wait_until(
                    lambda: "ready." in proc.output(),  # noqa: B023 - called right here
                    timeout=60,
                    what="worker ready",
                )
                if moment == "idle":
                    time.sleep(rng.uniform(0.0, 1.5))
            if batch:
                mailqueue.enqueue_many(
                    Message(sender="app@example.com", to=a, text="t") for a in batch
                )
                addresses.extend(batch)
                wait_until(
                    lambda: len(smtp_server.messages) >= before + 3,  # noqa: B023
                    timeout=60,
                    what="the batch under way",
                )
            if target == "group":
                os.killpg(proc.popen.pid, signal.SIGTERM)
            else:
                proc.popen.send_signal(signal.SIGTERM)
            try:
                # A hang detector, not a timing assertion: the unit's stop timeout is 120 s.
                status = proc.popen.wait(120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"try {n} ({target}, {moment}): the worker hung\n{proc.output()}")
        finally:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        out = proc.output()
        # SIGTERM before Celery installed its handlers ends the process by the signal;
        # it had claimed nothing then. Otherwise: a stop asked for is status 0.
        allowed = (0, -signal.SIGTERM) if moment == "start" else (0,)
        assert status in allowed, f"try {n} ({target}, {moment}): status {status}\n{out}"
        assert "WorkerLostError" not in out, f"try {n}: a child died mid-task\n{out}"
        assert statuses(stack)["sending"] == 0, f"try {n} ({target}, {moment}) left leases"

    # Whatever the stops left queued is delivered now; every recipient exactly once.
    spawn("worker", "-c", "2", "-l", "WARNING", env=env)
    spawn("scheduler", env=env)
    n_messages = len(addresses)
    wait_until(lambda: all_terminal(stack, n_messages), timeout=120, what="the rest")
    assert received(smtp_server) == Counter({a: 1 for a in addresses})
    assert statuses(stack)["sent"] == n_messages


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_the_group_stops_cleanly_right_after_start_idle_and_mid_batch(
    pg_stack, smtp_server, spawn, tmp_path
):
    """Three tries, one at each moment, SIGTERM to the whole process group."""
    _stop_tries(
        pg_stack, smtp_server, spawn, tmp_path, tries=3, rng=random.Random(21), targets=("group",)
    )


@pytest.mark.slow
@pytest.mark.timeout(7200)  # each try has its own hang detector (120 s)
def test_sigterm_to_the_group_or_the_main_process_stops_cleanly_many_times(
    pg_stack, smtp_server, spawn, tmp_path
):
    """Both targets at each moment, random delays: 6 tries in every run (3 to the group,
    3 to the main process), which keeps the suite within its time. The intermittent hang
    needs a longer series, a soak run outside the suite (ops/RUNBOOK.md, "Stopping"):
    ``MAILQUEUE_TEST_STOP_TRIES=40`` (the issue's 20 + 20; 40 of 40 passed when written)."""
    tries = int(os.environ.get("MAILQUEUE_TEST_STOP_TRIES", "6"))
    _stop_tries(
        pg_stack, smtp_server, spawn, tmp_path, tries, random.Random(), targets=("group", "main")
    )
