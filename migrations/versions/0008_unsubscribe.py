"""``mq_message.unsubscribe``: one-click List-Unsubscribe per recipient (RFC 8058).

A boolean with a constant server default: PostgreSQL 11+ adds it without
rewriting ``mq_message`` (the default lives in the catalog), so the lock is brief.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Not in batch mode: SQLite's ALTER TABLE ADD COLUMN takes a NOT NULL column with a
    # constant default, and a batch would rebuild the table for the expression default.
    op.add_column(
        "mq_message",
        sa.Column("unsubscribe", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+): a batch would rebuild mq_message and lose the
    # expression index of migration 0003.
    op.drop_column("mq_message", "unsubscribe")
