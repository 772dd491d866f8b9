"""Every attempt's result per recipient (the message page shows the history).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 08:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "mq_attempt",
        sa.Column("id", big_id, autoincrement=True, nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("recipient_id", big_id, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("smtp_code", sa.SmallInteger(), nullable=True),
        sa.Column("enhanced_code", sa.String(length=16), nullable=True),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.Column("error", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["mq_message.id"],
            name=op.f("fk_mq_attempt_message_id_mq_message"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["recipient_id"],
            ["mq_recipient.id"],
            name=op.f("fk_mq_attempt_recipient_id_mq_recipient"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mq_attempt")),
    )
    op.create_index("ix_mq_attempt_message", "mq_attempt", ["message_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_mq_attempt_message", table_name="mq_attempt")
    op.drop_table("mq_attempt")
