"""Migration 0007: the empty and blank provider values stored before become NULL, batch by batch,
without touching anything else, and without making the writers that run meanwhile wait."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

from tests.migration.test_lock_timeout import revision_of, upgrade
from tests.scratchdb import libpq, scratch_database

pytestmark = pytest.mark.integration

COLUMNS = ("request_id", "phone_number", "callback_url", "partner_ids", "error_info", "zns_temp_id")
ROWS = 2_000
BATCH_PAGES = 5


def _value(i: int, column: int) -> str | None:
    """Row i's value for the column-th text column: blank, empty, NULL or text, by turns."""
    return ("", "  ", None, f"v{i}-{column}", "\t\n", "x y", "")[(i + column) % 7]


def _fill(url: str) -> None:
    with psycopg.connect(libpq(url)) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO messages (ref_id, oa_id, state, error_code, "
                + ", ".join(COLUMNS)
                + ") VALUES (%s, 'oa', 'pending', %s, "
                + ", ".join(["%s"] * len(COLUMNS))
                + ")",
                [
                    (f"ref-{i:05d}", -118 if i % 3 == 0 else None)
                    + tuple(_value(i, c) for c in range(len(COLUMNS)))
                    for i in range(ROWS)
                ]
                + [("", None) + ("",) * len(COLUMNS)],  # a RefId that sorts before all others
            )


def _rows(url: str) -> dict[str, tuple]:
    with psycopg.connect(libpq(url)) as conn:
        found = conn.execute(
            "SELECT ref_id, error_code, " + ", ".join(COLUMNS) + " FROM messages ORDER BY ref_id"
        )
        return {row[0]: row[1:] for row in found}


def test_blank_values_become_null_and_nothing_else_changes(caplog):
    with scratch_database("blank") as url:
        upgrade(url, "0006")
        _fill(url)
        before = _rows(url)
        with psycopg.connect(libpq(url)) as conn:
            pages = conn.execute(
                "SELECT pg_relation_size('messages') / current_setting('block_size')::bigint"
            ).fetchone()[0]
        assert pages > 2 * BATCH_PAGES  # several batches, then the rest
        with caplog.at_level(logging.INFO, logger="alembic.runtime.migration"):
            upgrade(url, "0007", blank_batch_pages=str(BATCH_PAGES))
        assert revision_of(url) == "0007"
        after = _rows(url)
        assert after.keys() == before.keys()
        for ref_id, row in before.items():
            expected = (row[0],) + tuple(
                None if value is not None and not value.strip() else value for value in row[1:]
            )
            assert after[ref_id] == expected, ref_id
        assert after[""] == (None,) * (1 + len(COLUMNS))
        # Every row but one in seven per column had a blank: each of the ROWS + 1 rows changed.
        batches = -(-pages // BATCH_PAGES)  # full batches of pages, then the rest to the end
        assert f"{ROWS + 1} rows changed in {batches} batches" in caplog.text
        # Run again (a cut-short run is simply rerun): nothing left to change.
        with psycopg.connect(libpq(url)) as conn:
            blank = conn.execute(
                "SELECT count(*) FROM messages WHERE "
                + " OR ".join(f"{c} ~ '^[[:space:]]*$'" for c in COLUMNS)
            ).fetchone()[0]
        assert blank == 0


def test_a_writer_holding_rows_is_waited_for_briefly_and_never_stalled():
    with scratch_database("blanklock") as url:
        upgrade(url, "0006")
        _fill(url)
        # A poll's write holds a row in the middle of the table for 1.2 s: the batch that needs
        # it gives up after the lock timeout and runs again once the row is free.
        holder = psycopg.connect(libpq(url))
        holder.execute("UPDATE messages SET poll_count = 1 WHERE ref_id = 'ref-01000'")
        release = threading.Timer(1.2, holder.commit)
        longest = 0.0
        done = threading.Event()

        def write() -> None:
            # Meanwhile a writer moves other rows, as the poller does, and times each write.
            nonlocal longest
            with psycopg.connect(libpq(url), autocommit=True) as conn:
                i = 0
                while not done.is_set():
                    started = time.monotonic()
                    conn.execute(
                        "UPDATE messages SET poll_count = poll_count + 1 WHERE ref_id = %s",
                        (f"ref-{(i * 37) % ROWS:05d}",),
                    )
                    longest = max(longest, time.monotonic() - started)
                    i += 1
                    time.sleep(0.005)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        release.start()
        try:
            elapsed = upgrade(url, "0007", blank_batch_pages=str(BATCH_PAGES), lock_timeout="300ms")
        finally:
            release.join()
            done.set()
            writer.join(10)
            holder.close()
        assert revision_of(url) == "0007"
        assert elapsed >= 1.0  # it did wait for the held row, in steps of the lock timeout
        assert longest < 0.5, longest  # no write waited for the migration
        assert _rows(url)["ref-01000"][1:] == tuple(
            None if value is None or not value.strip() else value
            for value in (_value(1000, c) for c in range(len(COLUMNS)))
        )
