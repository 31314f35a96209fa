"""Empty provider values already stored become NULL, as worker.records now stores them

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

eSMS's push sends an empty value where GetCallback has null (`partnerids=`, `RequestId=`), and
until this release the receiver stored it as `''`: `WHERE error_info IS NULL`, `count(error_info)`
and `COALESCE` answered differently depending on which path delivered a status. worker.records
now reads an empty or blank value as absent in both paths; this revision makes the rows written
before agree. Data only: the schema does not change, and the downgrade leaves the NULLs (an empty
value never meant anything else).

Safe on a table of ten million rows while the poller and the receiver write to it: the table is
walked in primary-key order, `BATCH_ROWS` RefIds at a time (the batch's upper bound is found on
the primary key's index), and each batch is one UPDATE in its own transaction (autocommit), so it
locks at most that many rows, only those holding a blank value, only while it runs (0.22 s on
average on 10M rows, docs/push.md), and in RefId order like every other writer of `messages` (no
deadlock with a poll's or a push's write). A batch that waits longer than the session's
lock_timeout for a row a writer holds (migrations/env.py) is run again after a short pause, up to
`BATCH_ATTEMPTS` times, rather than restarting the whole walk. A run that is cut short is simply
run again: the UPDATE is idempotent.

Options: `alembic -x blank_batch_rows=N upgrade head` (default 5000).
"""

import logging
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

BATCH_ROWS = 5000
BATCH_ATTEMPTS = 5
# The text columns filled from provider fields (worker.store._MERGED_COLUMNS).
COLUMNS = ("request_id", "phone_number", "callback_url", "partner_ids", "error_info", "zns_temp_id")
# Nothing but whitespace, or nothing at all (Python's str.isspace() for the ASCII whitespace).
_BLANK = "~ '^[[:space:]]*$'"
_RETRYABLE = {"55P03", "40P01", "40001"}  # lock timeout, deadlock, serialization failure

# The last RefId of the next batch, or NULL when fewer than a batch remain.
_UPPER = sa.text(
    "SELECT ref_id FROM messages WHERE ref_id > :last ORDER BY ref_id OFFSET :skip LIMIT 1"
)
_ANY_BLANK = " OR ".join(f"{column} {_BLANK}" for column in COLUMNS)
_SET = ", ".join(
    f"{column} = CASE WHEN m.{column} {_BLANK} THEN NULL ELSE m.{column} END" for column in COLUMNS
)


def _update(where: str) -> sa.TextClause:
    return sa.text(
        f"""
        WITH batch AS (
            SELECT ref_id FROM messages
            WHERE {where} AND ({_ANY_BLANK})
            ORDER BY ref_id
            FOR UPDATE
        )
        UPDATE messages AS m SET {_SET}
        FROM batch WHERE m.ref_id = batch.ref_id
        """
    )


_UPDATE_BOUNDED = _update("ref_id > :last AND ref_id <= :upper")
_UPDATE_REST = _update("ref_id > :last")
# '' sorts before every other text, so `> :last` starting from '' leaves out only that RefId.
_UPDATE_EMPTY_REF_ID = _update("ref_id = :last")


def _batch_rows() -> int:
    given = context.get_x_argument(as_dictionary=True).get("blank_batch_rows")
    return max(1, int(given)) if given else BATCH_ROWS


def _run_batch(conn: sa.Connection, statement: sa.TextClause, params: dict) -> int:
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            return conn.execute(statement, params).rowcount
        except sa.exc.DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate not in _RETRYABLE or attempt == BATCH_ATTEMPTS:
                raise
            log.warning(
                "blank values to NULL: the batch after %r waited too long for a row (%s), "
                "attempt %d of %d",
                params["last"], sqlstate, attempt, BATCH_ATTEMPTS,
            )  # fmt: skip
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def upgrade() -> None:
    rows = _batch_rows()
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        last = ""
        changed, batches = _run_batch(conn, _UPDATE_EMPTY_REF_ID, {"last": last}), 0
        while True:
            upper = conn.execute(_UPPER, {"last": last, "skip": rows - 1}).scalar()
            if upper is None:
                changed += _run_batch(conn, _UPDATE_REST, {"last": last})
                batches += 1
                break
            changed += _run_batch(conn, _UPDATE_BOUNDED, {"last": last, "upper": upper})
            batches += 1
            last = upper
        log.info("blank values to NULL: %d rows changed in %d batches", changed, batches)


def downgrade() -> None:
    # NULL is what an empty value always meant: nothing to undo.
    pass
