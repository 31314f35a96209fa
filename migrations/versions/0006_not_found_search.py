"""RefIds the provider does not know: messages.not_found_count, poll_batches.kind and parked_for

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

GetCallback may answer Code 105 ("SMSID not found") for a whole request when one of its RefIds is
unknown to the provider (a message sent without CallbackUrl, a RefId the sender mistyped). The
poller then searches the batch for that RefId one half at a time (worker.notfound):

- `messages.not_found_count`: polls in a row that answered 105 for this RefId alone. Such a RefId
  is polled alone from then on, on its own backoff, so it cannot poison the batches of RefIds the
  provider knows; an answer for it sets the count back to 0.
- `poll_batches.kind`: what the batch holds: `known` (RefIds the provider answered for before),
  `new` (never answered), `lone` (one RefId answered 105 before), `half` (half of a batch answered
  105, being searched).
- `poll_batches.parked_for`: a half leased but not sent: the answer to its sibling (that batch's
  id) decides whether it is searched next without a request of its own, or goes back to be polled.

Constant defaults and a nullable column: Postgres adds them without rewriting either table.
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
    op.add_column(
        "poll_batches",
        sa.Column("kind", sa.Text(), nullable=False, server_default=sa.text("'known'")),
    )
    op.add_column("poll_batches", sa.Column("parked_for", sa.Uuid(), nullable=True))
    op.create_index(
        "poll_batches_parked_for_idx",
        "poll_batches",
        ["parked_for"],
        postgresql_where=sa.text("parked_for IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("poll_batches_parked_for_idx", table_name="poll_batches")
    op.drop_column("poll_batches", "parked_for")
    op.drop_column("poll_batches", "kind")
    op.drop_column("messages", "not_found_count")
