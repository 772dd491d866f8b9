"""The serverless broker file is safe to share from the first second.

Processes that open a fresh SQLite broker at the same moment (the first
worker and the first producers) must all succeed: kombu alone creates the
queue row with a check-then-insert, and the loser of that race died with
``UNIQUE constraint failed: kombu_queue.name``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

PRODUCER = r"""
import os, sys, time, uuid
from mailqueue.config import configure, settings_from_env
configure(settings_from_env())
go = sys.argv[1]
open(go + "." + str(os.getpid()), "w").close()  # ready
while not os.path.exists(go):
    time.sleep(0.001)
from mailqueue.worker.app import TASK_NAME, get_app
from mailqueue.config import get_settings
get_app().send_task(TASK_NAME, args=[[str(uuid.uuid4())]], queue=get_settings().queue_name)
"""


def test_processes_opening_a_fresh_broker_together_all_publish(tmp_path):
    broker = tmp_path / "broker.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILQUEUE_")}
    env.update(
        MAILQUEUE_BROKER_URL=f"sqla+sqlite:///{broker}",
        MAILQUEUE_DATABASE_URL=f"sqlite:///{tmp_path / 'mq.db'}",
        MAILQUEUE_QUEUE="race",
    )
    rounds, per_round = 2, 6
    for round_ in range(rounds):
        for leftover in tmp_path.glob("broker.db*"):
            leftover.unlink()
        go = tmp_path / f"go-{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", PRODUCER, str(go)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(per_round)
        ]
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob(f"go-{round_}.*"))) < per_round:  # all imported, waiting
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        go.touch()
        errors = []
        for proc in procs:
            _out, err = proc.communicate(timeout=60)
            if proc.returncode:
                errors.append(err[-600:])
        assert not errors, f"round {round_}: {len(errors)} process(es) failed:\n" + errors[0]
        with sqlite3.connect(broker) as db:
            [(queues,)] = db.execute("SELECT count(*) FROM kombu_queue WHERE name = 'race'")
            [(published,)] = db.execute("SELECT count(*) FROM kombu_message")
        assert (queues, published) == (1, per_round)


def test_the_app_polls_its_broker_table_every_0_2_s_and_leaves_kombu_alone(tmp_path):
    """The interval lives on mailqueue's own transport class, not on kombu's.

    With kombu's default (1 s) and one task reserved per child, single
    enqueue()s drained at ~10 a second (test_worker_e2e.py measures the drain,
    ops/bench/README.md the figure); these are the two settings that avoid it.
    """
    from kombu import Connection
    from kombu.transport.sqlalchemy import Transport as KombuTransport

    from mailqueue.config import Settings
    from mailqueue.worker.app import SQLITE_BROKER_PREFETCH, _make_app
    from mailqueue.worker.sqla_transport import POLLING_INTERVAL_S, SqlaTransport

    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    app = _make_app(Settings(broker_url=url, database_url=f"sqlite:///{tmp_path / 'mq.db'}"))
    assert app.conf.worker_prefetch_multiplier == SQLITE_BROKER_PREFETCH > 1
    with app.connection_for_write() as conn:
        assert type(conn.transport) is SqlaTransport
        assert conn.transport.polling_interval == POLLING_INTERVAL_S == 0.2
        with conn.SimpleQueue("poll-check") as queue:
            queue.put({"n": 1})
    assert KombuTransport.polling_interval == 1.0  # kombu's own class, untouched
    with Connection(url) as plain:  # kombu's own URL form reads the same file and tables
        assert type(plain.transport) is KombuTransport
        assert plain.transport.polling_interval == 1.0
        with plain.SimpleQueue("poll-check") as queue:
            message = queue.get(timeout=30)
            assert message.payload == {"n": 1}
            message.ack()
