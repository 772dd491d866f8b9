"""mailqueue throughput benchmark (issue #7): one command, a progress line, a JSON file.

    .venv/bin/python ops/bench/run.py                  # both stacks, default sizes
    .venv/bin/python ops/bench/run.py --stacks pg --messages 20000
    .venv/bin/python ops/bench/run.py --depth-rows 1000000   # the 1M-row memory run

For each stack (``pg``: PostgreSQL + Redis; ``embedded``: SQLite + kombu's
SQLite transport) and against Postfix's ``smtp-sink`` on loopback with ~1 KB
messages it measures, side by side in one run:

* ``bare``       aiosmtplib over N reused connections, no queue, no database
                 (and ``bare_pipelined``: the same with ESMTP PIPELINING);
* ``naive``      one Celery task per message, a new smtplib connection per
                 message, one status row committed per message;
* ``mailqueue``  ``enqueue_many`` of M messages, real ``mailqueue worker``
                 processes (prefork) drain them to the sink, every
                 recipient's status written;

plus ``enqueue_many`` alone, single ``enqueue`` latency, M messages x 5
recipients, worker RSS against queue depth and a 25 MB attachment's cost in
worker memory. CPU seconds and peak RSS come from psutil over the process
trees: client (this process and the workers it starts), broker
(``redis-server``), database (every ``postgres`` process: other jobs on the
machine are counted too) and sink.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from mailqueue.worker.sqlite_broker import prepare_sqlite_broker

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PG_ADMIN_URL = os.environ.get(
    "MAILQUEUE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("MAILQUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
SENDER = "bench@example.com"
BODY_LINE = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\n"


# -- output -----------------------------------------------------------------------


_last_progress = 0.0


def progress(text: str) -> None:
    """One line, rewritten in place (stderr), so the terminal shows where we are.

    Not on a terminal (CI, a log file) it prints a plain line every 5 seconds.
    """
    global _last_progress
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[2K" + text[:150])
    elif time.monotonic() - _last_progress >= 5:
        _last_progress = time.monotonic()
        sys.stderr.write(text[:150] + "\n")
    sys.stderr.flush()


def say(text: str) -> None:
    sys.stderr.write(("\r\x1b[2K" if sys.stderr.isatty() else "") + text + "\n")
    sys.stderr.flush()


# -- messages -----------------------------------------------------------------------


def make_message(i: int, recipients: int = 1, size: int = 1024) -> Any:
    from mailqueue import Message

    lines = max(1, (size - 400) // len(BODY_LINE))
    return Message(
        sender=SENDER,
        to=[f"user{i}-{r}@example.org" for r in range(recipients)],
        subject=f"bench message {i}",
        text=BODY_LINE * lines,
    )


def envelope(i: int, recipients: int = 1) -> tuple[str, list[str], bytes]:
    from mailqueue.message import build_envelope

    env = build_envelope(make_message(i, recipients), max_size=10**9)
    return env.mail_from, [r.address for r in env.recipients], env.data


# -- processes and measurement ------------------------------------------------------


class Monitor(threading.Thread):
    """Samples CPU time and RSS of the process trees per role until stopped."""

    def __init__(self, roles: dict[str, Callable[[], list[psutil.Process]]], interval: float):
        super().__init__(daemon=True, name="bench-monitor")
        self.roles = roles
        self.interval = interval
        self.started = time.time()
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}
        self.peak: dict[tuple[str, int], int] = {}
        self.names: dict[tuple[str, int], str] = {}
        self._stop_event = threading.Event()
        self.sample()

    def sample(self) -> None:
        for role, find in self.roles.items():
            for proc in find():
                key = (role, proc.pid)
                try:
                    with proc.oneshot():
                        cpu = proc.cpu_times()
                        used = cpu.user + cpu.system
                        rss = proc.memory_info().rss
                        if key not in self.first:
                            new = proc.create_time() > self.started
                            self.first[key] = 0.0 if new else used
                            self.names[key] = proc.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.last[key] = used
                self.peak[key] = max(self.peak.get(key, 0), rss)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def finish(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join()
        self.sample()
        out: dict[str, Any] = {}
        for role in self.roles:
            keys = [k for k in self.last if k[0] == role]
            cpu = sum(self.last[k] - self.first[k] for k in keys)
            out[role] = {
                "cpu_s": round(cpu, 3),
                "processes": len(keys),
                "peak_rss_mb": {
                    f"{self.names[k]}:{k[1]}": round(self.peak[k] / 2**20, 1)
                    for k in sorted(keys, key=lambda k: -self.peak[k])[:6]
                },
            }
        return out


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def by_name(*names: str) -> Callable[[], list[psutil.Process]]:
    cache: dict[int, psutil.Process] = {}

    def find() -> list[psutil.Process]:
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] in names and proc.pid not in cache:
                cache[proc.pid] = proc
        return [p for p in cache.values() if p.is_running()]

    return find


class Children:
    """Child processes this run started (workers, sink); stopped by their pid only."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        log = open(self.logdir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)

    def stop_all_except(self, keep: Any) -> None:
        for proc in list(self.procs):
            if proc is not keep:
                self.stop(proc)

    def pids_except(self, skip: Any) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for proc in self.procs:
            if proc is not skip:
                out.extend(tree(proc.pid))
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """Postfix's smtp-sink (or, only when it is missing, mailqueue's DevServer)."""

    def __init__(self, children: Children) -> None:
        self.port = free_port()
        path = shutil.which("smtp-sink") or (
            "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
        )
        self.proc = None
        self.devserver = None
        if path:
            argv = [path, "-c", f"127.0.0.1:{self.port}", "1000"]
            if os.geteuid() == 0:
                argv[1:1] = ["-u", "postfix" if _user_exists("postfix") else "nobody"]
            self.proc = children.start("smtp-sink", argv)
            self.kind = "postfix smtp-sink"
        else:
            from mailqueue.devserver import DevServer

            self.devserver = DevServer(port=self.port, pipelining=True).start()
            self.kind = "mailqueue DevServer (smtp-sink not installed; its CPU is in the client)"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                break
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        return tree(self.proc.pid) if self.proc else []


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


