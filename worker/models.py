"""The schema as SQLAlchemy tables: what Alembic migrates to and what the migration test compares.

`messages` is the operator contract: the sending system inserts `ref_id`, `oa_id` (and optionally
`account`); the daemon owns every other column. Partial indexes cover only pending rows, so finding
due work costs the same beside ten million final rows as beside none; the two on final rows only
(migration 0008) serve the operator's reads, and the count tables spare them counting the table.
`poll_batches` holds the leases: one row per in-flight GetCallback request, with the RefIds it
carries and when its claim runs out. `message_history` records every change of a message,
append-only. `message_events` holds one row per message made final, the feed a sending system
follows (worker.events). Queries live in `worker.store`, not here.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.types import UserDefinedType

metadata = MetaData()

PENDING = text("state = 'pending'")

messages = Table(
    "messages",
    metadata,
    Column("ref_id", Text, primary_key=True),
    Column("account", Text, nullable=False, server_default=text("'default'")),
    Column("oa_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("state", Text, nullable=False, server_default=text("'pending'")),
    Column("send_status", Integer),
    Column("send_success", Integer),
    Column("send_failed", Integer),
    Column("total_receiver", Integer),
    Column("total_sent", Integer),
    Column("type_id", Integer),
    Column("telco_id", Integer),
    Column("total_price", Numeric),
    Column("request_id", Text),
    Column("phone_number", Text),
    Column("callback_url", Text),
    Column("partner_ids", Text),
    Column("error_info", Text),
    Column("zns_temp_id", Text),
    Column("error_code", Integer),
    Column("poll_count", Integer, nullable=False, server_default=text("0")),
    Column("last_polled_at", DateTime(timezone=True)),
    Column("next_poll_at", DateTime(timezone=True)),
    Column("resolved_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lease_id", Uuid),
    # Set when an operator revives an expired message: its maximum age counts from here again.
    Column("repolled_at", DateTime(timezone=True)),
    # Polls in a row that answered Code 105 for this RefId alone (migration 0006): such a RefId
    # is polled alone, on its own backoff, until an answer proves the provider knows it.
    Column("not_found_count", Integer, nullable=False, server_default=text("0")),
    CheckConstraint(
        "state IN ('pending', 'sent', 'failed', 'rejected', 'expired')", name="messages_state_check"
    ),
    # Due work per account, oldest first. Only pending rows have a next poll time; keyed on that
    # (not on state) so the planner estimates the claim right (migration 0005).
    Index(
        "messages_due_at_idx",
        "account",
        "next_poll_at",
        postgresql_where=text("next_poll_at IS NOT NULL"),
    ),
    # New rows the scheduler has not given a first poll time yet.
    Index(
        "messages_new_idx",
        "created_at",
        postgresql_where=text("state = 'pending' AND next_poll_at IS NULL"),
    ),
    # Expiry sweep and "oldest pending" age.
    Index("messages_pending_created_idx", "created_at", postgresql_where=PENDING),
    # Final rows only (migration 0008), so the poll path's updates of pending rows never touch
    # them: rows resolved lately (`status`, the cookbook, message retention) ...
    Index(
        "messages_resolved_at_idx",
        "resolved_at",
        postgresql_where=text("resolved_at IS NOT NULL"),
    ),
    # ... and the newest failure per account and error code (the view failures_by_error).
    Index(
        "messages_failures_idx",
        "account",
        text("COALESCE(error_code, -2147483648)"),
        "resolved_at",
        postgresql_where=text("state IN ('failed', 'rejected') AND resolved_at IS NOT NULL"),
    ),
)


def _count_columns(*, hour: bool, error_code: bool) -> list[Column]:
    """The key and sums of a count table (migration 0008)."""
    columns = [Column("hour", DateTime(timezone=True), nullable=error_code)] if hour else []
    columns += [Column("account", Text, nullable=False), Column("oa_id", Text, nullable=False)]
    if hour:
        columns.append(Column("zns_temp_id", Text))
    columns.append(Column("state", Text, nullable=False))
    if error_code:
        columns.append(Column("error_code", Integer))
    return columns + [
        Column("messages", BigInteger, nullable=False),
        Column("total_price", Numeric, nullable=False),
    ]


# Counts of final rows, so the operator's views need not count `messages` (worker.store, "counts
# of final rows"). Append-only: the statement that makes a row final, revives or deletes it adds
# +n/-n per (UTC hour of resolved_at, account, OA, template, state, error code) it touched.
message_count_deltas = Table(
    "message_count_deltas", metadata, *_count_columns(hour=True, error_code=True)
)
# The deltas folded in by beat (store.fold_counts, their only writer).
message_totals = Table(
    "message_totals",
    metadata,
    *_count_columns(hour=False, error_code=True),
    Index(
        "message_totals_key",
        "account",
        "oa_id",
        "state",
        "error_code",
        unique=True,
        postgresql_nulls_not_distinct=True,
    ),
)
resolved_hourly_counts = Table(
    "resolved_hourly_counts",
    metadata,
    *_count_columns(hour=True, error_code=False),
    Index(
        "resolved_hourly_counts_key",
        "hour",
        "account",
        "oa_id",
        "zns_temp_id",
        "state",
        unique=True,
        postgresql_nulls_not_distinct=True,
    ),
)

# Append-only: one row per change of a message's data, written in the statement that changes it.
message_history = Table(
    "message_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("ref_id", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    # poll, push, expiry, repoll
    Column("source", Text, nullable=False),
    # The poll_batches id of the request whose answer made the change (the batch row itself is
    # gone once the answer is written).
    Column("batch_id", Uuid),
    Column("old_state", Text),
    Column("new_state", Text, nullable=False),
    Column("old_send_status", Integer),
    Column("new_send_status", Integer),
    Column("error_code", Integer),
    Index("message_history_ref_idx", "ref_id", "at"),
    Index("message_history_at_idx", "at"),
)

# One row: when the scheduler last ran a tick. Beat's health check, readable with SQL.
scheduler_heartbeat = Table(
    "scheduler_heartbeat",
    metadata,
    Column("id", Integer, primary_key=True, server_default=text("1")),
    Column("last_tick_at", DateTime(timezone=True), nullable=False),
    Column("ticks", BigInteger, nullable=False, server_default=text("0")),
    CheckConstraint("id = 1", name="scheduler_heartbeat_single_row"),
)

poll_batches = Table(
    "poll_batches",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("account", Text, nullable=False),
    Column("oa_id", Text, nullable=False),
    Column("ref_ids", ARRAY(Text), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("lease_expires_at", DateTime(timezone=True), nullable=False),
    # known | new | lone | half: what the batch holds (migration 0006, worker.notfound).
    Column("kind", Text, nullable=False, server_default=text("'known'")),
    # A half leased but not sent: its sibling's answer decides what becomes of it.
    Column("parked_for", Uuid),
    Index("poll_batches_account_idx", "account", "lease_expires_at"),
    Index(
        "poll_batches_parked_for_idx",
        "parked_for",
        postgresql_where=text("parked_for IS NOT NULL"),
    ),
)


class Xid8(UserDefinedType):
    """Postgres's 64-bit transaction id (`pg_current_xact_id()`); SQLAlchemy has no such type."""

    cache_ok = True

    def get_col_spec(self, **_kwargs) -> str:
        return "xid8"


# So that reflecting the schema (the migration test) knows the type too.
ischema_names.setdefault("xid8", Xid8)


# One row per message made final (poll, push, expiry), written in the statement that made it
# final; read in (xid, id) order below the reader's snapshot xmin (worker.events, migration 0009,
# which also adds the trigger that announces each row on channel esms_message_final).
message_events = Table(
    "message_events",
    metadata,
    Column("xid", Xid8, primary_key=True, server_default=text("pg_current_xact_id()")),
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("ref_id", Text, nullable=False),
    Column("account", Text, nullable=False),
    Column("oa_id", Text, nullable=False),
    # poll, push, expiry
    Column("source", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("send_status", Integer),
    Column("error_code", Integer),
    Column("total_price", Numeric),
    # BRIN: the table is append-only in time order, and a B-tree entry per event would cost the
    # poll's write more than finding old events for a prune is worth.
    Index("message_events_at_idx", "at", postgresql_using="brin"),
)

# Where a reader inside the daemon keeps its place in the feed (the webhook's is `webhook`).
feed_cursors = Table(
    "feed_cursors",
    metadata,
    Column("name", Text, primary_key=True),
    Column("xid", Xid8, nullable=False),
    Column("id", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)
