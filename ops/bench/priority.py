"""Priority lanes under load (issue #17): does a password reset wait behind a newsletter?

    .venv/bin/python ops/bench/priority.py                       # 50,000 bulk, 200 high
    .venv/bin/python ops/bench/priority.py --bulk 10000 --stack embedded

Against Postfix's ``smtp-sink`` with real ``mailqueue worker`` processes, three
runs on a fresh queue each:

* ``no_high``    the bulk messages alone: the drain rate to compare with;
* ``lanes``      the bulk messages (``priority="bulk"``) queued and draining at
                 full speed; meanwhile ``--high`` messages are enqueued one at a
                 time with ``priority="high"``, spread over the drain;
* ``lanes_off``  the same, everything ``normal`` (one queue, first in first out:
                 what mailqueue did before lanes).

For each high message: enqueue → 250, from the client's clock just before
``enqueue()`` to its recipient's ``sent_at`` (written when the relay's reply
to DATA arrives), as p50/p99/max. Bulk drain rate: bulk messages over the
span between the first and the last bulk ``sent_at``. Shares the helpers of
``run.py`` (sink, stacks, workers, progress line); writes a JSON file to
``ops/bench/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402 - run.py is a sibling script, not a package
    Children,
    Monitor,
    Sink,
    Stack,
    make_message,
    prepare_many,
    progress,
    say,
    start_workers,
    tree,
    write_prepared,
)


def _sent_at(stack: Stack, prefix: str) -> list[dt.datetime]:
    """``sent_at`` of the recipients whose message's subject starts with ``prefix``."""
    with stack.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT r.sent_at FROM mq_recipient r JOIN mq_message m ON m.id = r.message_id "
                "WHERE m.subject LIKE :p AND r.sent_at IS NOT NULL"
            ),
            {"p": prefix + "%"},
        ).scalars()
        return [_aware(t) for t in rows]


def _aware(value: Any) -> dt.datetime:
    if isinstance(value, str):  # SQLite hands back text through a raw query
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _counts(stack: Stack) -> dict[str, int]:
    with stack.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT m.priority, count(*) FROM mq_recipient r "
                "JOIN mq_message m ON m.id = r.message_id WHERE r.status = 'sent' "
                "GROUP BY m.priority"
            )
        ).all()
    words = {0: "high", 1: "normal", 2: "bulk"}
    return {words.get(p, str(p)): n for p, n in rows}