# -- stacks ---------------------------------------------------------------------------


class Stack:
    def __init__(self, kind: str, workdir: Path, sink: Sink, args: argparse.Namespace) -> None:
        self.kind = kind
        self.tag = uuid.uuid4().hex[:8]
        self.queue = f"mq-bench-{self.tag}"
        self.naive_queue = f"naive-bench-{self.tag}"
        self.sink = sink
        self.args = args
        if kind == "pg":
            self.db_name = f"mq_bench_{self.tag}"
            admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{self.db_name}"'))
            admin.dispose()
            self.database_url = (
                sa.engine.make_url(PG_ADMIN_URL)
                .set(database=self.db_name)
                .render_as_string(hide_password=False)
            )
            self.broker_url = REDIS_URL
        else:
            self.db_name = None
            self.database_url = f"sqlite:///{workdir / 'mailqueue.db'}"
            self.broker_url = f"sqla+sqlite:///{workdir / 'broker.db'}"
            self.naive_database_url = f"sqlite:///{workdir / 'naive.db'}"
        if kind == "pg":
            self.naive_database_url = self.database_url

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
        env.update(
            MAILQUEUE_DATABASE_URL=self.database_url,
            MAILQUEUE_BROKER_URL=self.broker_url,
            MAILQUEUE_QUEUE=self.queue,
            MAILQUEUE_RELAY_URL=self.sink.url,
            MAILQUEUE_POOL_SIZE=str(self.args.pool_size),
            MAILQUEUE_POOL_MAX_MESSAGES=str(10**9),
            MAILQUEUE_BATCH_SIZE=str(self.args.batch_size),
            MAILQUEUE_EHLO_NAME="bench.example.com",
        )
        env.update(extra)
        return env

    def activate(self) -> None:
        """Configure this process (the producer) for this stack."""
        import mailqueue
        from mailqueue.config import configure, settings_from_env
        from mailqueue.migrate import upgrade

        os.environ.update({k: v for k, v in self.env().items() if k.startswith("MAILQUEUE_")})
        mailqueue._reset_caches()
        configure(settings_from_env())
        upgrade(self.database_url)

    @property
    def engine(self) -> sa.Engine:
        from mailqueue.store import get_engine

        return get_engine(self.database_url)

    def clear(self) -> None:
        with self.engine.begin() as conn:
            if self.kind == "pg":
                conn.execute(sa.text("TRUNCATE mq_bounce, mq_attempt, mq_recipient, mq_message"))
            else:
                conn.execute(sa.text("DELETE FROM mq_attempt"))
                conn.execute(sa.text("DELETE FROM mq_recipient"))
                conn.execute(sa.text("DELETE FROM mq_message"))

    def roles(self, children: Children) -> dict[str, Callable[[], list[psutil.Process]]]:
        me = psutil.Process()
        roles: dict[str, Callable[[], list[psutil.Process]]] = {
            "client": lambda: [me, *children.pids_except(self.sink.proc)],
            "sink": self.sink.processes,
        }
        if self.kind == "pg":
            roles["broker"] = by_name("redis-server")
            roles["database"] = by_name("postgres", "postmaster")
        return roles

    def drop(self) -> None:
        from mailqueue.store import dispose_engines

        dispose_engines()
        if self.db_name:
            admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
            admin.dispose()


def count_done(stack: Stack) -> tuple[int, int]:
    """(recipients with a final status, of which sent)."""
    with stack.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT status, count(*) FROM mq_recipient GROUP BY status")
        ).all()
    counts = dict(rows)
    done = sum(v for k, v in counts.items() if k in ("sent", "failed", "deferred"))
    return done, counts.get("sent", 0)


def wait_drained(stack: Stack, expected: int, label: str, timeout: float) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while True:
        done, sent = count_done(stack)
        elapsed = time.monotonic() - started
        progress(f"[{stack.kind}] {label}: {done}/{expected} recipients ({elapsed:.1f}s)")
        if done >= expected:
            if sent != done:
                raise RuntimeError(f"{label}: only {sent} of {done} recipients sent")
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{label}: timed out with {done}/{expected} recipients")
        time.sleep(0.25)  # each look is a query on the database being measured


def start_workers(stack: Stack, children: Children, concurrency: int) -> Any:
    argv = [sys.executable, "-m", "mailqueue", "worker", "-c", str(concurrency), "-l", "WARNING"]
    return children.start(f"worker-{stack.kind}", argv, env=stack.env())


