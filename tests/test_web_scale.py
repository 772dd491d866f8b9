"""The page and API stay fast on a big table: every listing filter reads an index.

By default the table is seeded with 20,000 messages (seconds). To measure at
the issue's size, run::

    MAILQUEUE_SCALE_ROWS=1000000 .venv/bin/pytest -q -s tests/test_web_scale.py

which prints each request's time (the README quotes such a run).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from mailqueue.store import ops
from mailqueue.web.app import create_app

from .test_django import dj  # noqa: F401  (fixture)
from .test_django_admin import django_env  # noqa: F401  (fixture)

ROWS = int(os.environ.get("MAILQUEUE_SCALE_ROWS", "20000"))
TOKEN = "scale"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

_STATUS = """CASE WHEN i % 100 < 90 THEN 'sent' WHEN i % 100 < 95 THEN 'failed'
                  WHEN i % 100 < 98 THEN 'deferred' ELSE 'queued' END"""
_RCPT_STATUS = """CASE m.status WHEN 'queued' THEN 'pending' ELSE m.status END"""


def seed(engine: sa.Engine, rows: int) -> None:
    """``rows`` messages over the last ``rows`` seconds, one recipient each, in SQL."""
    if engine.dialect.name == "postgresql":
        messages = f"""
            INSERT INTO mq_message (id, created_at, updated_at, status, relay, mail_from, subject,
                size, content, smtputf8, eightbit, attempts, next_attempt_at, expires_at, meta)
            SELECT gen_random_uuid(), now() - i * interval '1 second',
                   now() - i * interval '1 second', {_STATUS},
                   CASE WHEN i % 10 = 0 THEN 'bulk' ELSE 'default' END,
                   'sender' || (i % 50) || '@example.com', 'seed ' || i, 40,
                   convert_to('Subject: seed' || chr(13) || chr(10) || chr(13) || chr(10)
                              || 'body', 'UTF8'), false, false, 1,
                   now() - i * interval '1 second', now() + interval '5 days',
                   json_build_object('tag', 'tag' || (i % 20))
            FROM generate_series(1, {rows}) AS i"""
        recipients = f"""
            INSERT INTO mq_recipient (message_id, address, kind, status, attempts, smtp_code,
                reply, updated_at, sent_at)
            SELECT m.id, 'user' || substr(m.subject, 6) || '@example.org', 'to', {_RCPT_STATUS},
                   1, CASE m.status WHEN 'sent' THEN 250 WHEN 'failed' THEN 550 END,
                   CASE m.status WHEN 'failed' THEN '5.1.1 unknown' END, m.updated_at,
                   CASE m.status WHEN 'sent' THEN m.updated_at END
            FROM mq_message m WHERE m.subject LIKE 'seed %'"""
        with engine.begin() as conn:  # psycopg wants a literal % doubled
            conn.exec_driver_sql(messages.replace("%", "%%"))
            conn.exec_driver_sql(recipients.replace("%", "%%"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE mq_message")
            conn.exec_driver_sql("ANALYZE mq_recipient")
        return
    ts = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || i || ' seconds') || '000'"
    messages = f"""
        WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {rows})
        INSERT INTO mq_message (id, created_at, updated_at, status, relay, mail_from, subject,
            size, content, smtputf8, eightbit, attempts, next_attempt_at, expires_at, meta)
        SELECT lower(hex(randomblob(16))), {ts}, {ts}, {_STATUS},
               CASE WHEN i % 10 = 0 THEN 'bulk' ELSE 'default' END,
               'sender' || (i % 50) || '@example.com', 'seed ' || i, 40,
               CAST('Subject: seed' || char(13, 10, 13, 10) || 'body' AS BLOB), 0, 0, 1,
               {ts}, strftime('%Y-%m-%d %H:%M:%f', 'now', '+5 days') || '000',
               json_object('tag', 'tag' || (i % 20))
        FROM seq"""
    recipients = f"""
        INSERT INTO mq_recipient (message_id, address, kind, status, attempts, smtp_code,
            reply, updated_at, sent_at)
        SELECT m.id, 'user' || substr(m.subject, 6) || '@example.org', 'to', {_RCPT_STATUS},
               1, CASE m.status WHEN 'sent' THEN 250 WHEN 'failed' THEN 550 END,
               CASE m.status WHEN 'failed' THEN '5.1.1 unknown' END, m.updated_at,
               CASE m.status WHEN 'sent' THEN m.updated_at END
        FROM mq_message m WHERE m.subject LIKE 'seed %'"""
    with engine.begin() as conn:
        conn.exec_driver_sql(messages)
        conn.exec_driver_sql(recipients)
        conn.exec_driver_sql("ANALYZE")


def plan(engine: sa.Engine, stmt) -> str:
    compiled = stmt.compile(dialect=engine.dialect)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
            return "\n".join(r[0] for r in rows)
        params = tuple(compiled.params[k] for k in compiled.positiontup)
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)
        return "\n".join(r[-1] for r in rows)


# Each filter and the indexes that may serve it. For values that are common
# in the seed (status=failed 5 %, relay=bulk 10 %, one sender 2 %)
# PostgreSQL may instead walk created_at backwards and skip the rest: at
# most ~50 rows read per row shown, as cheap as the filter's own index; it
# picks either from sampled statistics (seen both ways on the same data).
# Rare values (a tag, one recipient) must use their own index.
_NEWEST = "ix_mq_message_created_at"
FILTERS = {
    "status": (ops.Filters(status="failed"), ("ix_mq_message_status_created", _NEWEST)),
    "relay": (ops.Filters(relay="bulk"), ("ix_mq_message_relay_created", _NEWEST)),
    "sender": (ops.Filters(sender="sender7@example.com"), ("ix_mq_message_from_created", _NEWEST)),
    "tag": (ops.Filters(tag="rare"), ("ix_mq_message_tag_created",)),
    "recipient": (ops.Filters(recipient="user777@example.org"), ("ix_mq_recipient_address",)),
    "none": (ops.Filters(), (_NEWEST,)),
}


@pytest.mark.slow
def test_listing_filters_use_their_index_and_pages_answer_fast(stack):
    started = time.perf_counter()
    seed(stack.engine, ROWS)
    seeded_s = time.perf_counter() - started

    for name, (filters, indexes) in FILTERS.items():
        text = plan(stack.engine, ops.search_statement(stack.engine, filters, limit=50))
        assert any(i in text for i in indexes), f"{name}: none of {indexes} used:\n{text}"
        assert "Seq Scan on mq_message" not in text, f"{name}:\n{text}"

    client = TestClient(create_app(token=TOKEN))
    first = client.get("/api/v1/messages?limit=50", headers=AUTH).json()
    deep_anchor = first["next_before"]
    recent_failed = client.get("/api/v1/messages?status=failed&limit=1", headers=AUTH).json()
    failed_id = recent_failed["messages"][0]["id"]
    requests = {
        "GET / (counts, 24h chart, newest 50)": "/",
        "GET / filtered by status=failed": "/?status=failed",
        "API list newest 50": "/api/v1/messages?limit=50",
        "API list page 2 (keyset)": f"/api/v1/messages?limit=50&before={deep_anchor}",
        "API list status=deferred": "/api/v1/messages?status=deferred",
        "API list relay=bulk": "/api/v1/messages?relay=bulk",
        "API list sender": "/api/v1/messages?sender=sender7@example.com",
        "API list tag": "/api/v1/messages?tag=tag3",
        "API list recipient": "/api/v1/messages?recipient=user777@example.org",
        "API list since+until": "/api/v1/messages?since=2020-01-01&until=2100-01-01",
        "API stats": "/api/v1/stats",
        "API series 24h": "/api/v1/series?window=24h",
        "API status one message": f"/api/v1/messages/{failed_id}",
        "page one message": f"/messages/{failed_id}",
    }
    timings = {}
    statements: dict[str, list[str]] = {}
    for name, url in requests.items():
        with _statements() as seen:
            t0 = time.perf_counter()
            response = client.get(url, headers=AUTH)
            timings[name] = time.perf_counter() - t0
        statements[name] = seen
        assert response.status_code == 200, (name, response.text[:300])
    stats = client.get("/api/v1/stats", headers=AUTH).json()
    assert sum(stats["messages"].values()) == ROWS
    assert stats["messages"]["sent"] == ROWS * 90 // 100

    print(f"\n{stack.name}: {ROWS:,} messages seeded in {seeded_s:.1f}s")
    for name, seconds in timings.items():
        print(f"  {seconds * 1000:8.1f} ms  {len(statements[name])} SQL  {name}")
    # Shapes, not times: each request runs a handful of statements whatever the
    # table's size, and a listing reads one page (LIMIT), never the whole table.
    for name, seen in statements.items():
        assert len(seen) <= 10, (name, seen)  # none at all when a cached answer serves
        if name.startswith("API list"):
            for sql in seen:
                if "FROM mq_message" in sql and "mq_message.id =" not in sql:
                    assert "LIMIT" in sql, (name, sql)


@contextlib.contextmanager
def _statements() -> Iterator[list[str]]:
    """Every SQL statement any engine runs inside the block."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append(" ".join(statement.split()))

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)


