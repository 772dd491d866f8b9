"""The embedded database file: WAL checkpoints happen beside the callers, not in them."""

from __future__ import annotations

import sqlite3

import mailqueue
from mailqueue import Message
from mailqueue.config import configure
from mailqueue.migrate import upgrade
from mailqueue.store import dispose_engines, get_engine

from .conftest import wait_until


def _rows_in_the_main_file(path) -> int:
    """Messages readable from the database file alone, ignoring the WAL (immutable)."""
    try:
        with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
            return db.execute("SELECT count(*) FROM mq_message").fetchone()[0]
    except sqlite3.OperationalError:  # not even the schema is in the file yet
        return 0


def test_commits_leave_checkpoints_to_the_background(tmp_path):
    """SQLite's auto-checkpoint made the commit that crossed 1,000 WAL pages copy them
    back and sync the file: one enqueue() in ~70 took 15-20 ms. Commits now leave that
    to a background thread; the rows still reach the database file on their own."""
    path = tmp_path / "mq.db"
    url = f"sqlite:///{path}"
    configure(database_url=url, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    upgrade(url)
    try:
        with get_engine(url).connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 10_000
        for i in range(120):  # ~1,700 WAL pages: past SQLite's own threshold of 1,000
            mailqueue.enqueue(
                Message(sender="a@example.com", to=f"r{i}@example.com", subject="s", text="t")
            )
        wait_until(lambda: _rows_in_the_main_file(path) == 120, timeout=5, what="a checkpoint")
    finally:
        dispose_engines()