def worker_children_rss(proc: Any) -> list[int]:
    try:
        return [c.memory_info().rss for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def per_message(usage: dict[str, Any], n: int) -> dict[str, float]:
    return {role: round(v["cpu_s"] / n * 1e6, 1) for role, v in usage.items()}


# -- phases -----------------------------------------------------------------------------


async def _bare(url_port: int, jobs: list[tuple[str, list[str], bytes]], conns: int, pipe: bool):
    import aiosmtplib

    from mailqueue.smtp.pipelining import send_pipelined

    queue = list(reversed(jobs))
    done = 0

    async def one() -> None:
        nonlocal done
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=url_port, start_tls=False)
        await smtp.connect()
        while queue:
            mail_from, rcpts, data = queue.pop()
            if pipe:
                result = await send_pipelined(smtp, mail_from, rcpts, data, timeout=30)
                assert result.data.code == 250, result
            else:
                await smtp.sendmail(mail_from, rcpts, data)
            done += 1
        await smtp.quit()

    async def show() -> None:
        while True:
            progress(f"bare{' pipelined' if pipe else ''}: {done}/{len(jobs)}")
            await asyncio.sleep(0.2)

    shower = asyncio.create_task(show())
    await asyncio.gather(*(one() for _ in range(conns)))
    shower.cancel()


def phase_bare(sink: Sink, children: Children, n: int, conns: int, pipe: bool) -> dict[str, Any]:
    distinct = [envelope(i) for i in range(min(n, 100))]  # as ``prepare_many`` does
    jobs = [distinct[i % len(distinct)] for i in range(n)]
    me = psutil.Process()
    mon = Monitor({"client": lambda: [me], "sink": sink.processes}, 0.25)
    mon.start()
    t0 = time.monotonic()
    asyncio.run(_bare(sink.port, jobs, conns, pipe))
    elapsed = time.monotonic() - t0
    usage = mon.finish()
    return {
        "messages": n,
        "connections": conns,
        "seconds": round(elapsed, 3),
        "msg_per_s": rate(n, elapsed),
        "cpu": usage,
        "cpu_us_per_msg": per_message(usage, n),
    }


def phase_smtp_source(sink: Sink, n: int, sessions: int) -> dict[str, Any] | None:
    path = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(path):
        return None
    t0 = time.monotonic()
    subprocess.run(
        [path, "-s", str(sessions), "-m", str(n), "-l", "1024", "-f", SENDER,
         "-t", "user@example.org", f"127.0.0.1:{sink.port}"],
        check=True, capture_output=True,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    return {"messages": n, "sessions": sessions, "msg_per_s": rate(n, elapsed)}


def phase_naive(stack: Stack, children: Children, n: int, concurrency: int) -> dict[str, Any]:
    import naive_app

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")},
        "NAIVE_DATABASE_URL": stack.naive_database_url,
        "NAIVE_BROKER_URL": stack.broker_url,
        "NAIVE_QUEUE": stack.naive_queue,
        "NAIVE_SMTP": f"127.0.0.1:{stack.sink.port}",
        "PYTHONPATH": str(HERE),
    }
    engine = naive_app.make_engine(stack.naive_database_url)
    naive_app.create_table(engine)
    engine.dispose()
    # The broker's queue row exists before the worker and producer race to make it.
    prepare_sqlite_broker(stack.broker_url, [stack.naive_queue])
    worker = children.start(
        f"naive-worker-{stack.kind}",
        [sys.executable, "-m", "celery", "-A", "naive_app", "worker", "-c", str(concurrency),
         "-P", "prefork", "-l", "WARNING", "-Q", stack.naive_queue],
        env=env,
    )  # fmt: skip
    engine = naive_app.make_engine(stack.naive_database_url)

    def drained() -> int:
        with engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT count(*) FROM naive_mail WHERE status <> 'queued'")
            ).scalar_one()

    # Warm-up: the worker is up and has sent mail before the clock starts.
    warm = children.start(
        f"naive-warmup-{stack.kind}",
        [sys.executable, str(HERE / "naive_produce.py"), "20"],
        env=env,
    )
    deadline = time.monotonic() + stack.args.timeout
    while (done := drained()) < 20:
        progress(f"[{stack.kind}] naive warm-up: {done}/20")
        if worker.poll() is not None or warm.poll() not in (None, 0):
            raise RuntimeError("naive warm-up: the worker or producer died; see the logs")
        if time.monotonic() > deadline:
            raise RuntimeError(f"naive warm-up timed out at {done}/20; see the logs")
        time.sleep(0.2)
    children.stop(warm)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM naive_mail"))

    # The producer sets up (interpreter, imports, composition), then waits: its
    # start-up is neither timed nor counted as CPU, as mailqueue's is not.
    go = Path(tempfile.mkdtemp(prefix="naive-go-")) / "go"
    producer = children.start(
        f"naive-producer-{stack.kind}",
        [sys.executable, str(HERE / "naive_produce.py"), str(n)],
        env={**env, "NAIVE_GO": str(go)},
    )
    deadline = time.monotonic() + stack.args.timeout
    while not go.with_name("go.ready").exists():
        if producer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("naive producer did not get ready; see the logs")
        time.sleep(0.01)
    mon = Monitor(stack.roles(children), 0.5)
    mon.start()
    t0 = time.monotonic()
    go.touch()
    try:
        while True:
            with engine.connect() as conn:
                done = conn.execute(
                    sa.text("SELECT count(*) FROM naive_mail WHERE status <> 'queued'")
                ).scalar_one()
            progress(f"[{stack.kind}] naive: {done}/{n} ({time.monotonic() - t0:.1f}s)")
            if done >= n:
                break
            if producer.poll() not in (None, 0) or worker.poll() is not None:
                raise RuntimeError("naive producer or worker died; see the logs")
            if time.monotonic() - t0 > stack.args.timeout:
                raise RuntimeError(f"naive: timed out at {done}/{n}")
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        with engine.connect() as conn:
            sent = conn.execute(
                sa.text("SELECT count(*) FROM naive_mail WHERE status = 'sent'")
            ).scalar_one()
    finally:
        usage = mon.finish()
        engine.dispose()
        children.stop(worker)
        children.stop(producer)
    return {
        "messages": n,
        "sent": sent,
        "worker_processes": concurrency,
        "seconds": round(elapsed, 3),
        "msg_per_s": rate(n, elapsed),
        "cpu": usage,
        "cpu_us_per_msg": per_message(usage, n),
    }


