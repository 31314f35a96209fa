"""operator views: message_counts, pending_backlog, resolved_hourly, failures_by_error

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

The views are the stable SQL interface for operators (docs/sql.md documents their columns). Their
text is written out here rather than imported, so this revision keeps creating exactly what it
created when it was written; a later change of a view is a new revision.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS: dict[str, str] = {
    # Where things stand: one row per account, OA and state. total_price is 0, not NULL, where no
    # price is known, so the column sums without COALESCE.
    "message_counts": """
        SELECT account, oa_id, state,
               count(*) AS messages,
               COALESCE(sum(total_price), 0) AS total_price
        FROM messages
        GROUP BY account, oa_id, state
    """,
    # Only pending rows, so the scan runs on the partial index of pending rows however many
    # final rows the table holds. A leased row's next_poll_at is its lease's end, so a row in
    # flight is never counted as overdue.
    "pending_backlog": """
        SELECT account, oa_id,
               count(*) AS pending,
               min(created_at) AS oldest_created_at,
               now() - min(created_at) AS oldest_age,
               count(*) FILTER (WHERE next_poll_at < now()) AS overdue,
               count(*) FILTER (WHERE lease_id IS NOT NULL) AS in_flight
        FROM messages
        WHERE state = 'pending'
        GROUP BY account, oa_id
    """,
    # Every final row (sent, failed, rejected, expired) in the hour it became final, in the
    # session's time zone.
    "resolved_hourly": """
        SELECT date_trunc('hour', resolved_at) AS hour, account, oa_id, zns_temp_id, state,
               count(*) AS messages,
               COALESCE(sum(total_price), 0) AS total_price
        FROM messages
        WHERE resolved_at IS NOT NULL
        GROUP BY 1, account, oa_id, zns_temp_id, state
    """,
    # Failed and rejected rows by the code their ErrorInfo starts with, with the newest ErrorInfo
    # as the example to read.
    "failures_by_error": """
        SELECT account, error_code,
               count(*) AS messages,
               max(resolved_at) AS last_seen,
               (array_agg(error_info ORDER BY resolved_at DESC NULLS LAST)
                    FILTER (WHERE error_info IS NOT NULL))[1] AS sample_error_info
        FROM messages
        WHERE state IN ('failed', 'rejected')
        GROUP BY account, error_code
    """,
}


def upgrade() -> None:
    for name, query in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {query}")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
