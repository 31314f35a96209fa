"""Final-status events: message_events, announced on channel esms_message_final

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Every statement that makes a message final (a poll's answer, a push, the expiry sweep) inserts
one `message_events` row per message it made final, in the same statement and so in the same
transaction. The table is the durable feed a sending system reads from a cursor
(`esms-poller events`, docs/integration.md); a statement trigger announces each new row with
`NOTIFY esms_message_final` and a JSON payload, delivered when the transaction commits.

- `xid`: the id of the transaction that wrote the event (`pg_current_xact_id()`). The feed is
  read in (xid, id) order and only below the reader's snapshot xmin, so an event is delivered
  only when no transaction that could still commit an event before it in that order is running:
  an event committed out of `id` order is never skipped (worker.events says why).
- The primary key (xid, id) is the reader's index. `at` lets old events be pruned; its index is a
  BRIN (the table is append-only in time order), which costs an insert next to nothing.
- `feed_cursors`: where a reader inside the daemon keeps its place in the feed, by name (the
  outbound webhook's is `webhook`, worker.webhook).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLAlchemy has no xid8 type: the table is written out.
_CREATE_TABLE = """
CREATE TABLE message_events (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id bigint GENERATED ALWAYS AS IDENTITY,
    at timestamptz NOT NULL DEFAULT now(),
    ref_id text NOT NULL,
    account text NOT NULL,
    oa_id text NOT NULL,
    source text NOT NULL,
    state text NOT NULL,
    send_status integer,
    error_code integer,
    total_price numeric,
    CONSTRAINT message_events_pkey PRIMARY KEY (xid, id)
)
"""

_NOTIFY_FUNCTION = """
CREATE FUNCTION message_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('esms_message_final', json_build_object(
                'ref_id', ref_id, 'account', account, 'oa_id', oa_id, 'state', state,
                'send_status', send_status, 'error_code', error_code,
                'total_price', total_price::text)::text)
    FROM new_events;
    RETURN NULL;
END
$$
"""

_NOTIFY_TRIGGER = """
CREATE TRIGGER message_events_notify AFTER INSERT ON message_events
REFERENCING NEW TABLE AS new_events
FOR EACH STATEMENT EXECUTE FUNCTION message_events_notify()
"""


_CREATE_CURSORS = """
CREATE TABLE feed_cursors (
    name text PRIMARY KEY,
    xid xid8 NOT NULL,
    id bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def upgrade() -> None:
    op.execute(_CREATE_TABLE)
    op.execute(_CREATE_CURSORS)
    op.create_index("message_events_at_idx", "message_events", ["at"], postgresql_using="brin")
    op.execute(_NOTIFY_FUNCTION)
    op.execute(_NOTIFY_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER message_events_notify ON message_events")
    op.execute("DROP FUNCTION message_events_notify()")
    op.drop_index("message_events_at_idx", table_name="message_events")
    op.drop_table("feed_cursors")
    op.drop_table("message_events")