def phase_enqueue_only(stack: Stack, n: int) -> dict[str, Any]:
    """enqueue_many alone: messages per second into SQL (dispatch to the broker included)."""
    from mailqueue import api
    from mailqueue.worker.app import flush_dispatch

    stack.clear()
    msgs = [make_message(i) for i in range(n)]
    # An idle queue nobody consumes: the ids are handed to the broker as usual.
    from mailqueue.config import configure

    configure(queue_name=f"{stack.queue}-idle")
    t0 = time.monotonic()
    api.enqueue_many(msgs, progress=lambda k: progress(f"[{stack.kind}] enqueue_many: {k}/{n}"))
    flush_dispatch()  # timed up to the last id reaching the broker
    elapsed = time.monotonic() - t0
    stack.clear()
    t1 = time.monotonic()
    prepared = prepare(msgs)
    t_compose = time.monotonic() - t1
    t1 = time.monotonic()
    write_prepared(prepared)
    t_write = time.monotonic() - t1
    # Single enqueue() calls on a quiet machine (no workers yet); the
    # enqueue_latency phase measures them again while workers deliver.
    idle_latency = (
        phase_enqueue_latency(stack, min(n, 500), stack.args.latency_gaps_ms) if n else None
    )
    configure(queue_name=stack.queue)
    _purge(stack, f"{stack.queue}-idle")
    stack.clear()
    return {
        "idle_enqueue_latency": idle_latency,
        "messages": n,
        "seconds": round(elapsed, 3),
        "msg_per_s": rate(n, elapsed),
        "compose_only_msg_per_s": rate(n, t_compose),
        "write_and_dispatch_only_msg_per_s": rate(n, t_write),
    }


def _purge(stack: Stack, queue: str) -> None:
    if stack.kind == "pg":
        import redis

        redis.Redis.from_url(REDIS_URL).delete(queue)


def prepare(msgs: list[Any]) -> list[Any]:
    """What ``enqueue_many`` does before it writes: validate and compose the MIME bytes."""
    from mailqueue import api
    from mailqueue.store.models import utcnow

    now = utcnow()
    return [
        api._prepare(m, relay=None, send_at=None, idempotency_key=None, metadata=None, now=now)
        for m in msgs
    ]


def prepare_many(n: int, recipients: int = 1, distinct: int = 100) -> list[Any]:
    """``n`` prepared messages: ``distinct`` really composed, the rest copies of them
    with their own ids (composing is ~3 ms a message in the stdlib's email package;
    it is timed on its own in ``enqueue_many`` and ``mailqueue_enqueue_many_composing``)."""
    import dataclasses

    from mailqueue.api import new_id

    base = prepare([make_message(i, recipients) for i in range(min(n, distinct))])
    return [dataclasses.replace(base[i % len(base)], id=new_id()) for i in range(n)]


def write_prepared(prepared: list[Any], chunk: int = 1000) -> None:
    """The rest of ``enqueue_many``: one transaction per chunk, then its dispatch."""
    from mailqueue import api
    from mailqueue.worker.app import flush_dispatch

    for start in range(0, len(prepared), chunk):
        api._write_and_dispatch(prepared[start : start + chunk], None)
    flush_dispatch()  # the broker has every id (handed over in the background)