def _wait(stack: Stack, total: int, label: str, timeout: float) -> None:
    started = time.monotonic()
    while True:
        counts = _counts(stack)
        done = sum(counts.values())
        shown = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        progress(f"[{label}] sent {done}/{total} ({shown}) {time.monotonic() - started:.0f}s")
        if done >= total:
            return
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{label}: timed out with {done}/{total} sent")
        time.sleep(0.5)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def one_run(
    stack: Stack,
    args: argparse.Namespace,
    label: str,
    high: int,
    lanes: bool,
    gap_s: float,
    worker: Any = None,
) -> dict[str, Any]:
    """Queue the bulk backlog, enqueue ``high`` urgent messages one at a time while it
    drains, wait for everything, and read the timings back from the rows."""
    import mailqueue

    stack.clear()
    bulk_word = "bulk" if lanes else "normal"
    high_word = "high" if lanes else "normal"
    bulk_lane = 2 if lanes else 1
    prepared = [dataclasses.replace(p, priority=bulk_lane) for p in prepare_many(args.bulk)]
    say(f"[{label}] queueing {args.bulk} {bulk_word} messages")
    # Worker CPU per message: what the drain costs, steadier than its rate on a
    # shared machine (other jobs take the cores, not the CPU seconds).
    monitor = Monitor({"workers": lambda: tree(worker.pid) if worker else []}, 0.5)
    monitor.start()
    t0 = time.monotonic()
    write_prepared(prepared)
    say(f"[{label}] queued in {time.monotonic() - t0:.1f}s")

    starts: dict[str, dt.datetime] = {}
    if high:
        # Let the drain run at full speed before the first urgent message.
        while sum(_counts(stack).values()) < min(args.bulk // 10, 5000):
            time.sleep(0.1)
        urgent = [
            dataclasses.replace(make_message(args.bulk + i), subject=f"urgent {i:04d}")
            for i in range(high)
        ]
        for i, message in enumerate(urgent):
            starts[message.subject] = dt.datetime.now(dt.UTC)
            mailqueue.enqueue(message, priority=high_word)
            progress(f"[{label}] urgent {i + 1}/{high} enqueued")
            time.sleep(gap_s)
    _wait(stack, args.bulk + high, label, args.timeout)
    worker_cpu_s = monitor.finish()["workers"]["cpu_s"]

    bulk_times = sorted(_sent_at(stack, "bench message"))
    span = (bulk_times[-1] - bulk_times[0]).total_seconds()
    result: dict[str, Any] = {
        "bulk_messages": args.bulk,
        "bulk_priority": bulk_word,
        "bulk_drain_s": round(span, 2),
        "bulk_msg_per_s": round(len(bulk_times) / span, 1) if span > 0 else None,
        "worker_cpu_us_per_msg": round(worker_cpu_s / (args.bulk + high) * 1e6, 1),
    }
    if high:
        with stack.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT m.subject, r.sent_at FROM mq_recipient r "
                    "JOIN mq_message m ON m.id = r.message_id WHERE m.subject LIKE 'urgent %'"
                )
            ).all()
        waits = [(_aware(sent) - starts[subject]).total_seconds() for subject, sent in rows]
        last_bulk = bulk_times[-1]
        result.update(
            high_messages=high,
            high_priority=high_word,
            high_gap_s=round(gap_s, 4),
            enqueue_to_250_s={
                "p50": round(statistics.median(waits), 3),
                "p99": round(_quantile(waits, 0.99), 3),
                "max": round(max(waits), 3),
                "min": round(min(waits), 3),
            },
            high_sent_after_last_bulk=sum(1 for _, sent in rows if _aware(sent) > last_bulk),
        )
    say(f"[{label}] {json.dumps(result)}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", default="pg", choices=["pg", "embedded"])
    p.add_argument("--bulk", type=int, default=50000, help="bulk messages queued at once")
    p.add_argument("--high", type=int, default=200, help="urgent messages, one enqueue each")
    p.add_argument("--concurrency", type=int, default=2, help="worker processes (prefork)")
    p.add_argument("--pool-size", type=int, default=4, help="connections per worker process")
    p.add_argument("--batch-size", type=int, default=200, help="ids per Celery task")
    p.add_argument(
        "--runs", default="no_high,lanes,lanes_off", help="comma list: no_high, lanes, lanes_off"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of the runs, interleaved (a busy host drifts)"
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--output", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logdir = Path(tempfile.mkdtemp(prefix="mq-bench-logs-"))
    children = Children(logdir)
    sink = Sink(children)
    workdir = Path(tempfile.mkdtemp(prefix="mq-bench-priority-"))
    stack = Stack(args.stack, workdir, sink, args)
    say(f"sink: {sink.kind} on {sink.url}; child logs in {logdir}")
    result: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "sink": sink.kind,
        "stack": args.stack,
        "runs": {},
    }
    try:
        stack.activate()
        worker = start_workers(stack, children, args.concurrency)
        # Warm the workers (imports, pools) so the first run is not charged for it.
        one_run(stack, argparse.Namespace(**{**vars(args), "bulk": 500}), "warm-up", 0, True, 0)
        drain_s = None
        for round_no in range(args.repeat):
            for name in args.runs.split(","):
                label = f"{name} {round_no + 1}/{args.repeat}"
                if name == "no_high":
                    run = one_run(stack, args, label, 0, True, 0, worker)
                    drain_s = drain_s or run["bulk_drain_s"]
                else:
                    # The urgent messages spread over about half of the drain.
                    gap = 0.5 * (drain_s or args.bulk / 1000) / max(1, args.high)
                    run = one_run(stack, args, label, args.high, name == "lanes", gap, worker)
                result["runs"].setdefault(name, []).append(run)
    finally:
        children.stop_all()
        stack.drop()
        if sink.devserver is not None:
            sink.devserver.stop()
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["summary"] = summary = {
        name: {
            "bulk_msg_per_s_median": statistics.median(r["bulk_msg_per_s"] for r in runs),
            "bulk_msg_per_s_all": [r["bulk_msg_per_s"] for r in runs],
            "worker_cpu_us_per_msg_median": statistics.median(
                r["worker_cpu_us_per_msg"] for r in runs
            ),
            **(
                {
                    "enqueue_to_250_p99_s_median": statistics.median(
                        r["enqueue_to_250_s"]["p99"] for r in runs
                    ),
                    "enqueue_to_250_p99_s_all": [r["enqueue_to_250_s"]["p99"] for r in runs],
                }
                if "enqueue_to_250_s" in runs[0]
                else {}
            ),
        }
        for name, runs in result["runs"].items()
    }
    if "no_high" in summary and "lanes" in summary:
        base = summary["no_high"]["bulk_msg_per_s_median"]
        summary["bulk_rate_lanes_over_no_high"] = round(  # type: ignore[assignment]
            summary["lanes"]["bulk_msg_per_s_median"] / base, 3
        )
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.output / f"priority-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    say(json.dumps(result, indent=2))
    say(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
