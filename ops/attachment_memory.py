"""Peak memory of one large attachment, from composing through delivery.

    .venv/bin/python ops/attachment_memory.py --mb 25

Runs each phase in this process against a SQLite file and a dev SMTP server
in a child process (so the server's copy is not counted), and prints the
peak Python allocation of each phase (tracemalloc) as a multiple of the
attachment's size, plus the process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=25.0, help="attachment size in MiB")
    parser.add_argument(
        "--pipelining",
        action="store_true",
        help="the relay advertises PIPELINING (content is then streamed in slices)",
    )
    args = parser.parse_args()
    size = int(args.mb * 1024 * 1024)
    work = Path(tempfile.mkdtemp(prefix="mq-attach-"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mailqueue", "devserver", "--port", str(port)]
        + ["--max-size", str(size * 2)]
        + (["--pipelining"] if args.pipelining else []),
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    os.environ.update(
        MAILQUEUE_DATABASE_URL=f"sqlite:///{work / 'mq.db'}",
        MAILQUEUE_BROKER_URL=f"sqla+sqlite:///{work / 'broker.db'}",
        MAILQUEUE_RELAY_URL=f"smtp://127.0.0.1:{port}",
        MAILQUEUE_MAX_MESSAGE_SIZE=str(size * 2),
    )
    try:
        import mailqueue
        from mailqueue.config import get_settings
        from mailqueue.message import build_envelope
        from mailqueue.migrate import upgrade
        from mailqueue.store import Store, get_engine
        from mailqueue.worker.service import Deliverer

        upgrade(get_settings().database_url)
        payload = os.urandom(size)
        message = mailqueue.Message(
            sender="a@example.com",
            to="b@example.com",
            subject="big",
            text="see attached",
            attachments=[mailqueue.Attachment(filename="big.bin", content=payload)],
        )
        rows = []
        tracemalloc.start()

        def phase(name: str, fn):  # noqa: ANN001, ANN202
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            value = fn()
            peak = tracemalloc.get_traced_memory()[1] - base
            rows.append((name, peak))
            return value

        phase("compose (build_envelope)", lambda: build_envelope(message))
        mid = phase("enqueue (compose + INSERT)", lambda: mailqueue.enqueue(message))

        def deliver() -> object:
            async def go() -> object:
                settings = get_settings()
                deliverer = Deliverer(settings, Store(get_engine(settings.database_url)))
                try:
                    return await deliverer.deliver_batch([uuid.UUID(str(mid))])
                finally:
                    await deliverer.aclose()

            return asyncio.run(go())

        phase("deliver (claim + SMTP + record)", deliver)
        status = mailqueue.get_status(mid).status
    finally:
        server.terminate()
        server.wait(10)
    relay = "with PIPELINING" if args.pipelining else "without PIPELINING"
    print(f"attachment: {size / 2**20:.1f} MiB; relay {relay}; delivered: {status}")
    for name, peak in rows:
        print(f"  {name:<34} peak {peak / 2**20:7.1f} MiB = {peak / size:4.1f} x attachment")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  process peak RSS {rss:.0f} MiB (includes the {size / 2**20:.0f} MiB payload itself)")


if __name__ == "__main__":
    main()
