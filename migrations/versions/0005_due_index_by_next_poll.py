"""messages_due_idx becomes messages_due_at_idx: due rows are those with a next poll time

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

The scheduler's claim asked for `state = 'pending' AND next_poll_at <= now()`. Only pending rows
have a next poll time, but the planner multiplies the two selectivities as if they were
independent: with 100,000 pending rows among 1,100,000 it expected 9,000 due rows, preferred
sorting every pending row to reading the first few thousand of the due index, and a claim cost
25 ms of Postgres CPU instead of 1 ms. Keyed on `next_poll_at IS NOT NULL` (which implies
pending: every path that makes a row final clears its next poll time), the claim needs no state
filter, the estimate is right and the index is read in order. Built and dropped CONCURRENTLY, so
the poller's writes never wait for it. A concurrent build that fails midway (migrations/env.py's
lock_timeout, then a retry) leaves an invalid index of that name behind, which IF NOT EXISTS would
take for built: such a leftover is dropped first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _drop_if_invalid(name: str) -> None:
    invalid = (
        op.get_bind()
        .execute(
            sa.text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": name},
        )
        .scalar()
    )
    if invalid:
        op.drop_index(name, table_name="messages", postgresql_concurrently=True, if_exists=True)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_if_invalid("messages_due_at_idx")
        op.create_index(
            "messages_due_at_idx",
            "messages",
            ["account", "next_poll_at"],
            unique=False,
            postgresql_where=sa.text("next_poll_at IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "messages_due_idx",
            table_name="messages",
            postgresql_concurrently=True,
            if_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_if_invalid("messages_due_idx")
        op.create_index(
            "messages_due_idx",
            "messages",
            ["account", "next_poll_at"],
            unique=False,
            postgresql_where=sa.text("state = 'pending'"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.drop_index(
            "messages_due_at_idx",
            table_name="messages",
            postgresql_concurrently=True,
            if_exists=True,
        )
