"""messages.not_found_count: how many polls in a row answered Code 105 for this RefId alone

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

GetCallback may answer Code 105 ("SMSID not found") for a whole request when one of its RefIds is
unknown to the provider (a message sent without CallbackUrl, a RefId the sender mistyped). A RefId
answered 105 when it was polled alone is such a RefId, for now: the scheduler polls it alone from
then on, on its own backoff, so that it cannot poison the batches of RefIds the provider knows.
A successful answer that names it (or any successful poll of it) sets the count back to 0.
A constant default: Postgres adds the column without rewriting the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column("not_found_count", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    op.drop_column("messages", "not_found_count")
