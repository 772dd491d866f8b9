"""``mailqueue demo``: the whole loop on the embedded default, in one command.

Starts the dev SMTP server (in this process), a real Celery worker and the
scheduler (as child processes, exactly as in production), on a fresh SQLite
database and kombu's SQLite transport. It enqueues a few hundred messages,
some to recipients the server refuses (550) or defers (450), lets the relay
"recover" so the deferred ones go through on retry, shows progress while
the queue drains, and ends with the status table and pool figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .statuses import TERMINAL_MESSAGE, MessageStatus

__all__ = ["run_demo"]


def _demo_messages(count: int) -> list:
    from .message import Message

    out = []
    for i in range(count):
        to = [f"user{i}@example.com"]
        if i % 10 == 3:
            to.append(f"bounce{i}@example.com")  # refused with 550: the message ends "partial"
        if i % 10 == 7:
            to = [f"later{i}@example.com"]  # deferred with 450 until the relay recovers
        out.append(
            Message(
                sender="Demo <demo@example.com>",
                to=to,
                bcc=[f"audit{i}@example.com"] if i % 25 == 0 else [],
                subject=f"Demo message {i} — grüße",
                text=f"Hello number {i}!\n\nThis came through mailqueue.\n",
            )
        )
    return out


def run_demo(*, messages: int, workdir: Path, concurrency: int, timeout: float) -> int:
    """Run the demo; returns the process exit code (0 when every message settled)."""
    from . import api
    from .config import configure, hide_password
    from .devserver import DevServer
    from .migrate import upgrade
    from .present import stats_table

    console = Console()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    server = DevServer(reject=["bounce*@*"], defer=["later*@*"]).start()
    env = {
        **os.environ,
        "MAILQUEUE_DATABASE_URL": f"sqlite:///{(workdir / 'mailqueue.db').resolve()}",
        "MAILQUEUE_BROKER_URL": f"sqla+sqlite:///{(workdir / 'broker.db').resolve()}",
        "MAILQUEUE_RELAY_URL": server.url,
        "MAILQUEUE_RETRY_BASE_S": "2",
        "MAILQUEUE_RETRY_MAX_S": "4",
        "MAILQUEUE_SCHEDULER_INTERVAL_S": "1",
        "MAILQUEUE_POOL_SIZE": os.environ.get("MAILQUEUE_POOL_SIZE", "5"),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("MAILQUEUE_")})
    settings = configure()
    console.print(
        f"[bold]mailqueue demo[/]: dev SMTP server on {server.url}, "
        f"state in {escape(str(workdir))}/"
    )
    console.print(
        f"  database {hide_password(settings.database_url)}\n"
        f"  broker   {hide_password(settings.broker_url)}",
        markup=False,
    )
    upgrade(settings.database_url)

    log_path = workdir / "worker.log"
    log_shown = escape(str(log_path))
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailqueue",
                "worker",
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "WARNING",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "mailqueue", "scheduler"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        started = time.monotonic()
        batch = _demo_messages(messages)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            enq = progress.add_task("enqueue", total=len(batch))
            api.enqueue_many(
                batch, chunk_size=50, progress=lambda n: progress.update(enq, completed=n)
            )
            drain = progress.add_task("deliver", total=len(batch))
            recovered = False
            while True:
                counts = api.stats()["messages"]
                done = sum(counts[s] for s in TERMINAL_MESSAGE)
                deferred = counts[MessageStatus.DEFERRED]
                progress.update(drain, completed=done, description=f"deliver (deferred {deferred})")
                if done >= len(batch):
                    break
                if (
                    not recovered
                    and counts[MessageStatus.QUEUED] == 0
                    and counts[MessageStatus.SENDING] == 0
                ):
                    server.defer = []  # the relay recovers; deferred mail goes through on retry
                    recovered = True
                if time.monotonic() - started > timeout:
                    console.print(f"[red]timed out after {timeout:.0f}s[/]; see {log_shown}")
                    return 1
                for child in children:
                    if child.poll() is not None:
                        console.print(
                            f"[red]a child process exited ({child.returncode})[/]; see {log_shown}"
                        )
                        return 1
                time.sleep(0.3)
        elapsed = time.monotonic() - started
        console.print(stats_table(api.stats()))
        received = len(server.messages)
        console.print(
            f"delivered {received} messages to the dev server in {elapsed:.1f}s "
            f"({received / elapsed:.0f} msg/s end to end, retries included) over "
            f"{server.connections_total} SMTP connections "
            f"({received / max(1, server.connections_total):.1f} messages per connection, "
            f"at most {server.connections_peak} open at once; "
            f"bound: {concurrency} processes x pool {settings.relay.pool_size})"
        )
        return 0
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
        log.close()
        server.stop()
