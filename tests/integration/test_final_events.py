"""The final-status feed and its channel (worker.events): every path that makes a message final
writes one event and announces it; the feed never skips an event committed out of id order."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from tests.processes import BIN, child_env
from tests.samples import SAMPLE_OA_ID, SAMPLE_RECORD
from worker import events, store

pytestmark = pytest.mark.integration

FAILED = dataclasses.replace(SAMPLE_RECORD, total_price=None)  # -124, SendFailed 1
SENT = dataclasses.replace(
    SAMPLE_RECORD, send_success=1, send_failed=0, error_info=None, total_price=None
)
PROGRESS = dataclasses.replace(SAMPLE_RECORD, send_status=1, send_failed=0, error_info=None)


def _insert(engine, *ref_ids: str, oa_id: str = SAMPLE_OA_ID, account: str = "default") -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id, account) VALUES (:r, :o, :a)"),
            [{"r": r, "o": oa_id, "a": account} for r in ref_ids],
        )


def _listen(database_url: str) -> psycopg.Connection:
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f"LISTEN {events.CHANNEL}")
    return conn


def _heard(listener: psycopg.Connection) -> list[dict]:
    return [json.loads(n.payload) for n in listener.notifies(timeout=0.5)]


def test_push_and_poll_finals_are_written_and_announced(engine, database_url, make_settings):
    _insert(engine, "ev-failed", "ev-sent", "ev-progress")
    listener = _listen(database_url)
    try:
        with engine.begin() as conn:
            done = store.merge_callbacks(
                conn,
                [
                    dataclasses.replace(
                        FAILED, ref_id="ev-failed", total_price=SAMPLE_RECORD.total_price
                    ),
                    dataclasses.replace(PROGRESS, ref_id="ev-progress"),
                ],
                source="push",
            )
        assert done.resolved == {"failed": 1}
        assert done.failures == {store.Failure("default", SAMPLE_OA_ID, "failed", -124): 1}
        heard = _heard(listener)
        assert heard == [
            {
                "ref_id": "ev-failed",
                "account": "default",
                "oa_id": SAMPLE_OA_ID,
                "state": "failed",
                "send_status": 5,
                "error_code": -124,
                "total_price": "0.0",
            }
        ]
        # A poll's answer, through a lease, the same way.
        batch = store.Batch(uuid.uuid4(), "default", SAMPLE_OA_ID, ("ev-sent",))
        with engine.begin() as conn:
            store.lease_batches(conn, "default", [batch], 30)
        with engine.begin() as conn:
            store.complete_batch(
                conn, batch, [dataclasses.replace(SENT, ref_id="ev-sent")], make_settings()
            )
        assert [(e["ref_id"], e["state"]) for e in _heard(listener)] == [("ev-sent", "sent")]
        # A duplicate of a final report changes nothing and announces nothing.
        with engine.begin() as conn:
            store.merge_callbacks(conn, [dataclasses.replace(FAILED, ref_id="ev-failed")])
        assert _heard(listener) == []
    finally:
        listener.close()
    feed = events.read(engine, events.Cursor.parse(events.START))
    assert [(e.ref_id, e.source, e.state) for e in feed] == [
        ("ev-failed", "push", "failed"),
        ("ev-sent", "poll", "sent"),
    ]


def test_expiry_is_an_event_and_a_late_final_report_another(engine, database_url):
    _insert(engine, "ev-old", oa_id="")  # no OAId: expires at the age alone
    listener = _listen(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE messages SET created_at = now() - interval '2 hours'"))
            assert store.expire_old(conn, 3600, ["default"]) == 1
        assert [(e["ref_id"], e["state"]) for e in _heard(listener)] == [("ev-old", "expired")]
        with engine.begin() as conn:
            store.merge_callbacks(conn, [dataclasses.replace(SENT, ref_id="ev-old")], source="push")
        assert [(e["ref_id"], e["state"]) for e in _heard(listener)] == [("ev-old", "sent")]
    finally:
        listener.close()
    feed = events.read(engine, events.Cursor.parse(events.START))
    assert [(e.source, e.state) for e in feed] == [("expiry", "expired"), ("push", "sent")]


def test_an_event_committed_out_of_id_order_is_not_skipped(engine):
    """Two transactions make a message final each; the one with the smaller event id commits
    last. A reader between the two commits must not pass the uncommitted event: the feed holds
    the later one back until the earlier transaction ends, then delivers both."""
    _insert(engine, "ev-first", "ev-second")
    first = engine.connect()
    second = engine.connect()
    try:
        first.begin()
        store.merge_callbacks(first, [dataclasses.replace(SENT, ref_id="ev-first")])
        second.begin()
        store.merge_callbacks(second, [dataclasses.replace(SENT, ref_id="ev-second")])
        second.commit()
        with engine.connect() as conn:
            ids = dict(conn.execute(text("SELECT ref_id, id FROM message_events")).all())
        assert ids == {"ev-second": ids["ev-second"]}  # the first is not committed yet
        start = events.Cursor.parse(events.START)
        # What `id > cursor` alone would have done: deliver id 2 and move past id 1.
        assert events.read(engine, start) == []
        first.commit()
        with engine.connect() as conn:
            order = dict(conn.execute(text("SELECT ref_id, id FROM message_events")).all())
        assert order["ev-first"] < order["ev-second"]
        delivered = events.read(engine, start)
        assert [e.ref_id for e in delivered] == ["ev-first", "ev-second"]
        assert events.read(engine, delivered[-1].cursor) == []
    finally:
        first.close()
        second.close()


def test_the_feed_waits_for_an_older_transaction_that_has_not_written_yet(engine):
    """A transaction that took its xid before another's event (it wrote something else first)
    and writes its own event later comes first in the feed: nothing is delivered until it ends."""
    _insert(engine, "ev-a", "ev-b")
    early = engine.connect()
    try:
        early.begin()
        early.execute(text("UPDATE messages SET updated_at = now() WHERE ref_id = 'ev-a'"))
        with engine.begin() as conn:
            store.merge_callbacks(conn, [dataclasses.replace(SENT, ref_id="ev-b")])
        start = events.Cursor.parse(events.START)
        assert events.read(engine, start) == []
        store.merge_callbacks(early, [dataclasses.replace(SENT, ref_id="ev-a")])
        early.commit()
        assert [e.ref_id for e in events.read(engine, start)] == ["ev-a", "ev-b"]
    finally:
        early.close()


def test_cli_prints_the_feed_from_a_cursor(engine, database_url):
    _insert(engine, "cli-1", "cli-2")
    with engine.begin() as conn:
        store.merge_callbacks(conn, [dataclasses.replace(SENT, ref_id="cli-1")])
    with engine.begin() as conn:
        store.merge_callbacks(conn, [dataclasses.replace(FAILED, ref_id="cli-2")])
    env = child_env(DATABASE_URL=database_url)
    argv = [str(BIN / "esms-poller"), "events"]
    everything = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert everything.returncode == 0, everything.stderr
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    assert [(e["ref_id"], e["state"], e["error_code"]) for e in lines] == [
        ("cli-1", "sent", None),
        ("cli-2", "failed", -124),
    ]
    rest = subprocess.run(
        [*argv, "--since", lines[0]["cursor"]], env=env, capture_output=True, text=True, timeout=60
    )
    assert [json.loads(line)["ref_id"] for line in rest.stdout.splitlines()] == ["cli-2"]
    at_end = subprocess.run(
        [*argv, "--since", "end"], env=env, capture_output=True, text=True, timeout=60
    )
    assert at_end.returncode == 0 and at_end.stdout == ""
    bad = subprocess.run(
        [*argv, "--since", "yesterday"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "XID-ID" in bad.stderr


def test_cursor_round_trip():
    assert str(events.Cursor.parse(" 123-45 ")) == "123-45"
    with pytest.raises(events.BadCursor):
        events.Cursor.parse("12")


def _doc_consumer() -> str:
    """The consumer of docs/integration.md ("A consumer in 20 lines"), as printed there."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "integration.md").read_text()
    section = doc.split("### A consumer in 20 lines", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_consumer_falls_back_to_sms_and_resumes(engine, database_url, tmp_path):
    no_zalo = dataclasses.replace(
        FAILED, error_info='{"error":-118,"message":"User is not a Zalo user"}'
    )
    _insert(engine, "doc-1", "doc-2", "doc-3", "doc-4")
    with engine.begin() as conn:
        store.merge_callbacks(
            conn,
            [
                dataclasses.replace(no_zalo, ref_id="doc-1"),
                dataclasses.replace(SENT, ref_id="doc-2"),
                dataclasses.replace(FAILED, ref_id="doc-3"),  # -124: no SMS for that
            ],
        )
    script = tmp_path / "consumer.py"
    script.write_text(_doc_consumer())
    assert len(_doc_consumer().strip().splitlines()) <= 25
    env = child_env(DATABASE_URL=database_url)
    sender_db = tmp_path / "sender.db"

    def run_until(cursor: str) -> None:
        child = subprocess.Popen(
            [str(BIN / "python"), str(script)], cwd=tmp_path, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if sender_db.exists():
                    with sqlite3.connect(sender_db) as db:
                        row = (
                            db.execute("SELECT cursor FROM feed").fetchone()
                            if _has_feed(db)
                            else None
                        )
                    if row and row[0] == cursor:
                        return
                time.sleep(0.2)
            raise AssertionError("the consumer did not reach the end of the feed")
        finally:
            os.killpg(child.pid, signal.SIGKILL)  # the script and its esms-poller
            child.wait(10)

    run_until(str(events.read(engine, events.Cursor.parse(events.START))[-1].cursor))
    with engine.begin() as conn:
        store.merge_callbacks(conn, [dataclasses.replace(no_zalo, ref_id="doc-4")])
    run_until(str(events.read(engine, events.Cursor.parse(events.START))[-1].cursor))
    with sqlite3.connect(sender_db) as db:
        fallback = db.execute("SELECT ref_id, error_code FROM sms_fallback ORDER BY 1").fetchall()
    assert fallback == [("doc-1", -118), ("doc-4", -118)]


def _has_feed(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'feed'").fetchone() is not None
