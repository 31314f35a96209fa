"""Operator reads that do not grow with the final rows: count tables, partial indexes, autovacuum

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

The views of 0003 counted the whole of `messages` at every query (1.4–2.5 s at 10M final rows).
A final row changes rarely (an expired one may still become sent, failed or rejected; an operator
may revive an expired one; retention deletes old ones), so its counts are kept as it changes:

- `message_count_deltas`: append-only. The statement that makes a row final, revives it or
  deletes it adds one row per (hour, account, OA, template, state, error code) it touched, +n or
  -n, in the same transaction. Writers only insert, so no two merges ever wait for one another.
- `message_totals` (per account, OA, state, error code) and `resolved_hourly_counts` (per UTC
  hour, account, OA, template, state): the deltas folded in by beat every few seconds
  (`store.fold_counts`), the only writer of these two tables.

A view adds the folded rows, the deltas not yet folded, and (for `message_counts`) the pending rows
counted live on their partial index. The tables are filled here from the rows as they are, in one
statement; a worker still running older code while this runs makes rows final without deltas, so
after every worker and beat runs this revision's code, `esms-poller recount` recounts once
(docs/scale.md).

Two partial indexes, on final rows only (so the poll path's updates of pending rows never touch
them): `messages_resolved_at_idx` (the last minutes for `status`, "today" for the cookbook, and
message retention) and `messages_failures_idx` (the newest failure per account and code, for
`failures_by_error`). Built CONCURRENTLY, like 0005: the poller's writes never wait for them.

Autovacuum settings for the update-heavy tables, chosen in docs/scale.md: on `messages` a vacuum
starts after a fixed number of dead rows, not a fifth of the table (2M at 10M rows); likewise for
`message_history`, which retention now deletes from. Storage parameters take a lock that does not
block writes, and apply to pages written from now on.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The views as written here, so this revision keeps creating what it created.
VIEWS: dict[str, str] = {
    "message_counts": """
        SELECT account, oa_id, state, CAST(sum(messages) AS bigint) AS messages,
               sum(total_price) AS total_price
        FROM (
            SELECT account, oa_id, state, messages, total_price FROM message_totals
            UNION ALL
            SELECT account, oa_id, state, messages, total_price FROM message_count_deltas
            UNION ALL
            SELECT account, oa_id, 'pending', count(*), COALESCE(sum(total_price), 0)
            FROM messages WHERE state = 'pending' GROUP BY account, oa_id
        ) AS c
        GROUP BY account, oa_id, state
        HAVING sum(messages) > 0
    """,
    "resolved_hourly": """
        SELECT hour, account, oa_id, zns_temp_id, state, CAST(sum(messages) AS bigint) AS messages,
               sum(total_price) AS total_price
        FROM (
            SELECT hour, account, oa_id, zns_temp_id, state, messages, total_price
            FROM resolved_hourly_counts
            UNION ALL
            SELECT hour, account, oa_id, zns_temp_id, state, messages, total_price
            FROM message_count_deltas WHERE hour IS NOT NULL
        ) AS c
        GROUP BY hour, account, oa_id, zns_temp_id, state
        HAVING sum(messages) > 0
    """,
    # The newest failure of each group comes from messages_failures_idx, one index probe per
    # group; its key folds a NULL error code into a value no Zalo code takes.
    "failures_by_error": """
        SELECT c.account, c.error_code, c.messages, newest.resolved_at AS last_seen,
               sample.error_info AS sample_error_info
        FROM (
            SELECT account, error_code, CAST(sum(messages) AS bigint) AS messages
            FROM (
                SELECT account, error_code, messages FROM message_totals
                WHERE state IN ('failed', 'rejected')
                UNION ALL
                SELECT account, error_code, messages FROM message_count_deltas
                WHERE state IN ('failed', 'rejected')
            ) AS d
            GROUP BY account, error_code
            HAVING sum(messages) > 0
        ) AS c
        LEFT JOIN LATERAL (
            SELECT m.resolved_at FROM messages AS m
            WHERE m.state IN ('failed', 'rejected') AND m.resolved_at IS NOT NULL
              AND m.account = c.account
              AND COALESCE(m.error_code, -2147483648) = COALESCE(c.error_code, -2147483648)
            ORDER BY m.resolved_at DESC LIMIT 1
        ) AS newest ON true
        LEFT JOIN LATERAL (
            SELECT m.error_info FROM messages AS m
            WHERE m.state IN ('failed', 'rejected') AND m.resolved_at IS NOT NULL
              AND m.account = c.account
              AND COALESCE(m.error_code, -2147483648) = COALESCE(c.error_code, -2147483648)
              AND m.error_info IS NOT NULL
            ORDER BY m.resolved_at DESC LIMIT 1
        ) AS sample ON true
    """,
}

# 0003's text of the same views, for the downgrade.
OLD_VIEWS: dict[str, str] = {
    "message_counts": """
        SELECT account, oa_id, state,
               count(*) AS messages,
               COALESCE(sum(total_price), 0) AS total_price
        FROM messages
        GROUP BY account, oa_id, state
    """,
    "resolved_hourly": """
        SELECT date_trunc('hour', resolved_at) AS hour, account, oa_id, zns_temp_id, state,
               count(*) AS messages,
               COALESCE(sum(total_price), 0) AS total_price
        FROM messages
        WHERE resolved_at IS NOT NULL
        GROUP BY 1, account, oa_id, zns_temp_id, state
    """,
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

# The counts of the rows as they are now, in one statement (one snapshot).
_FILL = """
    WITH fine AS MATERIALIZED (
        SELECT date_trunc('hour', resolved_at, 'UTC') AS hour, account, oa_id, zns_temp_id, state,
               error_code, count(*) AS messages, COALESCE(sum(total_price), 0) AS total_price
        FROM messages WHERE state <> 'pending'
        GROUP BY 1, 2, 3, 4, 5, 6
    ), hourly AS (
        INSERT INTO resolved_hourly_counts (hour, account, oa_id, zns_temp_id, state, messages,
                                            total_price)
        SELECT hour, account, oa_id, zns_temp_id, state, sum(messages), sum(total_price)
        FROM fine WHERE hour IS NOT NULL
        GROUP BY 1, 2, 3, 4, 5
    )
    INSERT INTO message_totals (account, oa_id, state, error_code, messages, total_price)
    SELECT account, oa_id, state, error_code, sum(messages), sum(total_price)
    FROM fine
    GROUP BY 1, 2, 3, 4
