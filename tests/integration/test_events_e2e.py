"""Final-status events end to end: real `celery worker` and `celery beat`, the push receiver, the
emulator pushing a share of the messages, and rows that expire.

A listener on `esms_message_final` hears every message that ends final (sent, failed, rejected,
expired), p99 at most 1 s after its transaction began (earlier than its commit, so the figure is
an upper bound); a consumer `esms-poller events --follow` killed with SIGKILL mid-run and restarted
from the last cursor it printed ends with every event exactly once.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.integration.test_e2e import daemon_env
from tests.integration.test_metrics import scrape, total
from tests.integration.test_receiver import start_receiver
from tests.processes import BIN, celery, free_port, start_emulator, wait_for
from worker import events

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

OAS = ["1090257973118325189", "2020202020202020202", "3030303030303030303"]
TOKEN = "e2e-events-token-7Hq2LmZx"


class Listener(threading.Thread):
    """LISTEN esms_message_final; every payload with the wall time it arrived."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f"LISTEN {events.CHANNEL}")
        self.heard: list[tuple[float, dict]] = []
        self.stopping = False

    def run(self) -> None:
        while not self.stopping:
            for notice in self.conn.notifies(timeout=0.2):
                self.heard.append((time.time(), json.loads(notice.payload)))

    def stop(self) -> None:
        self.stopping = True
        self.join(5)
        if not self.is_alive():
            self.conn.close()


def start_consumer(env: dict, out: Path, since: str) -> subprocess.Popen:
    """`esms-poller events --follow --since SINCE`, appending to `out`."""
    argv = [str(BIN / "esms-poller"), "events", "--follow", "--since", since]
    with open(out, "ab") as handle:
        return subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.DEVNULL)


def last_cursor(out: Path) -> str:
    """The cursor of the last whole line; a line cut by the kill is removed from the file."""
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    out.write_bytes(whole)
    lines = whole.splitlines()
    return json.loads(lines[-1])["cursor"] if lines else events.START


def test_every_final_message_is_heard_and_consumed_exactly_once(
    engine, database_url, redis_url, children, tmp_path
):
    receiver = start_receiver(children, database_url, token=TOKEN)
    emulator = start_emulator(
        children,
        "--account", f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s", "1",
        "--final-after-max-s", "12",
        "--success-rate", "0.6",
        "--rejected-rate", "0.15",
        "--push-url", f"{receiver.url}/esms/callback/{TOKEN}",
        "--push-rate", "0.3",
    )  # fmt: skip
    polled = [f"ev{uuid.uuid4().hex[:12]}{i:04d}" for i in range(1500)]
    rows = [{"ref_id": ref, "oa_id": OAS[i % 3]} for i, ref in enumerate(polled)]
    orphans = [{"ref_id": f"orphan-{i}", "oa_id": ""} for i in range(30)]  # expire at the age
    emulator.admin("POST", "/messages", json={"messages": rows})
    listener = Listener(database_url)
    listener.start()
    try:
        _run(engine, database_url, redis_url, children, tmp_path, emulator, rows, orphans, listener)
    finally:
        listener.stop()


def _run(engine, database_url, redis_url, children, tmp_path, emulator, rows, orphans, listener):
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), rows)
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), orphans)

    metrics_port = free_port()
    env = daemon_env(
        database_url,
        redis_url,
        emulator.url,
        MESSAGE_MAX_AGE_SECONDS="15",
        METRICS_PORT=str(metrics_port),
    )
    out = tmp_path / "consumer.jsonl"
    consumer = start_consumer(env, out, events.START)
    celery(children, "worker", env)
    celery(children, "beat", env)

    def final_count() -> int:
        with engine.begin() as conn:
            return conn.execute(
                text("SELECT count(*) FROM messages WHERE state <> 'pending'")
            ).scalar()

    expected = len(rows) + len(orphans)
    try:
        wait_for(lambda: final_count() >= expected * 0.4, timeout=120, message="40% final")
    finally:
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(10)
    killed_at_lines = len(out.read_bytes().splitlines())
    consumer = start_consumer(env, out, last_cursor(out))
    try:
        wait_for(lambda: final_count() == expected, timeout=180, message="every message final")
        with engine.begin() as conn:
            feed = conn.execute(
                text(
                    "SELECT xid::text || '-' || id, ref_id, state, source, "
                    "extract(epoch FROM at)::float8 FROM message_events"
                )
            ).all()
        wait_for(
            lambda: len(out.read_bytes().splitlines()) >= len(feed),
            timeout=30,
            message="the consumer printed every event",
        )
        time.sleep(1.5)  # anything more it would print (a duplicate) would come now
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(10)
        listener.stopping = True
        listener.join(5)

    with engine.begin() as conn:
        finals = dict(conn.execute(text("SELECT ref_id, state FROM messages")).all())
    # Every message ends final, and its last event says the state it ended in.
    assert set(finals.values()) == {"sent", "failed", "rejected", "expired"}
    last_event = {ref_id: state for _, ref_id, state, _, _ in sorted(feed, key=_feed_order)}
    assert last_event == finals
    assert {source for _, _, _, source, _ in feed} == {"poll", "push", "expiry"}

    # The worker counted each failure its polls made, by OA and error code.
    failures = {
        dict(labels)["oa_id"]: value
        for (name, labels), value in samples.items()
        if name == "esms_final_failures_total"
    }
    assert failures and set(failures) <= set(OAS)
    polled_failures = sum(
        1 for _, _, state, source, _ in feed if source == "poll" and state in ("failed", "rejected")
    )
    assert total(samples, "esms_final_failures_total") == polled_failures
    assert any(
        dict(labels)["error_code"] != "none"
        for (name, labels) in samples
        if name == "esms_final_failures_total"
    )
    assert total(samples, "esms_refids_polled_total", account="default") >= len(rows) / 2
    assert time.time() - total(samples, "esms_scheduler_last_tick_timestamp_seconds") < 10
    assert 0 <= total(samples, "esms_notify_queue_usage") < 0.01

    # The listener heard every event, p99 within 1 s of its transaction's start.
    began = {(ref_id, state): at for _, ref_id, state, _, at in feed}
    heard = {}
    for arrived, payload in listener.heard:
        heard.setdefault((payload["ref_id"], payload["state"]), arrived)
    assert set(heard) == set(began)
    delays = sorted(heard[key] - began[key] for key in began)
    p99 = delays[int(0.99 * (len(delays) - 1))]
    print(
        f"\nNOTIFY: {len(delays)} final events, delay from transaction start: "
        f"median {statistics.median(delays) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {delays[-1] * 1000:.0f} ms"
    )
    assert p99 <= 1.0

    # The consumer, killed once, printed every event exactly once, in feed order.
    printed = [json.loads(line) for line in out.read_bytes().splitlines()]
    cursors = [line["cursor"] for line in printed]
    assert 0 < killed_at_lines < len(printed)
    assert len(cursors) == len(set(cursors))
    assert sorted(cursors, key=_cursor_order) == cursors
    assert {(c, p["ref_id"], p["state"]) for c, p in zip(cursors, printed, strict=True)} == {
        (cursor, ref_id, state) for cursor, ref_id, state, _, _ in feed
    }
    print(f"consumer: {len(printed)} events, killed after {killed_at_lines}, none twice")


def _cursor_order(cursor: str) -> tuple[int, int]:
    parsed = events.Cursor.parse(cursor)
    return parsed.xid, parsed.id


def _feed_order(row) -> tuple[int, int]:
    return _cursor_order(row[0])
