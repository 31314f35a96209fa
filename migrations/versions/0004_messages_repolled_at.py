"""messages.repolled_at: when an operator last revived an expired message

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

`esms-poller repoll --expired` puts an expired message back to pending. The expiry sweep counts
the maximum age from `created_at`, so without this column it would expire the revived message
again at the next tick; it now counts from the later of `created_at` and `repolled_at`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("repolled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("messages", "repolled_at")
