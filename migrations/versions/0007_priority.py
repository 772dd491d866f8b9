"""mq_message.priority: the message's lane (high 0, normal 1, bulk 2; see mailqueue.priority).

A small integer so the scheduler can ``ORDER BY`` it; existing rows and
writers that do not name it get ``normal``. Adding a column with a constant
default rewrites nothing on PostgreSQL 11+ (the default lives in the catalog).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "mq_message",
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("1")),
    )


def downgrade() -> None:
    # A plain ALTER TABLE … DROP COLUMN (SQLite 3.35+): a batch copy of the table would
    # lose the expression index on metadata's tag (0003), which reflection skips.
    op.drop_column("mq_message", "priority")
