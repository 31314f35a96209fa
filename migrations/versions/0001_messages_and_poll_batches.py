"""messages and poll batches

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("ref_id", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), server_default=sa.text("'default'"), nullable=False),
        sa.Column("oa_id", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("state", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("send_status", sa.Integer(), nullable=True),
        sa.Column("send_success", sa.Integer(), nullable=True),
        sa.Column("send_failed", sa.Integer(), nullable=True),
        sa.Column("total_receiver", sa.Integer(), nullable=True),
        sa.Column("total_sent", sa.Integer(), nullable=True),
        sa.Column("type_id", sa.Integer(), nullable=True),
        sa.Column("telco_id", sa.Integer(), nullable=True),
        sa.Column("total_price", sa.Numeric(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("phone_number", sa.Text(), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("partner_ids", sa.Text(), nullable=True),
        sa.Column("error_info", sa.Text(), nullable=True),
        sa.Column("zns_temp_id", sa.Text(), nullable=True),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("poll_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_id", sa.Uuid(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'sent', 'failed', 'rejected', 'expired')",
            name="messages_state_check",
        ),
        sa.PrimaryKeyConstraint("ref_id"),
    )
    op.create_index(
        "messages_due_idx",
        "messages",
        ["account", "next_poll_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "messages_new_idx",
        "messages",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending' AND next_poll_at IS NULL"),
    )
    op.create_index(
        "messages_pending_created_idx",
        "messages",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "poll_batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("oa_id", sa.Text(), nullable=False),
        sa.Column("ref_ids", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "poll_batches_account_idx", "poll_batches", ["account", "lease_expires_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("poll_batches_account_idx", table_name="poll_batches")
    op.drop_table("poll_batches")
    op.drop_index(
        "messages_pending_created_idx",
        table_name="messages",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_index(
        "messages_new_idx",
        table_name="messages",
        postgresql_where=sa.text("state = 'pending' AND next_poll_at IS NULL"),
    )
    op.drop_index(
        "messages_due_idx", table_name="messages", postgresql_where=sa.text("state = 'pending'")
    )
    op.drop_table("messages")
