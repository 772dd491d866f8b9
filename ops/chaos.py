"""Chaos run: enqueue while killing workers, Redis and the SMTP server; then count.

    .venv/bin/python ops/chaos.py --messages 20000 --duration 300
    .venv/bin/python ops/chaos.py --scenario redis-heavy   # mostly Redis restarts
    .venv/bin/python ops/chaos.py --scenario stop          # mostly graceful group stops
    .venv/bin/python ops/chaos.py --scenario kill --kill-busy  # the duplicate window

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

Besides the SIGKILLs, a "stop" fault sends SIGTERM to a worker's whole
process group (what systemd and supervisors do) and waits for it: it must
exit 0 within --stop-timeout and leave nothing to resend (a duplicate near a
stop is outside the window). Every worker exit is recorded with its status;
a worker that exits by itself is restarted (as ``Restart=always`` would),
and one that exits 0 without being asked fails the run. After each fault
clears, while mail is waiting, deliveries must resume within --stall-bound
seconds, or the run fails.

The duplicate window, measured: for each resend whose first copy came just
before a worker was SIGKILLed, how long before the kill the relay accepted
that first copy (``window`` in the report: count, max and p99 in ms, and
resends per kill).
"""

from __future__ import annotations

import argparse
import contextlib
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


SCENARIOS = {
    "mixed": ["worker", "worker", "redis", "smtp", "stop"],
    "redis-heavy": ["redis", "redis", "redis", "worker", "stop"],
    "stop": ["stop", "stop", "stop", "worker"],
    "kill": ["worker"],  # SIGKILLs only: measures the duplicate window
}


@dataclass
class Events:
    """When each fault began and ended (monotonic seconds), to classify duplicates."""

    worker_kills: list[tuple[float, float]] = field(default_factory=list)
    worker_stops: list[tuple[float, float]] = field(default_factory=list)
    smtp_downs: list[tuple[float, float]] = field(default_factory=list)
    redis_restarts: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Exit:
    """One worker process that ended: how, and whether anybody asked it to."""

    worker: int
    at_s: float
    status: int | None  # None: hung, killed after the stop timeout
    cause: str  # "sigkill" | "sigterm-group" | "by itself" | "final stop"

    @property
    def bad(self) -> str | None:
        if self.cause == "by itself" and self.status == 0:
            return "exited 0 without being asked to stop"
        # -SIGTERM: the signal came before Celery installed its handlers (right after
        # a restart), so it ended the process as asked; it had claimed nothing yet.
        if self.cause in ("sigterm-group", "final stop") and self.status not in (
            0,
            -signal.SIGTERM,
        ):
            return f"asked to stop, ended with {self.status}"
        return None


