"""The benchmark script runs end to end with tiny counts, so it cannot rot.

Not a timed test: it asserts that every phase produced its figures and that
every message reached the sink, never on how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .system_packages import require_debian_packages

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_runs_on_the_embedded_stack(tmp_path):
    # The first run on CI may install Postfix: the timeout above leaves room for it.
    require_debian_packages(["postfix"], ["/usr/sbin/smtp-sink"], "Postfix's smtp-sink")
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ops" / "bench" / "run.py"),
            "--stacks", "embedded",
            "--messages", "60",
            "--warmup", "20",
            "--naive-messages", "10",
            "--enqueue-messages", "30",
            "--latency-calls", "5",
            "--multi-messages", "10",
            "--depth-rows", "0",
            "--attachment-mb", "0",
            "--concurrency", "1",
            "--pool-size", "2",
            "--timeout", "60",
            "--output", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list(out.glob("bench-*.json"))
    result = json.loads(path.read_text())
    assert result["sink"] == "postfix smtp-sink"
    [stack] = result["stacks"]
    assert stack["stack"] == "embedded"
    for phase in ("bare", "bare_pipelined", "naive", "mailqueue", "mailqueue_5_recipients"):
        assert stack[phase]["msg_per_s"] > 0, phase
        assert stack[phase]["cpu"]["client"]["cpu_s"] > 0, phase
    assert stack["naive"]["sent"] == 10
    assert stack["mailqueue_5_recipients"]["recipients_per_s"] > 0
    assert stack["enqueue_many"]["msg_per_s"] > 0
    assert 0 < stack["enqueue_latency"]["p50_ms"] <= stack["enqueue_latency"]["p99_ms"]
    assert set(stack["ratios"]) == {
        "mailqueue_over_bare",
        "bare_pipelined_over_bare",
        "mailqueue_over_naive",
    }
    assert "mailqueue_over_bare" in proc.stderr  # the printed summary
