"""migrations/env.py's lock_timeout and retries: a migration step that cannot get its lock gives up
within the timeout (so the poller's writes queued behind it wait no longer), is retried with
backoff, succeeds once the lock is released, or ends with one clear line after its retries. And
migration 0005's CREATE INDEX CONCURRENTLY survives a retry.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.util import CommandError

from tests.scratchdb import libpq, scratch_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 0.3


def migrations(url: str, **options: str) -> Config:
    # No ini file: alembic.ini's logging setup would replace the handlers pytest captures with.
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = url
    config.cmd_opts = argparse.Namespace(x=[f"{key}={value}" for key, value in options.items()])
    return config


def upgrade(url: str, revision: str, **options: str) -> float:
    started = time.monotonic()
    command.upgrade(migrations(url, **options), revision)
    return time.monotonic() - started


def revision_of(url: str) -> str:
    with psycopg.connect(libpq(url)) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def retries_logged(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "alembic.env" and "trying again" in r.message]


class Writer(threading.Thread):
    """Inserts a message every 20 ms, as the sender and the poller write, and times each."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.longest, self.done = url, 0.0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            while not self.done.is_set():
                started = time.monotonic()
                conn.execute(
                    "INSERT INTO messages (ref_id, oa_id) VALUES (%s, 'oa')", (uuid.uuid4().hex,)
                )
                self.longest = max(self.longest, time.monotonic() - started)
                time.sleep(0.02)


def test_a_step_waits_at_most_the_timeout_per_attempt_and_succeeds_once_free(caplog):
    with scratch_database("lock") as url:
        upgrade(url, "0003")
        holder = psycopg.connect(libpq(url))
        # A long reader: its ACCESS SHARE lock conflicts with 0004's ALTER TABLE.
        holder.execute("SELECT count(*) FROM messages")
        writer = Writer(url)
        writer.start()
        release = threading.Timer(1.5, holder.commit)
        release.start()
        try:
            with caplog.at_level(logging.WARNING, logger="alembic.env"):
                elapsed = upgrade(
                    url, "0004", lock_timeout=f"{int(TIMEOUT * 1000)}ms", retry_backoff="0.1"
                )
        finally:
            release.join()
            writer.done.set()
            writer.join(10)
            holder.close()
        assert revision_of(url) == "0004"
        retried = retries_logged(caplog)
        assert len(retried) >= 2, caplog.text
        assert "at revision 0003" in retried[0].message
        assert elapsed >= 1.5
        # Writes queued behind the waiting ALTER waited for it at most about the lock timeout;
        # without it they would have waited for the reader, 1.5 s.
        assert 0 < writer.longest < TIMEOUT + 0.5, writer.longest


def test_after_its_retries_it_fails_with_one_clear_line(caplog):
    with scratch_database("lockfail") as url:
        upgrade(url, "0003")
        with psycopg.connect(libpq(url)) as holder:
            holder.execute("SELECT count(*) FROM messages")
            with pytest.raises(CommandError) as failed:
                elapsed = time.monotonic()
                upgrade(url, "head", lock_timeout="200ms", lock_retries="2", retry_backoff="0.1")
            elapsed = time.monotonic() - elapsed
            holder.rollback()
        message = str(failed.value)
        assert message.startswith("migration stopped at revision 0003: a step could not take")
        assert "lock_timeout=200ms in 3 attempts" in message
        assert "run `alembic upgrade head` again" in message
        # Three waits of 0.2 s and pauses of 0.1 s and 0.2 s: nowhere near "forever".
        assert elapsed < 3.0
        assert revision_of(url) == "0003"


def test_concurrent_index_build_cut_by_the_timeout_is_rebuilt_on_retry(caplog):
    with scratch_database("lockcic") as url:
        upgrade(url, "0004")
        # An open write transaction: CREATE INDEX CONCURRENTLY must wait for it after it made
        # its (still invalid) index, and that wait is cut by lock_timeout.
        holder = psycopg.connect(libpq(url))
        holder.execute("INSERT INTO messages (ref_id, oa_id) VALUES ('held', 'oa')")
        release = threading.Timer(1.2, holder.commit)
        release.start()
        try:
            with caplog.at_level(logging.WARNING, logger="alembic.env"):
                upgrade(url, "0005", lock_timeout="300ms", retry_backoff="0.1")
        finally:
            release.join()
            holder.close()
        assert revision_of(url) == "0005"
        assert len(retries_logged(caplog)) >= 1, caplog.text
        with psycopg.connect(libpq(url)) as conn:
            indexes = dict(
                conn.execute(
                    "SELECT c.relname, i.indisvalid FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname IN ('messages_due_at_idx', 'messages_due_idx')"
                ).fetchall()
            )
        assert indexes == {"messages_due_at_idx": True}
