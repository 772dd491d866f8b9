"""Suppression list (``mq_suppression``) and ``mq_message.list_id``.

The table is new, so its unique (address_key, scope) index is built with it:
no live rows to lock. ``list_id`` is a nullable column without a default,
which PostgreSQL adds without rewriting ``mq_message`` (a catalog change,
brief lock only), as does SQLite (``ALTER TABLE … ADD COLUMN``).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "mq_suppression",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("address_key", sa.String(320), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(262), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mq_suppression"),
        sa.UniqueConstraint("address_key", "scope", name="uq_mq_suppression_key_scope"),
    )
    op.create_index("ix_mq_suppression_created", "mq_suppression", ["created_at", "id"])
    op.add_column("mq_message", sa.Column("list_id", sa.String(255), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE … DROP COLUMN (SQLite 3.35+, which mailqueue needs anyway): a
    # batch "move and copy" would rebuild mq_message without its expression index.
    op.drop_column("mq_message", "list_id")
    op.drop_index("ix_mq_suppression_created", table_name="mq_suppression")
    op.drop_table("mq_suppression")
