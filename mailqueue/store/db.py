"""Engines: one per database URL per process, tuned per backend.

SQLite (the embedded default) is shared by the app, the worker and the
scheduler processes, so it runs in WAL mode with a long busy timeout and
takes the write lock at BEGIN (``BEGIN IMMEDIATE``): a transaction that
reads, then writes, can then never fail half-way with "database is locked".
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["get_engine", "normalize_url", "dispose_engines"]

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _create(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)) or ".", exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        engine = create_engine(url, **kwargs)
        _tune_sqlite(engine)
        return engine
    kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
    return create_engine(url, **kwargs)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str) -> Engine:
    """The process's engine for ``url`` (created on first use, after any fork)."""
    url = normalize_url(url)
    key = f"{os.getpid()}:{url}"
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = _create(url)
    return engine


def dispose_engines() -> None:
    """Forget every engine (tests, settings changes, after fork)."""
    with _lock:
        for key, engine in list(_engines.items()):
            if key.startswith(f"{os.getpid()}:"):
                engine.dispose()
            else:
                engine.dispose(close=False)  # inherited from the parent: do not touch its sockets
        _engines.clear()