"""

MESSAGES_STORAGE = {
    "fillfactor": "90",
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "20000",
    "autovacuum_vacuum_insert_scale_factor": "0",
    "autovacuum_vacuum_insert_threshold": "100000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "100000",
}
HISTORY_STORAGE = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "100000",
}


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


def _count_columns(*, hour: bool, error_code: bool) -> list[sa.Column]:
    columns = [sa.Column("hour", sa.DateTime(timezone=True), nullable=error_code)] if hour else []
    columns += [
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("oa_id", sa.Text(), nullable=False),
    ]
    if hour:
        columns.append(sa.Column("zns_temp_id", sa.Text(), nullable=True))
    columns.append(sa.Column("state", sa.Text(), nullable=False))
    if error_code:
        columns.append(sa.Column("error_code", sa.Integer(), nullable=True))
    return columns + [
        sa.Column("messages", sa.BigInteger(), nullable=False),
        sa.Column("total_price", sa.Numeric(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table("message_count_deltas", *_count_columns(hour=True, error_code=True))
    op.create_table("message_totals", *_count_columns(hour=False, error_code=True))
    op.create_index(
        "message_totals_key",
        "message_totals",
        ["account", "oa_id", "state", "error_code"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    op.create_table("resolved_hourly_counts", *_count_columns(hour=True, error_code=False))
    op.create_index(
        "resolved_hourly_counts_key",
        "resolved_hourly_counts",
        ["hour", "account", "oa_id", "zns_temp_id", "state"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    # The count groups its 10M rows in memory rather than in batches spilled to disk.
    op.execute("SET LOCAL work_mem = '256MB'")
    op.execute(_FILL)
    for name, query in VIEWS.items():
        op.execute(f"CREATE OR REPLACE VIEW {name} AS {query}")
    settings = ", ".join(f"{name} = {value}" for name, value in MESSAGES_STORAGE.items())
    op.execute(f"ALTER TABLE messages SET ({settings})")
    settings = ", ".join(f"{name} = {value}" for name, value in HISTORY_STORAGE.items())
    op.execute(f"ALTER TABLE message_history SET ({settings})")
    # The indexes after the commit of the above: CONCURRENTLY runs outside a transaction.
    with op.get_context().autocommit_block():
        # For this session only: the index builds sort in memory.
        op.execute("SET maintenance_work_mem = '256MB'")
        _drop_if_invalid("messages_resolved_at_idx")
        op.create_index(
            "messages_resolved_at_idx",
            "messages",
            ["resolved_at"],
            postgresql_where=sa.text("resolved_at IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        _drop_if_invalid("messages_failures_idx")
        op.create_index(
            "messages_failures_idx",
            "messages",
            ["account", sa.text("COALESCE(error_code, -2147483648)"), "resolved_at"],
            postgresql_where=sa.text("state IN ('failed', 'rejected') AND resolved_at IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in ("messages_failures_idx", "messages_resolved_at_idx"):
            op.drop_index(name, table_name="messages", postgresql_concurrently=True, if_exists=True)
    op.execute(f"ALTER TABLE message_history RESET ({', '.join(HISTORY_STORAGE)})")
    op.execute(f"ALTER TABLE messages RESET ({', '.join(MESSAGES_STORAGE)})")
    for name, query in OLD_VIEWS.items():
        op.execute(f"CREATE OR REPLACE VIEW {name} AS {query}")
    op.drop_table("resolved_hourly_counts")
    op.drop_table("message_totals")
    op.drop_table("message_count_deltas")