def phase_mailqueue(
    stack: Stack, children: Children, n: int, recipients: int, label: str, compose: bool = False
) -> dict[str, Any]:
    """End to end. By default the messages are composed before the clock starts (as
    bare's are); ``compose=True`` times ``enqueue_many`` on ``Message`` objects,
    MIME composition included."""
    from mailqueue import api

    stack.clear()
    msgs = [make_message(i, recipients) for i in range(n)] if compose else []
    prepared = None if compose else prepare_many(n, recipients)
    mon = Monitor(stack.roles(children), 0.5)
    mon.start()
    t0 = time.monotonic()
    if prepared is None:
        api.enqueue_many(msgs)
    else:
        write_prepared(prepared)
    t_enq = time.monotonic() - t0
    t1 = wait_drained(stack, n * recipients, label, stack.args.timeout)
    elapsed = t1 - t0
    usage = mon.finish()
    return {
        "messages": n,
        "composition_timed": compose,
        "recipients_per_message": recipients,
        "seconds": round(elapsed, 3),
        "enqueue_seconds": round(t_enq, 3),
        "msg_per_s": rate(n, elapsed),
        "recipients_per_s": rate(n * recipients, elapsed),
        "cpu": usage,
        "cpu_us_per_msg": per_message(usage, n),
    }


class RawInsert:
    """The floor under one ``enqueue()``: one 1 KB row INSERTed and committed on a
    plain driver connection, no composition, no pool, one index (the naive way
    of making one row durable, on the same database)."""

    def __init__(self, stack: Stack) -> None:
        self.kind = stack.kind
        self.body = os.urandom(1024)
        if stack.kind == "pg":
            import psycopg

            url = sa.engine.make_url(stack.database_url)
            self.conn: Any = psycopg.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                dbname=url.database,
                password=url.password,
                autocommit=True,
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_floor (id uuid PRIMARY KEY, body bytea)"
            )
            self.sql = "INSERT INTO bench_floor VALUES (%s, %s)"
        else:
            import sqlite3

            path = sa.engine.make_url(stack.database_url).database
            self.conn = sqlite3.connect(
                str(Path(str(path)).with_name("floor.db")), isolation_level=None
            )
            self.conn.execute("PRAGMA journal_mode=WAL")  # as mailqueue's engine sets it
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_floor (id TEXT PRIMARY KEY, body BLOB)"
            )
            self.sql = "INSERT INTO bench_floor VALUES (?, ?)"

    def __call__(self) -> None:
        key: Any = uuid.uuid4() if self.kind == "pg" else str(uuid.uuid4())
        self.conn.execute(self.sql, (key, self.body))

    def close(self) -> None:
        self.conn.close()


def phase_enqueue_latency(
    stack: Stack, n: int, gaps_ms: Sequence[float] = (5.0, 0.5, 0.0)
) -> dict[str, Any]:
    """Single ``enqueue()`` calls, timed one by one, ``n`` calls per gap between calls,
    each followed by one call of the floor (``RawInsert``) at the same spacing.

    The gap matters on this VM: after a 5 ms sleep the CPU work of a call takes
    several times longer than back to back (idle vCPUs wake slowly), and back to
    back each call competes for the GIL with the previous call's broker hand-off
    (``worker/handoff.py``). The top-level p50/p99 are the first gap's.
    """
    from mailqueue import api
    from mailqueue.worker.app import flush_dispatch

    floor = RawInsert(stack)

    def timed(offset: int, gap_s: float) -> tuple[list[float], list[float]]:
        times, floor_times = [], []
        for i in range(n):
            msg = make_message(offset + i)
            t0 = time.perf_counter()
            api.enqueue(msg)
            times.append((time.perf_counter() - t0) * 1000)
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            floor()
            floor_times.append((time.perf_counter() - t0) * 1000)
            if gap_s:
                time.sleep(gap_s)
            if i % 50 == 0:
                progress(f"[{stack.kind}] enqueue latency ({gap_s * 1000:g} ms apart): {i}/{n}")
        flush_dispatch()
        return sorted(times), sorted(floor_times)

    def summary(times: list[float], floor_times: list[float]) -> dict[str, Any]:
        return {
            "p50_ms": round(statistics.median(times), 3),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3),
            "max_ms": round(times[-1], 3),
            "raw_insert_p50_ms": round(statistics.median(floor_times), 3),
        }

    try:
        by_gap = {
            f"{g:g}": summary(*timed((k + 1) * 10**6, g / 1000)) for k, g in enumerate(gaps_ms)
        }
    finally:
        floor.close()
    first = by_gap[f"{gaps_ms[0]:g}"]
    return {"calls": n * len(gaps_ms), "by_gap_ms": by_gap, **first}


def _latency_line(lat: dict[str, Any]) -> str:
    if "by_gap_ms" not in lat:  # results from before the gaps were measured
        return f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms"
    return "; ".join(
        f"{gap} ms apart p50 {v['p50_ms']} / p99 {v['p99_ms']} ms"
        + (f" (raw INSERT p50 {v['raw_insert_p50_ms']})" if "raw_insert_p50_ms" in v else "")
        for gap, v in lat["by_gap_ms"].items()
    )


def phase_depth(stack: Stack, children: Children, depths: list[int]) -> dict[str, Any]:
    """Worker RSS after draining D queued rows, for each D (fresh workers each time)."""
    out = {}
    for depth in depths:
        stack.clear()
        _enqueue_in_chunks(stack, depth, f"depth {depth}: enqueue")
        worker = start_workers(stack, children, stack.args.concurrency)
        wait_drained(stack, depth, f"depth {depth}: drain", stack.args.timeout * 10)
        time.sleep(1.0)
        rss = worker_children_rss(worker)
        children.stop(worker)
        out[str(depth)] = {
            "worker_children_rss_mb": [round(r / 2**20, 1) for r in rss],
            "max_mb": round(max(rss) / 2**20, 1) if rss else None,
        }
    stack.clear()
    return out