# The Django admin's list (mailqueue.contrib.django_admin) on the same table:
# what each page may read. As above, PostgreSQL may serve a common status or
# relay by walking created_at backwards; a recipient must use its own index.
ADMIN_PAGES = {  # name: (query string, indexes that may serve it, rows shown)
    "newest 50": ("", (_NEWEST,), 50),
    "status=failed": ("?status=failed", ("ix_mq_message_status_created", _NEWEST), 50),
    "relay=bulk": ("?relay=bulk", ("ix_mq_message_relay_created", _NEWEST), 50),
    "tag=tag3": ("?tag=tag3", ("ix_mq_message_tag_created", _NEWEST), 50),
    "tag=rare": ("?tag=rare", ("ix_mq_message_tag_created",), 0),
    "search recipient": ("?q=user777%40example.org", ("ix_mq_recipient_address",), 1),
    "page 3": ("?p=3", (_NEWEST,), 50),
}


@pytest.mark.slow
def test_django_admin_list_reads_one_page_of_an_index_and_never_counts_the_table(dj):  # noqa: F811
    """The admin's list page on ``ROWS`` messages: bounded queries, a capped count, an index."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    from mailqueue.contrib.django_admin.admin import COUNT_CAP

    from .test_django_admin import _clean, _user

    _clean(dj)
    started = time.perf_counter()
    seed(dj.engine, ROWS)
    seeded_s = time.perf_counter() - started
    try:
        client = _user("scale", superuser=True)
        connection = connections[dj.alias]
        timings = {}
        for name, (query, indexes, shown) in ADMIN_PAGES.items():
            with CaptureQueriesContext(connection) as captured:
                t0 = time.perf_counter()
                response = client.get("/admin/mailqueue/message/" + query)
                timings[name] = time.perf_counter() - t0
            assert response.status_code == 200, (name, response.content[:300])
            html = response.content.decode()
            assert html.count('class="action-select"') == shown, name
            reads = [q["sql"] for q in captured.captured_queries if "mq_message" in q["sql"]]
            # the page and one count, whatever the table's size
            assert len(reads) == 2, (name, reads)
            counts = [sql for sql in reads if "COUNT(" in sql.upper()]
            assert len(counts) == 1 and f"LIMIT {COUNT_CAP + 1}" in counts[0], (name, counts)
            (page,) = [sql for sql in reads if sql not in counts]
            text = _explain(connection, page)
            assert any(i in text for i in indexes), f"{name}: none of {indexes}:\n{text}"
            assert "Seq Scan on mq_message" not in text, f"{name}:\n{text}"
            assert not re.search(r"SCAN mq_message(?! USING)", text), f"{name}:\n{text}"
            if ROWS > COUNT_CAP and name in ("newest 50", "page 3"):
                assert f"more than {COUNT_CAP} messages" in html, name
    finally:
        _clean(dj)

    print(f"\nDjango admin, {dj.name}: {ROWS:,} messages seeded in {seeded_s:.1f}s")
    for name, seconds in timings.items():
        print(f"  {seconds * 1000:8.1f} ms  admin list {name}")


def _explain(connection, sql: str) -> str:
    """The plan of a statement Django ran (its SQL with the values in), as text."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("EXPLAIN " + sql.replace("%", "%%"))
            return "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("EXPLAIN QUERY PLAN " + sql.replace("%", "%%"))
        return "\n".join(str(row[-1]) for row in cursor.fetchall())


