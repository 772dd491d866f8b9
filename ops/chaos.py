"""Chaos run: enqueue while killing workers, Redis and the SMTP server; then count.

    .venv/bin/python ops/chaos.py --messages 20000 --duration 300

On loopback, against PostgreSQL (a fresh database per run, from
MAILQUEUE_TEST_POSTGRES_URL's server), a private Redis without persistence
(killed and restarted empty) and the dev SMTP server (stopped and started on
the same port). Worker process groups are SIGKILLed and restarted at random
bounded intervals. When the duration is over the faults stop, the queue
drains, and the report says: enqueued, delivered, failed, deferred, lost
(must be 0) and delivered twice, each duplicate classified as inside the
documented window (its first copy reached the relay within --window seconds
of a worker being killed or the SMTP server going down, so the relay's
"250" was never recorded) or outside it (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from tests.faultkit import PrivateRedis, free_port  # noqa: E402

POSTGRES_URL = os.environ.get(
    "MAILQUEUE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass
class Events:
    """When each fault began and ended (monotonic seconds), to classify duplicates."""

    worker_kills: list[tuple[float, float]] = field(default_factory=list)
    smtp_downs: list[tuple[float, float]] = field(default_factory=list)
    redis_restarts: list[tuple[float, float]] = field(default_factory=list)


class Workers:
    def __init__(self, count: int, concurrency: int, env: dict[str, str], logdir: Path) -> None:
        self.env, self.concurrency, self.logdir = env, concurrency, logdir
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.starts = 0
        for i in range(count):
            self.start(i)

    def start(self, i: int) -> None:
        self.starts += 1
        log = (self.logdir / f"worker-{i}.log").open("ab")
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-m", "mailqueue", "worker", "-c", str(self.concurrency)]
            + ["--loglevel", "WARNING"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes the children too
        )
        log.close()

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.procs[i] = None

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for i, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.kill(i)


def fresh_database() -> tuple[str, sa.Engine]:
    name = f"mq_chaos_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = sa.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(False)
    return url, admin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--duration", type=float, default=300, help="seconds of faults")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (groups)")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children each")
    parser.add_argument("--min-gap", type=float, default=5.0, help="least seconds between faults")
    parser.add_argument("--max-gap", type=float, default=20.0, help="most seconds between faults")
    parser.add_argument("--window", type=float, default=3.0, help="duplicate window, seconds")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "ops" / "chaos-results")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)

    import mailqueue
    from mailqueue.config import configure, settings_from_env
    from mailqueue.devserver import DevServer
    from mailqueue.migrate import upgrade

    run_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    db_url, _ = fresh_database()
    upgrade(db_url)
    redis = PrivateRedis().start()
    smtp = DevServer(port=free_port()).start()
    first_copy_at: dict[str, float] = {}

    def seen(message) -> None:  # noqa: ANN001
        now = time.monotonic()
        for rcpt in message.rcpt_tos:
            first_copy_at.setdefault(rcpt, now)

    smtp.on_message = seen
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    env.update(
        MAILQUEUE_DATABASE_URL=db_url,
        MAILQUEUE_BROKER_URL=redis.url,
        MAILQUEUE_RELAY_URL=smtp.url,
        MAILQUEUE_POOL_SIZE="4",
        MAILQUEUE_LEASE_S="10",
        MAILQUEUE_REDISPATCH_AFTER_S="5",
        MAILQUEUE_RETRY_BASE_S="2",
        MAILQUEUE_RETRY_MAX_S="10",
        MAILQUEUE_SCHEDULER_INTERVAL_S="1",
        MAILQUEUE_SMTP_CONNECT_TIMEOUT_S="3",
        MAILQUEUE_SMTP_COMMAND_TIMEOUT_S="10",
        MAILQUEUE_SMTP_DATA_TIMEOUT_S="10",
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("MAILQUEUE_")})
    configure(settings_from_env())
    events = Events()
    workers = Workers(args.workers, args.concurrency, env, run_dir)
    sched_log = (run_dir / "scheduler.log").open("ab")
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "mailqueue", "scheduler"],
        env=env,
        stdout=sched_log,
        stderr=sched_log,
    )

    # Enqueue at a steady pace over the first half of the run.
    body = "x" * 900
    enqueued = 0
    addresses: list[str] = []

    def producer() -> None:
        nonlocal enqueued
        chunk = 500
        pace = (args.duration / 2) / max(1, args.messages / chunk)
        for start in range(0, args.messages, chunk):
            batch = [
                mailqueue.Message(
                    sender="chaos@example.com",
                    to=f"r{i}@example.com",
                    subject=f"chaos {i}",
                    text=body,
                )
                for i in range(start, min(args.messages, start + chunk))
            ]
            mailqueue.enqueue_many(batch)
            addresses.extend(f"r{i}@example.com" for i in range(start, start + len(batch)))
            enqueued += len(batch)
            time.sleep(pace)

    feeder = threading.Thread(target=producer, daemon=True)
    feeder.start()
    engine = sa.create_engine(db_url)

    def counts() -> Counter[str]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT status, count(*) FROM mq_recipient GROUP BY status")
            ).all()
        return Counter(dict(rows))

    def progress(phase: str) -> None:
        c = counts()
        print(
            f"[{phase} {time.monotonic() - t0:6.0f}s] enqueued {enqueued}/{args.messages}  "
            f"sent {c['sent']}  deferred {c['deferred']}  pending {c['pending']}  "
            f"received {len(first_copy_at)}  faults: {len(events.worker_kills)} worker kills, "
            f"{len(events.redis_restarts)} redis restarts, {len(events.smtp_downs)} smtp downs",
            flush=True,
        )

    t0 = time.monotonic()
    next_fault = t0 + rng.uniform(args.min_gap, args.max_gap)
    last_progress = 0.0
    print(f"chaos run {run_dir.name}: seed {seed}, database {db_url.rsplit('/', 1)[1]}", flush=True)
    while time.monotonic() - t0 < args.duration:
        now = time.monotonic()
        if now >= next_fault:
            fault = rng.choice(["worker", "worker", "redis", "smtp"])
            began = time.monotonic()
            if fault == "worker":
                i = rng.randrange(args.workers)
                workers.kill(i)
                events.worker_kills.append((began, time.monotonic()))
                time.sleep(rng.uniform(1, 5))
                workers.start(i)
            elif fault == "redis":
                redis.restart()
                events.redis_restarts.append((began, time.monotonic()))
            else:
                smtp.stop()  # hangs up on every session, mid-DATA included
                events.smtp_downs.append((began, time.monotonic()))
                time.sleep(rng.uniform(1, 5))
                smtp.start()
            next_fault = time.monotonic() + rng.uniform(args.min_gap, args.max_gap)
        if now - last_progress >= 5:
            progress("chaos")
            last_progress = now
        time.sleep(0.2)

    feeder.join()
    for i, proc in enumerate(workers.procs):  # everything up for the drain
        if proc is None or proc.poll() is not None:
            workers.start(i)
    drain_start = time.monotonic()
    while time.monotonic() - drain_start < args.drain_timeout:
        c = counts()
        if c["pending"] == 0 and c["deferred"] == 0 and sum(c.values()) == args.messages:
            break
        if time.monotonic() - last_progress >= 5:
            progress("drain")
            last_progress = time.monotonic()
        time.sleep(0.5)
    drained_in = time.monotonic() - drain_start

    workers.stop()
    scheduler.terminate()
    scheduler.wait(30)
    c = counts()
    received = Counter(r for m in smtp.messages for r in m.rcpt_tos)
    with engine.connect() as conn:
        sent = set(
            conn.execute(
                sa.text("SELECT address FROM mq_recipient WHERE status = 'sent'")
            ).scalars()
        )
        failed = set(
            conn.execute(
                sa.text("SELECT address FROM mq_recipient WHERE status = 'failed'")
            ).scalars()
        )
    # A duplicate is inside the window when its first copy reached the relay
    # shortly before (or while) a worker was killed or the relay hung up: the
    # relay had accepted it, the worker could not record that.
    faults = sorted(
        [("worker kill", *f) for f in events.worker_kills]
        + [("smtp down", *f) for f in events.smtp_downs]
    )
    duplicates = {a: n for a, n in received.items() if n > 1}
    details = []
    in_window = set()
    for a in sorted(duplicates):
        first = first_copy_at[a]
        near = min(faults, key=lambda f: abs(f[1] - first), default=None)
        # After a SIGKILL nothing new is sent, but bytes already in the socket
        # still reach the relay: copies accepted just after the fault count too.
        inside = any(
            began - args.window <= first <= ended + args.window for _, began, ended in faults
        )
        if inside:
            in_window.add(a)
        details.append(
            {
                "address": a,
                "copies": duplicates[a],
                "inside_window": inside,
                "nearest_fault": near[0] if near else None,
                "first_copy_minus_fault_s": round(first - near[1], 3) if near else None,
            }
        )
    lost = [a for a in addresses if a not in received and a not in failed]
    report = {
        "run": run_dir.name,
        "seed": seed,
        "machine": os.uname().nodename,
        "duration_s": args.duration,
        "drain_s": round(drained_in, 1),
        "workers": args.workers,
        "concurrency": args.concurrency,
        "faults": {
            "worker_kills": len(events.worker_kills),
            "worker_starts": workers.starts,
            "redis_restarts": len(events.redis_restarts),
            "smtp_downs": len(events.smtp_downs),
        },
        "enqueued": enqueued,
        "delivered": len(sent),
        "failed": c["failed"],
        "deferred": c["deferred"],
        "pending": c["pending"],
        "received_by_server": len(received),
        "lost": len(lost),
        "delivered_twice": len(duplicates),
        "delivered_twice_in_window": len(in_window),
        "delivered_twice_outside_window": len(duplicates) - len(in_window),
        "smtp_connections": smtp.connections_total,
        "duplicates": details,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    smtp.stop()
    redis.stop()
    ok = not lost and len(duplicates) == len(in_window) and c["pending"] == c["deferred"] == 0
    print("PASS" if ok else "FAIL: see the report", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
