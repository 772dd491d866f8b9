"""Messages and their recipients: the queue's source of truth.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 06:16:19.025319
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "mq_message",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("relay", sa.String(length=64), nullable=False),
        sa.Column("mail_from", sa.String(length=320), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("smtputf8", sa.Boolean(), nullable=False),
        sa.Column("eightbit", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        sa.Column("last_reply", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mq_message")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_mq_message_idempotency_key")),
    )
    with op.batch_alter_table("mq_message", schema=None) as batch_op:
        batch_op.create_index("ix_mq_message_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            "ix_mq_message_status_due", ["status", "next_attempt_at"], unique=False
        )

    op.create_table(
        "mq_recipient",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("smtp_code", sa.SmallInteger(), nullable=True),
        sa.Column("enhanced_code", sa.String(length=16), nullable=True),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.Column("error", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["mq_message.id"],
            name=op.f("fk_mq_recipient_message_id_mq_message"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mq_recipient")),
        sa.UniqueConstraint("message_id", "address", name=op.f("uq_mq_recipient_message_id")),
    )
    with op.batch_alter_table("mq_recipient", schema=None) as batch_op:
        batch_op.create_index("ix_mq_recipient_address", ["address"], unique=False)
        batch_op.create_index("ix_mq_recipient_status", ["status"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("mq_recipient", schema=None) as batch_op:
        batch_op.drop_index("ix_mq_recipient_status")
        batch_op.drop_index("ix_mq_recipient_address")

    op.drop_table("mq_recipient")
    with op.batch_alter_table("mq_message", schema=None) as batch_op:
        batch_op.drop_index("ix_mq_message_status_due")
        batch_op.drop_index("ix_mq_message_created_at")

    op.drop_table("mq_message")
