"""What one-click unsubscribe costs the worker: CPU per recipient, plain vs unsubscribe=True.

A message with ``unsubscribe=True`` goes out one SMTP transaction per
recipient, each copy with its own signed List-Unsubscribe header, and each
acceptance recorded as it arrives (``worker/service.py``). This script queues
``--messages`` messages of ``--recipients`` recipients each (not timed), in
both variants, delivers them in-process with ``Deliverer.deliver_batch``
against Postfix's ``smtp-sink`` on PostgreSQL, and reports the worker
process's CPU µs per recipient and recipients per second, interleaved over
``--rounds`` rounds so that machine drift hits both alike::

    .venv/bin/python ops/bench/unsubscribe_cost.py --messages 200 --recipients 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import psutil
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the PostgreSQL URL and sender)
from worker_cpu import sink_and_database  # noqa: E402

VARIANTS = ("plain", "unsubscribe")


def one_round(variant: str, messages: int, recipients: int) -> dict[str, float]:
    import mailqueue
    from mailqueue import api
    from mailqueue.config import get_settings
    from mailqueue.store import Store, get_engine
    from mailqueue.worker.service import Deliverer

    settings = get_settings()
    engine = get_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE mq_bounce, mq_attempt, mq_recipient, mq_message"))
    batch = [
        mailqueue.Message(
            sender=bench.SENDER,
            to=[f"reader{m}-{r}@example.org" for r in range(recipients)],
            subject=f"list mail {m}",
            text="This week's news.\n" * 40,
        )
        for m in range(messages)
    ]
    now = api.utcnow()
    prepared = [
        api.prepare(
            message,
            relay=None,
            send_at=None,
            idempotency_key=None,
            metadata=None,
            now=now,
            list_id="news.example.com",
            unsubscribe=variant == "unsubscribe",
        )
        for message in batch
    ]
    store = Store(engine)
    store.insert(prepared)  # written, not dispatched: delivered below
    ids = [str(m.id) for m in prepared]

    async def deliver_all() -> None:
        deliverer = Deliverer(settings, store)
        try:
            for start in range(0, len(ids), 100):
                await deliverer.deliver_batch([uuid.UUID(i) for i in ids[start : start + 100]])
        finally:
            await deliverer.aclose()

    me = psutil.Process()
    cpu0, wall0 = me.cpu_times(), time.perf_counter()
    asyncio.run(deliver_all())
    cpu1, wall1 = me.cpu_times(), time.perf_counter()
    with engine.connect() as conn:
        sent = conn.execute(
            sa.text("SELECT count(*) FROM mq_recipient WHERE status = 'sent'")
        ).scalar_one()
    n = messages * recipients
    if sent != n:
        raise SystemExit(f"{variant}: {sent} of {n} recipients sent")
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {"worker_us_per_rcpt": cpu / n * 1e6, "rcpt_per_s": n / (wall1 - wall0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--recipients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=8)
    args = ap.parse_args()

    with sink_and_database(
        "mq_unsub",
        args.pool_size,
        MAILQUEUE_UNSUBSCRIBE_URL="https://mail.example.com",
        MAILQUEUE_UNSUBSCRIBE_SECRET=uuid.uuid4().hex,
    ):
        results: dict[str, list[dict[str, float]]] = {}
        for r in range(args.rounds):
            for variant in VARIANTS:
                res = one_round(variant, args.messages, args.recipients)
                results.setdefault(variant, []).append(res)
                print(
                    f"round {r + 1}/{args.rounds} {variant:11s} "
                    f"{res['rcpt_per_s']:7.0f} recipients/s  "
                    f"worker {res['worker_us_per_rcpt']:6.1f} µs/recipient",
                    flush=True,
                )
        print(f"medians ({args.messages} messages × {args.recipients} recipients):")
        for variant, rows in results.items():
            med = {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}
            print(f"  {variant:11s} {med}")


if __name__ == "__main__":
    main()
