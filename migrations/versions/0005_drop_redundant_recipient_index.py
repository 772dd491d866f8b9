"""Drop ix_mq_recipient_status: (status, updated_at) from 0003 serves every query it did.

Every index on mq_recipient is written again each time a recipient's status
changes (a status change can never be a HOT update), so an index whose
column list is a prefix of another one only costs: one index entry per
recipient per enqueue and per attempt, measured with ops/bench/worker_cpu.py.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_mq_recipient_status")
        return
    op.drop_index("ix_mq_recipient_status", table_name="mq_recipient")


def downgrade() -> None:
    op.create_index("ix_mq_recipient_status", "mq_recipient", ["status"])
