"""The benchmark script runs end to end with tiny counts, so it cannot rot.

Not a timed test: it asserts that every phase produced its figures and that
every message reached the sink, never on how fast anything was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import POSTGRES_URL, REDIS_URL, require
from .system_packages import require_debian_packages

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stack", ["embedded", "pg"])
def test_bench_runs_on_each_stack(tmp_path, stack):
    # The first run on CI may install Postfix: the timeout above leaves room for it.
    require_debian_packages(["postfix"], ["/usr/sbin/smtp-sink"], "Postfix's smtp-sink")
    env = dict(os.environ)
    memory = ["--depth-rows", "0", "--attachment-mb", "0"]
    if stack == "pg":
        require("postgres")
        require("redis")
        env.update(MAILQUEUE_BENCH_POSTGRES_URL=POSTGRES_URL, MAILQUEUE_BENCH_REDIS_URL=REDIS_URL)
        memory = ["--depth-rows", "40", "--attachment-mb", "2"]  # the memory phases too
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ops" / "bench" / "run.py"),
            "--stacks", stack,
            "--messages", "60",
            "--warmup", "20",
            "--naive-messages", "10",
            "--enqueue-messages", "30",
            "--latency-calls", "5",
            "--multi-messages", "10",
            "--suppression-rows", "200",
            "--suppression-messages", "20",
            "--suppression-rounds", "2",
            *memory,
            "--concurrency", "1",
            "--pool-size", "2",
            "--timeout", "60",
            "--output", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list(out.glob("bench-*.json"))
    result = json.loads(path.read_text())
    assert result["sink"] == "postfix smtp-sink"
    [figures] = result["stacks"]
    assert figures["stack"] == stack
    phases = ("bare", "bare_pipelined", "naive", "mailqueue", "mailqueue_5_recipients")
    for phase in phases:
        assert figures[phase]["msg_per_s"] > 0, phase
        assert figures[phase]["cpu"]["client"]["processes"] >= 1, phase
    # CPU time is counted in 10 ms ticks: one tiny phase can read 0.0 (seen on a
    # busy machine), the whole run cannot.
    assert sum(figures[p]["cpu"]["client"]["cpu_s"] for p in phases) > 0
    assert figures["naive"]["sent"] == 10
    assert figures["mailqueue_5_recipients"]["recipients_per_s"] > 0
    assert figures["enqueue_many"]["msg_per_s"] > 0
    idle = figures["enqueue_many"]["idle_enqueue_latency"]
    assert 0 < idle["p50_ms"] <= idle["p99_ms"]
    assert all(v["raw_insert_p50_ms"] > 0 for v in idle["by_gap_ms"].values())  # the floor
    assert 0 < figures["enqueue_latency"]["p50_ms"] <= figures["enqueue_latency"]["p99_ms"]
    if stack == "pg":
        assert set(figures["memory_depth"]) == {"40"}
        assert figures["attachment"]
    assert set(figures["ratios"]) == {
        "mailqueue_over_bare",
        "bare_pipelined_over_bare",
        "mailqueue_over_naive",
    }
    assert "mailqueue_over_bare" in proc.stderr  # the printed summary
    sup = figures["suppression"]  # the list swapped in and out, every message still sent
    assert [r["suppression_rows"] for r in sup["runs"]["loaded"]] == [200, 200]
    assert [r["suppression_rows"] for r in sup["runs"]["empty"]] == [0, 0]
    assert all(r["msg_per_s"] > 0 for runs in sup["runs"].values() for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stack", ["embedded", "pg"])
def test_priority_bench_runs_on_each_stack(tmp_path, stack):
    """ops/bench/priority.py: every run reports its figures and every message is sent."""
    require_debian_packages(["postfix"], ["/usr/sbin/smtp-sink"], "Postfix's smtp-sink")
    env = dict(os.environ)
    if stack == "pg":
        require("postgres")
        require("redis")
        env.update(MAILQUEUE_BENCH_POSTGRES_URL=POSTGRES_URL, MAILQUEUE_BENCH_REDIS_URL=REDIS_URL)
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ops" / "bench" / "priority.py"),
            "--stack", stack,
            "--bulk", "300",
            "--high", "5",
            "--concurrency", "1",
            "--batch-size", "20",
            "--timeout", "120",
            "--output", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list(out.glob("priority-*.json"))
    report = json.loads(path.read_text())
    runs = {name: run for name, (run,) in report["runs"].items()}
    assert set(runs) == {"no_high", "lanes", "lanes_off"}
    for name, run in runs.items():
        assert run["bulk_msg_per_s"] > 0, name
    for name in ("lanes", "lanes_off"):
        waits = runs[name]["enqueue_to_250_s"]
        assert 0 < waits["p50"] <= waits["p99"] <= waits["max"], name
    assert (runs["lanes"]["high_priority"], runs["lanes_off"]["high_priority"]) == (
        "high",
        "normal",
    )
    assert report["summary"]["bulk_rate_lanes_over_no_high"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_unsubscribe_cost_script_runs():
    """ops/bench/unsubscribe_cost.py end to end with tiny counts: both variants deliver
    every recipient (the script exits non-zero otherwise) and print their figures."""
    require_debian_packages(["postfix"], ["/usr/sbin/smtp-sink"], "Postfix's smtp-sink")
    require("postgres")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    env["MAILQUEUE_BENCH_POSTGRES_URL"] = POSTGRES_URL
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "bench" / "unsubscribe_cost.py"),
         "--messages", "6", "--recipients", "3", "--rounds", "1"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plain" in proc.stdout and "unsubscribe" in proc.stdout
    assert proc.stdout.count("µs/recipient") == 2


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_bounce_bench_runs_and_every_report_bounces_its_row(database):
    args = ["--reports", "50"]
    if database == "postgres":
        require("postgres")
        args += ["--database-url", POSTGRES_URL]  # it makes and drops its own database
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "bench" / "bounces.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "50 DSNs ingested" in proc.stdout
    assert "50 rows bounced, 0 unmatched, 0 unparsed" in proc.stdout
