"""Indexes for the status page: filtered listings, time series, the tag filter.

Additive only. Each listing filter gets an index that starts with its column
and ends with ``(created_at, id)``, the listing's order, so "newest first
where X" reads the index backwards and stops after one page even with
millions of rows; the time
series reads ``sent_at`` and ``(status, updated_at)`` ranges of recipients.
The tag index is an expression index on the metadata key ``tag``; its
expression must match ``mailqueue.store.ops.tag_expression`` exactly.

On PostgreSQL the indexes are built ``CONCURRENTLY`` (outside a transaction)
so that a live queue keeps writing while they are built.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (name, table, columns or SQL expressions)
INDEXES = [
    ("ix_mq_message_status_created", "mq_message", ["status", "created_at", "id"]),
    ("ix_mq_message_relay_created", "mq_message", ["relay", "created_at", "id"]),
    ("ix_mq_message_from_created", "mq_message", ["mail_from", "created_at", "id"]),
    ("ix_mq_recipient_sent_at", "mq_recipient", ["sent_at"]),
    ("ix_mq_recipient_status_updated", "mq_recipient", ["status", "updated_at"]),
]

TAG_INDEX = "ix_mq_message_tag_created"
TAG_SQL = {
    "postgresql": "(meta ->> 'tag')",
    "sqlite": "json_extract(meta, '$.tag')",
}


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    if dialect == "postgresql":
        with op.get_context().autocommit_block():
            for name, table, columns in INDEXES:
                op.execute(
                    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} "
                    f"({', '.join(columns)})"
                )
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {TAG_INDEX} ON mq_message "
                f"({TAG_SQL['postgresql']}, created_at, id)"
            )
        return
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    expr = TAG_SQL.get(dialect)
    if expr is not None:
        op.create_index(
            TAG_INDEX, "mq_message", [sa.text(expr), sa.text("created_at"), sa.text("id")]
        )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name in TAG_SQL:
        op.drop_index(TAG_INDEX, table_name="mq_message")
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
