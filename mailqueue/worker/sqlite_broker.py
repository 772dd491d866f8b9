"""Prepare kombu's SQLite broker file so that several processes can share it.

The serverless default broker is kombu's SQLAlchemy transport on a SQLite
file. kombu creates its tables and each queue's row on first use with a
check-then-insert guarded by a *thread* lock only, so the first worker and
the first producer starting together race: one of them dies with
``UNIQUE constraint failed: kombu_queue.name`` (seen in the benchmark's
smoke test). Here every process creates the tables and the queue rows once,
under an exclusive file lock, before kombu touches the file; kombu then only
finds what is already there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator

log = logging.getLogger("mailqueue.dispatch")

_PREFIX = "sqla+sqlite:///"


def sqlite_broker_path(broker_url: str) -> str | None:
    """The file behind a ``sqla+sqlite:///`` URL, or None (other brokers, memory)."""
    if not broker_url.startswith(_PREFIX):
        return None
    path = broker_url[len(_PREFIX) :].split("?", 1)[0]
    return None if not path or path == ":memory:" else path


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the race stays possible, nothing else changes
        yield
        return
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_sqlite_broker(broker_url: str, queues: Iterable[str]) -> None:
    """WAL mode, kombu's tables and a row per queue, made once under a file lock.

    WAL: in the default rollback-journal mode every publish is several fsyncs
    and a writer blocks the workers polling the table (measured: a single
    ``enqueue`` spent most of its ~10 ms there). The broker is not the source
    of truth (the scheduler re-dispatches from SQL); WAL only makes it cheaper.
    """
    path = sqlite_broker_path(broker_url)
    if path is None:
        return
    from kombu import Connection
    from kombu.transport.sqlalchemy import Channel

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    engines_before = set(Channel._engines)
    try:
        with _file_lock(path):
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
                db.execute("PRAGMA journal_mode=WAL")
            with Connection(broker_url) as conn:
                channel = conn.channel()
                try:
                    for queue in queues:
                        channel.queue_declare(queue)
                finally:
                    channel.close()
    except Exception as exc:  # noqa: BLE001 - kombu still creates them itself, racily
        log.warning("could not prepare the SQLite broker %s: %s", path, exc)
    finally:
        # Drop the engine kombu cached for this preparation: a prefork child
        # must not inherit an open SQLite connection from its parent.
        for key in set(Channel._engines) - engines_before:
            engine, _session = Channel._engines.pop(key)
            engine.dispose()