def _index_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        query = (
            "SELECT name FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name IN ('mq_message', 'mq_recipient')"
        )
    else:
        query = "SELECT indexname FROM pg_indexes WHERE tablename IN ('mq_message', 'mq_recipient')"
    try:
        with engine.connect() as conn:
            return set(conn.exec_driver_sql(query).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrations_0003_and_0005_change_indexes_only_and_reverse(kind, empty_database):
    from mailqueue.migrate import alembic_config, upgrade

    url = empty_database

    from alembic import command

    upgrade(url, "0002")
    before = _index_names(url)
    upgrade(url, "0003")
    after = _index_names(url)
    added = {
        "ix_mq_message_status_created",
        "ix_mq_message_relay_created",
        "ix_mq_message_from_created",
        "ix_mq_message_tag_created",
        "ix_mq_recipient_sent_at",
        "ix_mq_recipient_status_updated",
    }
    assert after == before | added
    command.downgrade(alembic_config(url), "0002")
    assert _index_names(url) == before
    upgrade(url, "0003")
    assert _index_names(url) == after
    # 0005 drops the status index that (status, updated_at) makes redundant.
    upgrade(url, "0005")
    assert _index_names(url) == after - {"ix_mq_recipient_status"}
    command.downgrade(alembic_config(url), "0004")
    assert _index_names(url) == after
