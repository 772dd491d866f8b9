"""Bounce ingest rate: ``mailqueue bounces ingest --maildir`` over N real-shaped DSNs.

Untimed setup: a fresh database (a SQLite file by default; with a PostgreSQL
``--database-url``, a throw-away database created through it and dropped after),
N sent recipients (one per message), and a Maildir with one Postfix DSN per
recipient, each addressed to that row's VERP return path (the shape of
``tests/bounce_corpus/postfix_3.7_real.eml``, the DSN a real Postfix sent).
Timed: ``inbound.ingest_maildir`` — read, parse, match, verify the token, turn
the row ``bounced``, add the attempt row and the suppression, move the file
to ``cur/``. Prints reports per second and CPU seconds per 1,000 reports,
and checks that every row ended ``bounced``. Example::

    .venv/bin/python ops/bench/bounces.py --reports 10000
    .venv/bin/python ops/bench/bounces.py --reports 10000 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "bounce_corpus" / "postfix_3.7_real.eml"
SAMPLE_PATH = b"b+1-xwc4vtr7djzrcaxt@bounce.example.com"
DOMAIN = "bounce.example.com"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=10000)
    parser.add_argument("--database-url", help="default: a SQLite file in a temp folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mq-bounce-bench-"))
    url = args.database_url or f"sqlite:///{work / 'bench.db'}"
    admin = None
    if url.startswith("postgresql"):
        # A throw-away database: the URL's own database is only the way in.
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        name = f"mq_bounce_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)
    os.environ.update(
        MAILQUEUE_DATABASE_URL=url,
        MAILQUEUE_BROKER_URL=f"sqla+sqlite:///{work / 'broker.db'}",
        MAILQUEUE_BOUNCE_DOMAIN=DOMAIN,
        MAILQUEUE_BOUNCE_SECRET=os.environ.get("MAILQUEUE_BOUNCE_SECRET", "bench-" * 6),
    )
    from mailqueue.bounces.verp import make_return_path
    from mailqueue.config import get_settings
    from mailqueue.inbound import ingest_maildir
    from mailqueue.migrate import upgrade
    from mailqueue.store import get_engine
    from mailqueue.store.models import MESSAGES, RECIPIENTS

    settings = get_settings()
    engine = get_engine(url)
    try:
        upgrade(url)
        now = dt.datetime.now(dt.UTC)
        n = args.reports
        ids = [uuid.uuid4() for _ in range(n)]
        with engine.begin() as conn:
            conn.execute(
                sa.insert(MESSAGES),
                [
                    {
                        "id": i,
                        "created_at": now,
                        "updated_at": now,
                        "status": "sent",
                        "mail_from": "shop@example.com",
                        "size": 10,
                        "content": b"Subject: x\r\n\r\nx\r\n",
                        "next_attempt_at": now,
                        "expires_at": now + dt.timedelta(days=5),
                    }
                    for i in ids
                ],
            )
            conn.execute(
                sa.insert(RECIPIENTS),
                [
                    {
                        "message_id": i,
                        "address": f"user{k}@example.net",
                        "kind": "to",
                        "status": "sent",
                        "attempts": 1,
                        "updated_at": now,
                        "sent_at": now,
                    }
                    for k, i in enumerate(ids)
                ],
            )
            rows = conn.execute(
                sa.select(RECIPIENTS.c.id, RECIPIENTS.c.message_id, RECIPIENTS.c.address)
            ).all()
        box = work / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (box / sub).mkdir(parents=True)
        template = SAMPLE.read_bytes()
        for rid, mid, address in rows:
            path = make_return_path(
                secret=settings.bounce_secret,
                domain=DOMAIN,
                message_id=mid,
                recipient_id=rid,
                address=address,
            ).encode()
            dsn = template.replace(SAMPLE_PATH, path).replace(
                b"nobody@example.net", address.encode()
            )
            (box / "new" / f"{rid}.bench").write_bytes(dsn)

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        outcome = ingest_maildir(box, settings=settings)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)

        with engine.connect() as conn:
            bounced = conn.execute(
                sa.select(sa.func.count()).where(RECIPIENTS.c.status == "bounced")
            ).scalar_one()
        ok = bounced == n and outcome.applied.get("bounced") == n
        print(
            f"{engine.dialect.name}: {n} DSNs ingested in {wall:.2f} s = {n / wall:,.0f}/s; "
            f"process CPU {cpu:.2f} s ({cpu / n * 1000:.2f} s per 1,000); "
            f"{bounced} rows bounced, {outcome.unmatched} unmatched, {outcome.unparsed} unparsed"
        )
        return 0 if ok else 1
    finally:
        engine.dispose()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
