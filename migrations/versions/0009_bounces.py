"""mq_bounce: every bounce and complaint that came back, matched or not (issue #18).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "mq_bounce",
        sa.Column("id", big_id, autoincrement=True, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("envelope_to", sa.String(length=320), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=True),
        sa.Column("address", sa.String(length=320), nullable=True),
        sa.Column("enhanced_code", sa.String(length=16), nullable=True),
        sa.Column("diagnostic", sa.Text(), nullable=True),
        sa.Column("feedback_type", sa.String(length=32), nullable=True),
        sa.Column("message_id", sa.Uuid(), nullable=True),
        sa.Column("recipient_id", big_id, nullable=True),
        sa.Column("effect", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("raw_size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["mq_message.id"],
            name=op.f("fk_mq_bounce_message_id_mq_message"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["recipient_id"],
            ["mq_recipient.id"],
            name=op.f("fk_mq_bounce_recipient_id_mq_recipient"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mq_bounce")),
    )
    op.create_index("ix_mq_bounce_received_at", "mq_bounce", ["received_at"])
    op.create_index("ix_mq_bounce_recipient_id", "mq_bounce", ["recipient_id"])


def downgrade() -> None:
    op.drop_index("ix_mq_bounce_recipient_id", table_name="mq_bounce")
    op.drop_index("ix_mq_bounce_received_at", table_name="mq_bounce")
    op.drop_table("mq_bounce")