class Workers:
    def __init__(self, count: int, concurrency: int, env: dict[str, str], logdir: Path) -> None:
        self.env, self.concurrency, self.logdir = env, concurrency, logdir
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.starts = 0
        self.exits: list[Exit] = []
        self.t0 = time.monotonic()
        for i in range(count):
            self.start(i)

    def _exited(self, i: int, status: int | None, cause: str) -> None:
        self.exits.append(Exit(i, round(time.monotonic() - self.t0, 1), status, cause))

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
            self._exited(i, proc.returncode, "sigkill")
        self.procs[i] = None

    def _killpg_quietly(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_one(self, i: int, timeout: float, cause: str = "sigterm-group") -> None:
        """SIGTERM to the worker's process group, as systemd and supervisors send it."""
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            status: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None  # hung: recorded as such, then killed
            self._killpg_quietly(proc)
        self._exited(i, status, cause)
        self.procs[i] = None

    def reap(self) -> list[int]:
        """Workers that ended by themselves: record, restart (``Restart=always``)."""
        ended = []
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is not None:
                self._exited(i, proc.returncode, "by itself")
                ended.append(i)
                self.start(i)
        return ended

    def stop(self, timeout: float) -> None:
        for i in range(len(self.procs)):
            self.stop_one(i, timeout, cause="final stop")


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
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    parser.add_argument(
        "--kill-busy",
        action="store_true",
        help="SIGKILL a worker only while the relay is accepting mail (within 50 ms)",
    )
    parser.add_argument(
        "--reply-delay", type=float, default=0.0, help="seconds the SMTP server waits per reply"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=120.0, help="a SIGTERMed worker must exit by then"
    )
    parser.add_argument(
        "--stall-bound",
        type=float,
        default=30.0,
        help="after a fault clears, mail waiting must move again within this many seconds",
    )
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
    smtp.faults.reply_delay_s = args.reply_delay
    first_copy_at: dict[str, float] = {}

    last_copy = [0.0]  # when the relay last accepted a message (monotonic)

    def seen(message) -> None:  # noqa: ANN001
        now = time.monotonic()
        last_copy[0] = now
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
        # A worker whose consumer cannot get the broker back exits 1 after this and is
        # restarted by reap() (shorter than the 60 s default, to fit the stall bound).
        MAILQUEUE_WORKER_STALL_S="15",
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
            f"{len(events.worker_stops)} group stops, "
            f"{len(events.redis_restarts)} redis restarts, {len(events.smtp_downs)} smtp downs",
            flush=True,
        )

    t0 = time.monotonic()
    next_fault = t0 + rng.uniform(args.min_gap, args.max_gap)
    last_progress = 0.0
    # Deliveries resume after a fault: (when it cleared, first copies seen then).
    watch: tuple[float, int] | None = None
    recoveries: list[float] = []
    stalls: list[dict[str, object]] = []

    def check_recovery(now: float) -> None:
        nonlocal watch
        if watch is None:
            return
        cleared, seen = watch
        if len(first_copy_at) > seen:
            recoveries.append(now - cleared)
            watch = None
        elif enqueued <= len(first_copy_at):
            watch = None  # nothing was waiting
        elif now - cleared > args.stall_bound:
            stalls.append({"at_s": round(cleared - t0, 1), "waited_s": round(now - cleared, 1)})
            watch = None

    print(f"chaos run {run_dir.name}: seed {seed}, database {db_url.rsplit('/', 1)[1]}", flush=True)
    while time.monotonic() - t0 < args.duration:
        now = time.monotonic()
        workers.reap()
        check_recovery(now)
        if now >= next_fault:
            fault = rng.choice(SCENARIOS[args.scenario])
            began = time.monotonic()
            if fault == "stop":
                i = rng.randrange(args.workers)
                workers.stop_one(i, args.stop_timeout)
                events.worker_stops.append((began, time.monotonic()))
                workers.start(i)
            elif fault == "worker":
                i = rng.randrange(args.workers)
                if args.kill_busy:  # land the kill while the relay is accepting mail
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and time.monotonic() - last_copy[0] > 0.05:
                        time.sleep(0.005)
                    began = time.monotonic()
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
            watch = (time.monotonic(), len(first_copy_at))
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
        workers.reap()
        check_recovery(time.monotonic())
        c = counts()
        if c["pending"] == 0 and c["deferred"] == 0 and sum(c.values()) == args.messages:
            break
        if time.monotonic() - last_progress >= 5:
            progress("drain")
            last_progress = time.monotonic()
        time.sleep(0.5)
    drained_in = time.monotonic() - drain_start

    workers.stop(args.stop_timeout)
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
    # The window, measured: resends whose first copy came shortly before a SIGKILL.
    kill_began = [began for began, _ in events.worker_kills]
    before_kill_ms = []
    for a in duplicates:
        first = first_copy_at[a]
        ahead = [b - first for b in kill_began if b - args.window <= first <= b + args.window]
        if ahead:
            before_kill_ms.append(1000 * min(ahead, key=abs))
    before_kill_ms.sort()
    window = {
        "resends_after_kills": len(before_kill_ms),
        "worker_kills": len(kill_began),
        "resends_per_kill": round(len(before_kill_ms) / max(1, len(kill_began)), 2),
        "max_ms": round(max(before_kill_ms), 1) if before_kill_ms else None,
        "p99_ms": (
            round(before_kill_ms[min(len(before_kill_ms) - 1, int(0.99 * len(before_kill_ms)))], 1)
            if before_kill_ms
            else None
        ),
        "first_copy_before_kill_ms": [round(v, 1) for v in before_kill_ms],
    }
    bad_exits = [e for e in workers.exits if e.bad]
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
            "worker_group_stops": len(events.worker_stops),
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
        "scenario": args.scenario,
        "kill_busy": args.kill_busy,
        "reply_delay_s": args.reply_delay,
        "window": window,
        "worker_exits": [vars(e) | {"bad": e.bad} for e in workers.exits],
        "bad_worker_exits": len(bad_exits),
        "recovery_s_max": round(max(recoveries), 1) if recoveries else None,
        "stall_bound_s": args.stall_bound,
        "stalls": stalls,
        "duplicates": details,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    smtp.stop()
    redis.stop()
    ok = (
        not lost
        and len(duplicates) == len(in_window)
        and c["pending"] == c["deferred"] == 0
        and not bad_exits
        and not stalls
    )
    print("PASS" if ok else "FAIL: see the report", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