def _enqueue_in_chunks(stack: Stack, n: int, label: str, chunk: int = 10000) -> None:
    for start in range(0, n, chunk):
        write_prepared(prepare_many(min(chunk, n - start)))
        progress(f"[{stack.kind}] {label}: {min(n, start + chunk)}/{n}")


def phase_attachment(stack: Stack, children: Children, size_mb: int) -> dict[str, Any]:
    """Peak RSS of the one worker process that delivers a message with a big attachment."""
    from mailqueue import Attachment, Message, api

    stack.clear()
    worker = start_workers(stack, children, 1)
    # Warm the child (imports, engine, pool) with one small message first.
    api.enqueue(make_message(0))
    wait_drained(stack, 1, "attachment: warm-up", 60)
    time.sleep(0.5)
    kids = psutil.Process(worker.pid).children(recursive=True)
    baseline = {k.pid: k.memory_info().rss for k in kids}
    payload = os.urandom(size_mb * 2**20)
    msg = Message(
        sender=SENDER,
        to=["big@example.org"],
        subject="big attachment",
        text="see attached",
        attachments=[
            Attachment(filename="big.bin", content=payload, content_type="application/octet-stream")
        ],
    )
    peak = dict(baseline)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k in kids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    peak[k.pid] = max(peak[k.pid], k.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    api.enqueue(msg)
    del msg, payload
    wait_drained(stack, 2, "attachment: deliver", 120)
    stop.set()
    sampler.join()
    children.stop(worker)
    with stack.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT max(size) FROM mq_message")).scalar_one()
    grew = max(peak[p] - baseline[p] for p in baseline)
    stack.clear()
    return {
        "attachment_mb": size_mb,
        "stored_message_mb": round(stored / 2**20, 1),
        "worker_baseline_rss_mb": round(max(baseline.values()) / 2**20, 1),
        "worker_peak_growth_mb": round(grew / 2**20, 1),
        "growth_over_attachment": round(grew / (size_mb * 2**20), 2),
    }


# -- the suppression list's cost (issue #17) -------------------------------------------

_FULL = "mq_suppression_full"
"""The loaded list waits under this name; ``swap_suppressions`` trades it with the live one."""


def load_suppressions(engine: sa.Engine, n: int) -> float:
    """``n`` entries into a side table shaped like ``mq_suppression`` (COPY on
    PostgreSQL, executemany on SQLite); returns the seconds it took. Their keys
    (``user<i>-9@example.org``) sit among the bench's recipients' in the index
    (``user<i>-<r>``, r < 5) but never equal one: every message is looked up,
    none is withheld, so the figure is the lookup's cost alone."""
    t0 = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    keys = (f"user{i}-9@example.org" for i in range(n))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f"CREATE TABLE {_FULL} (LIKE mq_suppression INCLUDING ALL)"))
            raw = conn.connection.driver_connection
            with (
                raw.cursor() as cur,
                cur.copy(
                    f"COPY {_FULL} (address, address_key, reason, scope, created_at) FROM STDIN"
                ) as copy,
            ):
                for key in keys:
                    copy.write_row((key, key, "bounced", "", now))
        else:
            conn.execute(
                sa.text(
                    f"CREATE TABLE {_FULL} (id INTEGER PRIMARY KEY, address VARCHAR(320) NOT NULL,"
                    " address_key VARCHAR(320) NOT NULL, reason VARCHAR(16) NOT NULL,"
                    " scope VARCHAR(262) NOT NULL DEFAULT '', created_at DATETIME NOT NULL,"
                    " note TEXT)"
                )
            )
            stamp = now.replace(tzinfo=None).isoformat(sep=" ")
            raw = conn.connection.driver_connection
            raw.executemany(
                f"INSERT INTO {_FULL} (address, address_key, reason, scope, created_at)"
                " VALUES (?, ?, 'bounced', '', ?)",
                ((key, key, stamp) for key in keys),
            )
            conn.execute(sa.text(f"CREATE UNIQUE INDEX uq_{_FULL} ON {_FULL} (address_key, scope)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"ANALYZE {_FULL}"))
    return round(time.monotonic() - t0, 1)


def swap_suppressions(engine: sa.Engine) -> None:
    """Trade the live list and the side table, in one transaction (renames only:
    the workers' next claim reads the other one)."""
    with engine.begin() as conn:
        for old, new in (
            ("mq_suppression", "mq_suppression_swap"),
            (_FULL, "mq_suppression"),
            ("mq_suppression_swap", _FULL),
        ):
            conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))


