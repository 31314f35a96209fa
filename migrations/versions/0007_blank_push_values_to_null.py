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
walked in physical order, `BATCH_PAGES` heap pages at a time on a TID range scan (PostgreSQL 14+),
so the whole walk reads the table once, sequentially (a walk in RefId order read it in random
order: 431 s on 10M rows, against the page walk's time in docs/push.md). Each batch is one
UPDATE in its own transaction (autocommit): it locks only the rows of those pages that hold a
blank value, only while it runs, and in RefId order like every other writer of `messages` (no
deadlock with a poll's or a push's write). A row a batch rewrites may land on a later page; it
holds no blank any more, so a later batch leaves it alone. The last batch runs to the end of the
table as it is then, taking in the pages it grew by during the walk. A batch that waits longer
than the session's lock_timeout for a row a writer holds (migrations/env.py) is run again after a
short pause, up to `BATCH_ATTEMPTS` times, rather than restarting the whole walk. A run that is
cut short is simply run again: the UPDATE is idempotent.

Options: `alembic -x blank_batch_pages=N upgrade head` (default 200: 4,000 to 8,000 rows, by the
size of the rows).
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

BATCH_PAGES = 200
BATCH_ATTEMPTS = 5
# The text columns filled from provider fields (worker.store._MERGED_COLUMNS).
COLUMNS = ("request_id", "phone_number", "callback_url", "partner_ids", "error_info", "zns_temp_id")
# Nothing but whitespace, or nothing at all (Python's str.isspace() for the ASCII whitespace).
_BLANK = "~ '^[[:space:]]*$'"
_RETRYABLE = {"55P03", "40P01", "40001"}  # lock timeout, deadlock, serialization failure

# The table's length in pages when the walk starts.
_PAGES = sa.text("SELECT pg_relation_size('messages') / current_setting('block_size')::bigint")
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


# Pages [first, end) on a TID range scan; the last batch takes every page from `first` on, the
# ones the table grew by while the walk ran included.
_UPDATE_PAGES = _update("ctid >= CAST(:first AS tid) AND ctid < CAST(:end AS tid)")
_UPDATE_REST = _update("ctid >= CAST(:first AS tid)")


def _tid(page: int) -> str:
    return f"({page},0)"


def _batch_pages() -> int:
    given = context.get_x_argument(as_dictionary=True).get("blank_batch_pages")
    return max(1, int(given)) if given else BATCH_PAGES


def _run_batch(conn: sa.Connection, statement: sa.TextClause, params: dict) -> int:
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            return conn.execute(statement, params).rowcount
        except sa.exc.DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate not in _RETRYABLE or attempt == BATCH_ATTEMPTS:
                raise
            log.warning(
                "blank values to NULL: the batch from page %s waited too long for a row (%s), "
                "attempt %d of %d",
                params["first"], sqlstate, attempt, BATCH_ATTEMPTS,
            )  # fmt: skip
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def upgrade() -> None:
    step = _batch_pages()
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        pages = conn.execute(_PAGES).scalar()
        changed = batches = 0
        first = 0
        while first + step < pages:
            params = {"first": _tid(first), "end": _tid(first + step)}
            changed += _run_batch(conn, _UPDATE_PAGES, params)
            batches += 1
            first += step
        changed += _run_batch(conn, _UPDATE_REST, {"first": _tid(first)})
        batches += 1
        log.info("blank values to NULL: %d rows changed in %d batches", changed, batches)


def downgrade() -> None:
    # NULL is what an empty value always meant: nothing to undo.
    pass
