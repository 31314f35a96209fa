"""End to end: real `celery worker` and `celery beat` processes, real Postgres, Redis, emulator.

Every message must end with exactly the emulator's truth, and the emulator's request log must show
one OAId and at most the batch size per request, the right credentials, and never more than the
provider's rate in any one-second window.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.processes import celery, child_env, start_emulator, wait_for
from worker.emulator.ratelimit import max_in_window

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

COMPARED = [
    "send_status",
    "send_success",
    "send_failed",
    "total_receiver",
    "total_sent",
    "type_id",
    "telco_id",
    "total_price",
    "request_id",
    "phone_number",
    "callback_url",
    "partner_ids",
    "error_info",
    "zns_temp_id",
]
ITEM_FIELDS = {
    "send_status": "SendStatus",
    "send_success": "SendSuccess",
    "send_failed": "SendFailed",
    "total_receiver": "TotalReceiver",
    "total_sent": "TotalSent",
    "type_id": "TypeId",
    "telco_id": "Telcoid",
    "total_price": "TotalPrice",
    "request_id": "RequestId",
    "phone_number": "PhoneNumber",
    "callback_url": "CallbackUrl",
    "partner_ids": "Partnerids",
    "error_info": "ErrorInfo",
    "zns_temp_id": "ZnsTempId",
}


def daemon_env(settings_url: str, redis_url: str, emulator_url: str, **extra: str) -> dict:
    return child_env(
        DATABASE_URL=settings_url,
        REDIS_URL=redis_url,
        ESMS_BASE_URL=emulator_url,
        ESMS_API_KEY=TEST_API_KEY,
        ESMS_SECRET_KEY=TEST_SECRET_KEY,
        POLL_INTERVAL_SECONDS="1",
        POLL_MAX_INTERVAL_SECONDS="2",
        **extra,
    )


def expected_row(truth: dict) -> dict:
    item = truth["item"]
    row = {column: item.get(field) for column, field in ITEM_FIELDS.items()}
    # An empty value is no value: stored as NULL, whichever path brought it.
    row = {
        column: None if isinstance(value, str) and not value.strip() else value
        for column, value in row.items()
    }
    if row["total_price"] is not None:
        row["total_price"] = Decimal(str(row["total_price"]))
    return row


def test_every_message_ends_with_the_emulators_truth(engine, database_url, redis_url, children):
    emulator = start_emulator(
        children,
        "--account",
        f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s",
        "1",
        "--final-after-max-s",
        "6",
        "--latency-min-ms",
        "20",
        "--latency-max-ms",
        "80",
        "--numbers-as-strings-rate",
        "0.3",
    )
    ref_ids = [f"{uuid.uuid4().hex}{i % 100:02d}" for i in range(1500)]
    oas = ["1090257973118325189", "2020202020202020202", "3030303030303030303"]
    rows = [{"ref_id": ref, "oa_id": oas[i % 3]} for i, ref in enumerate(ref_ids)]
    emulator.admin("POST", "/messages", json={"messages": rows})
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), rows)
        # History past HISTORY_RETENTION_DAYS (30): beat's upkeep task prunes it.
        conn.execute(
            text(
                "INSERT INTO message_history (ref_id, at, source, new_state) "
                "VALUES ('gone-long-ago', now() - interval '40 days', 'poll', 'sent')"
            )
        )

    env = daemon_env(database_url, redis_url, emulator.url)
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)

    def pending() -> int:
        with engine.begin() as conn:
            return conn.execute(
                text("SELECT count(*) FROM messages WHERE state='pending'")
            ).scalar()

    wait_for(lambda: pending() == 0, timeout=120, message="every message final")

    truth = emulator.admin("GET", "/truth")["messages"]
    with engine.begin() as conn:
        stored = {
            row["ref_id"]: row for row in conn.execute(text("SELECT * FROM messages")).mappings()
        }
    assert set(stored) == set(ref_ids)
    wrong = []
    for ref_id in ref_ids:
        row, fact = stored[ref_id], truth[ref_id]
        expected = expected_row(fact)
        actual = {column: row[column] for column in COMPARED}
        if (
            row["state"] != fact["state"]
            or actual != expected
            or row["error_code"] != fact["error_code"]
        ):
            wrong.append((ref_id, row["state"], fact["state"], actual, expected))
        assert row["resolved_at"] is not None and row["lease_id"] is None
    assert wrong == []
    assert {row["state"] for row in stored.values()} >= {"sent", "failed"}

    log = emulator.admin("GET", "/requests")["requests"]
    assert log, "the daemon made no request"
    stamps = [entry["t"] for entry in log if entry["api_key"] == TEST_API_KEY]
    assert max_in_window(sorted(stamps), 1.0) <= 20
    assert all(entry["code"] == 100 for entry in log)
    # Both ran at DEBUG, which logs every task with its arguments: no key may appear.
    for child in (worker, beat):
        text_logged = child.log()
        assert "esms.poll_batch" in text_logged or child is beat
        assert TEST_SECRET_KEY not in text_logged and TEST_API_KEY not in text_logged
    by_ref = {ref["ref_id"]: ref["oa_id"] for ref in rows}
    for entry in log:
        assert 1 <= entry["n_refids"] <= 200
        assert {by_ref[ref] for ref in entry["refids"]} == {entry["oa_id"]}

    # Beat's upkeep ran in the worker: the old history is pruned, the count deltas are folded,
    # and the operator's counts are the table's.
    def upkept() -> bool:
        with engine.begin() as conn:
            old = conn.execute(
                text("SELECT count(*) FROM message_history WHERE ref_id = 'gone-long-ago'")
            ).scalar()
            deltas = conn.execute(text("SELECT count(*) FROM message_count_deltas")).scalar()
        return old == 0 and deltas == 0

    wait_for(upkept, timeout=30, message="upkeep pruned and folded")
    with engine.begin() as conn:
        counted = conn.execute(
            text("SELECT state, sum(messages) FROM message_counts GROUP BY state")
        ).all()
        table = conn.execute(text("SELECT state, count(*) FROM messages GROUP BY state")).all()
    assert sorted(map(tuple, counted)) == sorted(map(tuple, table))