def live_suppressions(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM mq_suppression")).scalar_one())


def phase_suppression(
    stack: Stack, children: Children, n: int, rows: int, rounds: int
) -> dict[str, Any]:
    """End to end (as ``phase_mailqueue``) with an empty list and with ``rows``
    entries, alternated ``rounds`` times in the same run (this machine drifts
    more between runs than the cost measured)."""
    loaded_s = load_suppressions(stack.engine, rows)
    say(f"[{stack.kind}] suppression list: {rows} rows loaded in {loaded_s} s")
    runs: dict[str, list[dict[str, Any]]] = {"empty": [], "loaded": []}
    loaded = False
    for r in range(rounds):
        for want in ("empty", "loaded") if r % 2 == 0 else ("loaded", "empty"):
            if (want == "loaded") != loaded:
                swap_suppressions(stack.engine)
                loaded = not loaded
            entries = live_suppressions(stack.engine)
            assert entries == (rows if loaded else 0), entries
            run = phase_mailqueue(stack, children, n, 1, f"suppression {want} ({entries} rows)")
            run["suppression_rows"] = entries
            runs[want].append(run)
            say(f"[{stack.kind}] suppression {want}: {run['msg_per_s']} msg/s")
    best = {k: max(x["msg_per_s"] for x in v) for k, v in runs.items()}
    median = {k: statistics.median(x["msg_per_s"] for x in v) for k, v in runs.items()}
    return {
        "rows": rows,
        "load_seconds": loaded_s,
        "runs": runs,
        "best_msg_per_s": best,
        "median_msg_per_s": median,
        "loaded_over_empty_best": round(best["loaded"] / best["empty"], 3),
        "loaded_over_empty_median": round(median["loaded"] / median["empty"], 3),
    }


def run_stack(kind: str, args: argparse.Namespace, sink: Sink, children: Children) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"mq-bench-{kind}-"))
    stack = Stack(kind, workdir, sink, args)
    result: dict[str, Any] = {"stack": kind, "database": stack.database_url.split("@")[-1]}
    try:
        stack.activate()
        say(f"[{kind}] database {stack.database_url} broker {stack.broker_url}")
        conns = args.bare_connections
        result["bare"] = phase_bare(sink, children, args.messages, conns, pipe=False)
        say(f"[{kind}] bare: {result['bare']['msg_per_s']} msg/s")
        result["bare_pipelined"] = phase_bare(sink, children, args.messages, conns, pipe=True)
        say(f"[{kind}] bare pipelined: {result['bare_pipelined']['msg_per_s']} msg/s")
        if args.naive_messages:
            result["naive"] = phase_naive(stack, children, args.naive_messages, args.concurrency)
            say(f"[{kind}] naive: {result['naive']['msg_per_s']} msg/s")
        if args.enqueue_messages:
            result["enqueue_many"] = phase_enqueue_only(stack, args.enqueue_messages)
            say(f"[{kind}] enqueue_many: {result['enqueue_many']['msg_per_s']} msg/s")
        worker = start_workers(stack, children, args.concurrency)
        scheduler = children.start(
            f"scheduler-{kind}", [sys.executable, "-m", "mailqueue", "scheduler"], env=stack.env()
        )
        phase_mailqueue(stack, children, args.warmup, 1, "warm-up")
        result["mailqueue"] = phase_mailqueue(stack, children, args.messages, 1, "mailqueue")
        say(f"[{kind}] mailqueue: {result['mailqueue']['msg_per_s']} msg/s")
        result["mailqueue_enqueue_many_composing"] = phase_mailqueue(
            stack, children, args.messages, 1, "mailqueue (composing)", compose=True
        )
        say(
            f"[{kind}] mailqueue incl. composition: "
            f"{result['mailqueue_enqueue_many_composing']['msg_per_s']} msg/s"
        )
        if args.latency_calls:
            stack.clear()
            result["enqueue_latency"] = lat = phase_enqueue_latency(
                stack, args.latency_calls, args.latency_gaps_ms
            )
            wait_drained(stack, lat["calls"], "latency drain", args.timeout)
            say(f"[{kind}] enqueue p50 {result['enqueue_latency']['p50_ms']} ms")
        if args.multi_messages:
            result["mailqueue_5_recipients"] = phase_mailqueue(
                stack, children, args.multi_messages, 5, "5 recipients"
            )
            say(f"[{kind}] 5 rcpt: {result['mailqueue_5_recipients']['msg_per_s']} msg/s")
        if args.suppression_rows and kind in args.suppression_stacks:
            result["suppression"] = phase_suppression(
                stack,
                children,
                args.suppression_messages or args.messages,
                args.suppression_rows,
                args.suppression_rounds,
            )
            sup = result["suppression"]
            say(
                f"[{kind}] suppression {sup['rows']} rows / empty: best "
                f"{sup['loaded_over_empty_best']}, median {sup['loaded_over_empty_median']}"
            )
        result["worker_rss_after_runs_mb"] = [
            round(r / 2**20, 1) for r in worker_children_rss(worker)
        ]
        children.stop(worker)
        children.stop(scheduler)
        if kind in args.memory_stacks and args.depth_rows:
            result["memory_depth"] = phase_depth(
                stack, children, sorted({min(1000, args.depth_rows), args.depth_rows})
            )
            say(f"[{kind}] depth: {json.dumps(result['memory_depth'])}")
        if kind in args.memory_stacks and args.attachment_mb:
            result["attachment"] = phase_attachment(stack, children, args.attachment_mb)
            say(f"[{kind}] attachment: {json.dumps(result['attachment'])}")
        bare = result["bare"]["msg_per_s"]
        mq = result["mailqueue"]["msg_per_s"]
        result["ratios"] = {
            "mailqueue_over_bare": round(mq / bare, 3),
            "bare_pipelined_over_bare": round(result["bare_pipelined"]["msg_per_s"] / bare, 3),
        }
        if "naive" in result:
            result["ratios"]["mailqueue_over_naive"] = round(mq / result["naive"]["msg_per_s"], 2)
    finally:
        children.stop_all_except(sink.proc)
        stack.drop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"sink: {result['sink']}"]
    for s in result["stacks"]:
        lines.append(f"== {s['stack']} ({s['database']})")
        for key in (
            "bare",
            "bare_pipelined",
            "naive",
            "mailqueue",
            "mailqueue_enqueue_many_composing",
            "mailqueue_5_recipients",
        ):
            if key in s:
                p = s[key]
                cpu = ", ".join(f"{r} {v}" for r, v in p["cpu_us_per_msg"].items())
                lines.append(
                    f"  {key:24s} {p['msg_per_s']:>9.1f} msg/s  "
                    f"({p['messages']} msgs, {p['seconds']} s; CPU µs/msg: {cpu})"
                )
        if "enqueue_many" in s:
            enq = s["enqueue_many"]
            lines.append(
                f"  enqueue_many alone        {enq['msg_per_s']:>9.1f} msg/s  "
                f"(composition alone {enq['compose_only_msg_per_s']}, "
                f"write + dispatch alone {enq['write_and_dispatch_only_msg_per_s']})"
            )
            lat = enq.get("idle_enqueue_latency")
            if lat:
                lines.append(f"  enqueue latency, idle     {_latency_line(lat)}")
        if "enqueue_latency" in s:
            lines.append(
                f"  enqueue latency, workers delivering  {_latency_line(s['enqueue_latency'])}"
            )
        lines.append(f"  ratios                    {s.get('ratios')}")
        if "memory_depth" in s:
            lines.append(f"  worker RSS by depth       {s['memory_depth']}")
        if "attachment" in s:
            lines.append(f"  attachment                {s['attachment']}")
        if "suppression" in s:
            sup = s["suppression"]
            lines.append(
                f"  suppression list          {sup['rows']} rows: msg/s best "
                f"{sup['best_msg_per_s']}, median {sup['median_msg_per_s']}; loaded/empty best "
                f"{sup['loaded_over_empty_best']}, median {sup['loaded_over_empty_median']}"
            )
    if result.get("smtp_source"):
        lines.append(f"smtp-source (raw limit): {result['smtp_source']['msg_per_s']} msg/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default="pg,embedded", help="comma list of pg, embedded")
    p.add_argument("--messages", type=int, default=10000, help="messages for bare and mailqueue")
    p.add_argument("--naive-messages", type=int, default=2000)
    p.add_argument("--enqueue-messages", type=int, default=20000, help="enqueue_many alone")
    p.add_argument(
        "--latency-calls", type=int, default=1000, help="single enqueue() calls, per gap"
    )
    p.add_argument(
        "--latency-gaps-ms",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[5.0, 0.5, 0.0],
        help="pauses between the timed enqueue() calls, comma list (0: back to back)",
    )
    p.add_argument("--multi-messages", type=int, default=10000, help="messages x 5 recipients")
    p.add_argument("--depth-rows", type=int, default=0, help="memory: rows queued (e.g. 1000000)")
    p.add_argument("--attachment-mb", type=int, default=0, help="memory: attachment size, MB")
    p.add_argument("--memory-stacks", default="pg", help="stacks that run the memory phases")
    p.add_argument("--warmup", type=int, default=500, help="messages before the timed runs")
    p.add_argument("--concurrency", type=int, default=2, help="worker processes (prefork)")
    p.add_argument("--pool-size", type=int, default=4, help="connections per worker process")
    p.add_argument("--bare-connections", type=int, default=8, help="bare: reused connections")
    p.add_argument("--batch-size", type=int, default=500, help="ids per Celery task")
    p.add_argument("--smtp-source", action="store_true", help="also run Postfix's smtp-source")
    p.add_argument(
        "--suppression-rows",
        type=int,
        default=0,
        help="end to end with an empty suppression list and with this many entries (1000000)",
    )
    p.add_argument(
        "--suppression-messages", type=int, default=0, help="messages per such run (--messages)"
    )
    p.add_argument("--suppression-rounds", type=int, default=2, help="alternations of the two")
    p.add_argument("--suppression-stacks", default="pg,embedded", help="stacks that run it")
    p.add_argument("--timeout", type=float, default=600, help="seconds per phase")
    p.add_argument("--output", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.memory_stacks = args.memory_stacks.split(",")
    args.suppression_stacks = args.suppression_stacks.split(",")

    # SIGTERM ends the run through the ``finally`` below: every child is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.output.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="mq-bench-logs-"))
    children = Children(logdir)
    sink = Sink(children)
    say(f"sink: {sink.kind} on {sink.url}; child logs in {logdir}")
    result: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "sink": sink.kind,
        "stacks": [],
    }
    try:
        for kind in args.stacks.split(","):
            result["stacks"].append(run_stack(kind, args, sink, children))
        if args.smtp_source:
            result["smtp_source"] = phase_smtp_source(sink, args.messages, 8)
    finally:
        children.stop_all()
        if sink.devserver is not None:
            sink.devserver.stop()
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.output / f"bench-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    say(summary(result))
    say(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
