"""CPU per delivered message in one worker process, and in PostgreSQL.

The end-to-end benchmark (``run.py``) measures throughput, which drifts by
±15 % between runs on a shared 2-core machine. This script measures what a
change to the worker's hot path really costs: it queues N prepared messages
(not timed), then delivers them in-process with ``Deliverer.deliver_batch``
against Postfix's ``smtp-sink`` (batches of ``--batch-size`` ids, ``--pool-size``
connections, as a prefork child does) and reports

* the worker process's CPU µs per message (all its threads), and
* the PostgreSQL server's CPU µs per message (every postgres process),

for each event loop and DKIM variant asked for, interleaved over ``--rounds``
rounds so that machine drift hits every variant alike. Example::

    .venv/bin/python ops/bench/worker_cpu.py --messages 5000 --rounds 3 --loops asyncio,uvloop

DKIM (``--dkim``): ``none`` sends unsigned; ``rsa`` signs every message with
an RSA-2048 key for the sender's domain; ``rsa+ed25519`` adds the Ed25519
signature (RFC 8463). The keys are made for the run, handed to the worker
through ``MAILQUEUE_DKIM__BENCH__*`` as a deployment would. Example::

    .venv/bin/python ops/bench/worker_cpu.py --messages 3000 --rounds 3 --loops uvloop \
        --dkim none,rsa,rsa+ed25519

``--suppression-rows 1000000`` loads that many suppression list entries
(none matching a recipient) and runs every variant twice per round, with
the list empty and loaded, so the claim's lookup is priced on its own.

Duplicate window (``--window``): ``released`` is the worker's default (the
connection goes back to the pool when the DATA reply arrives; the outcome is
committed right after); ``held`` sets ``MAILQUEUE_COMMIT_BEFORE_REUSE``
(the connection is held until its message's outcome is committed, issue #21),
so both are measured in one run. Example::

    .venv/bin/python ops/bench/worker_cpu.py --messages 3000 --rounds 3 --loops uvloop \
        --window released,held

``EXPERIMENT_SQL="stmt; stmt"`` runs statements on the fresh database after
it is migrated, e.g. dropping an index to see what its upkeep costs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the same messages and PostgreSQL settings)
from dkim_cost import make_keys  # noqa: E402  (an RSA-2048 PEM and an Ed25519 seed)

STATEMENTS = False


def postgres_cpu() -> float:
    total = 0.0
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def start_sink() -> tuple[subprocess.Popen[bytes], int]:
    path = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(path):
        raise SystemExit("needs Postfix's smtp-sink (apt-get install postfix)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [path, "-c", f"127.0.0.1:{port}", "1000"]
    if os.geteuid() == 0:
        argv[1:1] = ["-u", "postfix"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


DKIM_VARIANTS = ("none", "rsa", "rsa+ed25519")


def dkim_env(variant: str, keys: tuple[str, str]) -> dict[str, str]:
    """The environment a worker signing ``variant`` has (empty: unsigned)."""
    if variant == "none":
        return {}
    pem, seed = keys
    env = {
        "MAILQUEUE_DKIM__BENCH__DOMAIN": bench.SENDER.rsplit("@", 1)[1],
        "MAILQUEUE_DKIM__BENCH__SELECTOR": "s2026",
        "MAILQUEUE_DKIM__BENCH__KEY": pem,
    }
    if variant == "rsa+ed25519":
        env["MAILQUEUE_DKIM__BENCH__ED25519_SELECTOR"] = "e2026"
        env["MAILQUEUE_DKIM__BENCH__ED25519_KEY"] = seed
    return env


WINDOWS = ("released", "held")


def use_dkim(env: dict[str, str], window: str = "released") -> None:
    """Settings for the next round: the base environment plus ``env``'s DKIM keys, and
    ``MAILQUEUE_COMMIT_BEFORE_REUSE`` for the ``held`` window."""
    from mailqueue.config import configure, settings_from_env

    for name in [k for k in os.environ if k.startswith("MAILQUEUE_DKIM__")]:
        del os.environ[name]
    os.environ.update(env)
    os.environ["MAILQUEUE_COMMIT_BEFORE_REUSE"] = "true" if window == "held" else "false"
    configure(settings_from_env())


@contextlib.contextmanager
def sink_and_database(prefix: str, pool_size: int, **env: str) -> Iterator[str]:
    """``smtp-sink`` and a new PostgreSQL database, migrated, with mailqueue configured
    to use both (plus ``env``); yields the database URL, and drops it afterwards."""
    from mailqueue import _reset_caches
    from mailqueue.config import configure, settings_from_env
    from mailqueue.migrate import upgrade

    sink, port = start_sink()
    db = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(bench.PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    try:
        url = bench.PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
        os.environ.update(
            MAILQUEUE_DATABASE_URL=url,
            MAILQUEUE_RELAY_URL=f"smtp://127.0.0.1:{port}",
            MAILQUEUE_POOL_SIZE=str(pool_size),
            MAILQUEUE_POOL_MAX_MESSAGES=str(10**9),
            MAILQUEUE_EHLO_NAME="bench.example.com",
            **env,
        )
        configure(settings_from_env())
        upgrade(url)
        yield url
    finally:
        _reset_caches()  # disposes the engines, so the database can be dropped
        sink.terminate()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


def one_round(loop_kind: str, n: int, batch: int) -> dict[str, float]:
    from mailqueue.config import get_settings
    from mailqueue.store import Store, get_engine
    from mailqueue.worker.loop import new_event_loop
    from mailqueue.worker.service import Deliverer

    settings = get_settings()
    engine = get_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE mq_bounce, mq_attempt, mq_recipient, mq_message"))
    prepared = bench.prepare_many(n)
    store = Store(engine)
    store.insert(prepared)
    ids = [m.id for m in prepared]
    os.environ["MAILQUEUE_EVENT_LOOP"] = loop_kind
    loop = new_event_loop()
    deliverer = Deliverer(settings, store)
    commits = []  # outcomes per group commit
    record = store.record

    def counting_record(outcomes: Any, **kw: Any) -> None:
        commits.append(len(outcomes))
        record(outcomes, **kw)

    store.record = counting_record  # type: ignore[method-assign]

    async def drain() -> None:
        # As a prefork child: one task's ids at a time, each batch delivered concurrently.
        for start in range(0, len(ids), batch):
            await deliverer.deliver_batch(ids[start : start + batch])

    loop.run_until_complete(deliverer.deliver_batch(ids[:1]))  # connect, warm caches
    me = psutil.Process()
    cpu0, pg0, t0 = me.cpu_times(), postgres_cpu(), time.monotonic()
    commits.clear()
    if STATEMENTS:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_stat_statements_reset()"))
    loop.run_until_complete(drain())
    wall = time.monotonic() - t0
    cpu1, pg1 = me.cpu_times(), postgres_cpu()
    loop.run_until_complete(deliverer.aclose())
    loop.close()
    with engine.connect() as conn:
        sent = conn.execute(
            sa.text("SELECT count(*) FROM mq_recipient WHERE status = 'sent'")
        ).scalar_one()
    if sent != n:
        raise SystemExit(f"{loop_kind}: only {sent} of {n} recipients sent")
    worker = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    if STATEMENTS:
        with engine.connect() as conn:
            for calls, total, rows, query in conn.execute(
                sa.text(
                    "SELECT calls, total_exec_time + total_plan_time, rows, query "
                    "FROM pg_stat_statements ORDER BY 2 DESC LIMIT 8"
                )
            ):
                q = " ".join(query.split())[:110]
                print(f"    {total / n * 1000:7.1f} µs/msg {calls:6d} calls {rows:7d} rows  {q}")
    return {
        "msg_per_s": n / wall,
        "worker_us": worker / n * 1e6,
        "postgres_us": (pg1 - pg0) / n * 1e6,
        "user_us": (cpu1.user - cpu0.user) / n * 1e6,
        "outcomes_per_commit": n / max(1, len(commits)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--pool-size", type=int, default=8)
    ap.add_argument("--loops", default="asyncio,uvloop", help="comma list: asyncio, uvloop")
    ap.add_argument("--dkim", default="none", help="comma list: " + ", ".join(DKIM_VARIANTS))
    ap.add_argument("--window", default="released", help="comma list: " + ", ".join(WINDOWS))
    ap.add_argument(
        "--suppression-rows", type=int, default=0, help="also each variant with this list"
    )
    ap.add_argument(
        "--statements",
        action="store_true",
        help="print the top statements (needs pg_stat_statements in shared_preload_libraries)",
    )
    args = ap.parse_args()
    global STATEMENTS
    STATEMENTS = args.statements

    with sink_and_database("mq_cpu", args.pool_size) as url:
        setup = [q for q in os.environ.get("EXPERIMENT_SQL", "").split(";") if q.strip()]
        if STATEMENTS:
            setup.append("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if setup:
            from mailqueue.store import get_engine

            with get_engine(url).begin() as conn:
                for statement in setup:
                    conn.execute(sa.text(statement))
        dkim_variants = args.dkim.split(",")
        unknown = sorted(set(dkim_variants) - set(DKIM_VARIANTS))
        if unknown:
            raise SystemExit(f"--dkim: unknown {unknown}; choose from {', '.join(DKIM_VARIANTS)}")
        keys = make_keys() if dkim_variants != ["none"] else ("", "")
        windows = args.window.split(",")
        if sorted(set(windows) - set(WINDOWS)):
            raise SystemExit(f"--window: choose from {', '.join(WINDOWS)}")
        # (loop, DKIM variant, window, suppression list state or None): each round runs each
        variants: list[tuple[str, str, str, str | None]] = [
            (kind, dkim, window, None)
            for kind in args.loops.split(",")
            for dkim in dkim_variants
            for window in windows
        ]
        loaded = False
        if args.suppression_rows:
            from mailqueue.store import get_engine

            took = bench.load_suppressions(get_engine(url), args.suppression_rows)
            print(f"suppression list: {args.suppression_rows} rows loaded in {took} s")
            variants = [
                (k, d, w, state) for k, d, w, _ in variants for state in ("empty", "loaded")
            ]
        results: dict[str, list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for kind, dkim, window, state in variants if r % 2 == 0 else variants[::-1]:
                if state is not None and (state == "loaded") != loaded:
                    from mailqueue.store import get_engine

                    bench.swap_suppressions(get_engine(url))
                    loaded = not loaded
                name = kind if dkim_variants == ["none"] else f"{kind}/{dkim}"
                name = name if windows == ["released"] else f"{name}/{window}"
                name = f"{name}/{state}" if state else name
                use_dkim(dkim_env(dkim, keys), window)
                res = one_round(kind, args.messages, args.batch_size)
                results.setdefault(name, []).append(res)
                print(
                    f"round {r + 1}/{args.rounds} {name:14s} {res['msg_per_s']:7.0f} msg/s  "
                    f"worker {res['worker_us']:6.1f} µs/msg (user {res['user_us']:6.1f})  "
                    f"postgres {res['postgres_us']:6.1f} µs/msg  "
                    f"{res['outcomes_per_commit']:.1f} outcomes/commit",
                    flush=True,
                )
        print("medians:")
        for kind, rows in results.items():
            med: dict[str, Any] = {
                k: round(statistics.median(x[k] for x in rows), 1) for k in rows[0]
            }
            print(f"  {kind:14s} {med}")
        if len(dkim_variants) > 1 and not args.suppression_rows and windows == ["released"]:
            print("DKIM cost, worker CPU per message over unsigned (same loop, medians):")
            for loop_kind in args.loops.split(","):
                base = statistics.median(x["worker_us"] for x in results[f"{loop_kind}/none"])
                for dkim in dkim_variants:
                    us = statistics.median(x["worker_us"] for x in results[f"{loop_kind}/{dkim}"])
                    print(f"  {loop_kind}/{dkim:12s} {us:7.1f} µs/msg  ({us - base:+7.1f} µs)")


if __name__ == "__main__":
    main()
