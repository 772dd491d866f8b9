"""The claim's suppression lookup alone: µs per recipient, empty list vs N entries.

End-to-end throughput on this shared machine drifts more between runs than
the lookup can cost, so this prices the very statement ``claim`` runs
(``store.suppression.suppressed_in``: one query per claimed batch) on
PostgreSQL and SQLite, with the list empty and loaded with ``--rows``
entries (none matching, and ``--hit-percent`` matching), alternated over
``--rounds``. Divide by the CPU a delivered message costs (``worker_cpu.py``)
for the share. Example::

    .venv/bin/python ops/bench/suppression_lookup.py --rows 1000000 --batch 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the loader and the swap)


def batch_keys(batch: int, hits: int, rows: int, salt: int) -> list[str]:
    """``batch`` recipient keys as the bench's (``user<i>-0``), ``hits`` of them listed
    (``user<i>-9``, as ``run.load_suppressions`` writes them)."""
    misses = [f"user{salt * batch + i}-0@example.org" for i in range(batch - hits)]
    listed = [f"user{(salt * 7919 + i * 104729) % rows}-9@example.org" for i in range(hits)]
    return misses + listed


def time_lookups(engine: sa.Engine, batch: int, hits: int, rows: int, reps: int) -> float:
    """µs per key of ``suppressed_in`` over ``reps`` batches, each in its own transaction
    (as in ``claim``)."""
    from mailqueue.store.suppression import suppressed_in

    is_pg = engine.dialect.name == "postgresql"
    work = [batch_keys(batch, hits, max(rows, 1), s) for s in range(reps)]
    with engine.begin() as conn:  # warm: plans, caches
        suppressed_in(conn, work[0], is_postgres=is_pg)
    t0 = time.perf_counter()
    for keys in work:
        with engine.begin() as conn:
            suppressed_in(conn, keys, is_postgres=is_pg)
    return (time.perf_counter() - t0) / (reps * batch) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=500, help="recipients per claimed batch")
    ap.add_argument("--reps", type=int, default=200, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hit-percent", type=float, default=1.0)
    ap.add_argument("--stacks", default="pg,sqlite")
    args = ap.parse_args()

    from mailqueue.migrate import upgrade
    from mailqueue.store import dispose_engines, get_engine

    hits = int(args.batch * args.hit_percent / 100)
    for kind in args.stacks.split(","):
        admin = None
        if kind == "pg":
            db = f"mq_lookup_{uuid.uuid4().hex[:8]}"
            admin = sa.create_engine(bench.PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
            url = bench.PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
        else:
            url = f"sqlite:///{tempfile.mkdtemp(prefix='mq-lookup-')}/mq.db"
        try:
            upgrade(url)
            engine = get_engine(url)
            took = bench.load_suppressions(engine, args.rows)
            print(f"[{kind}] {args.rows} rows loaded in {took} s", flush=True)
            res: dict[str, list[float]] = {}
            loaded = False
            for r in range(args.rounds):
                order = ("empty", "loaded") if r % 2 == 0 else ("loaded", "empty")
                for state in order:
                    if (state == "loaded") != loaded:
                        bench.swap_suppressions(engine)
                        loaded = not loaded
                    for h in (0, hits):
                        name = f"{state}, {h} of {args.batch} listed"
                        us = time_lookups(engine, args.batch, h, args.rows, args.reps)
                        res.setdefault(name, []).append(us)
                        print(f"[{kind}] round {r + 1} {name}: {us:.2f} µs/recipient", flush=True)
            print(f"[{kind}] medians, µs per recipient:")
            for name, values in res.items():
                print(f"    {name:28s} {statistics.median(values):6.2f}")
        finally:
            dispose_engines()
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                admin.dispose()


if __name__ == "__main__":
    main()
