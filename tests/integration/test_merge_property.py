"""Property-based tests of the merge against real Postgres: reports with missing fields, in any
order, by poll or push. What is known is never erased, nothing is invented, a SendStatus 5 without
an outcome is not final, and a final row ends with the final report's data."""

from __future__ import annotations

import itertools
import uuid
from decimal import Decimal

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import text

from worker import store
from worker.merge import State, derive_state
from worker.records import CallbackRecord

# One message's true data; each report the provider sends shows a random part of it.
TRUTH = {
    "total_receiver": 1,
    "total_sent": 1,
    "type_id": 25,
    "telco_id": 1,
    "total_price": Decimal("300.0"),
    "request_id": "req-1",
    "phone_number": "0909090909",
    "callback_url": "https://example.test/cb",
    "partner_ids": "7984e9b198c40e9957d6",
    "zns_temp_id": "228386",
}
FIELDS = sorted(TRUTH)
# The message's life: waiting, at the carrier, done without saying how, done with the outcome.
STEPS = [
    {"send_status": 2},
    {"send_status": 7},
    {"send_status": 5},
    {
        "send_status": 5,
        "send_success": 0,
        "send_failed": 1,
        "error_info": '{"error":-118,"message":"no Zalo account"}',
    },
]
WATCHED = [*FIELDS, "send_status", "send_success", "send_failed", "error_info", "error_code"]

reports = st.lists(
    st.tuples(st.integers(0, len(STEPS) - 1), st.sets(st.sampled_from(FIELDS))),
    min_size=1,
    max_size=6,
)


def _record(ref_id: str, step: int, shown: set[str]) -> CallbackRecord:
    return CallbackRecord(ref_id, **STEPS[step], **{name: TRUTH[name] for name in shown})


@given(delivered=reports, via_poll=st.lists(st.booleans(), min_size=6, max_size=6))
@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_reports_in_any_order_with_missing_fields(engine, make_settings, delivered, via_poll):
    settings = make_settings()
    ref_id = f"p-{uuid.uuid4().hex}"
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id, next_poll_at) VALUES (:r, 'oa', now())"),
            {"r": ref_id},
        )
    before: dict = {name: None for name in WATCHED}
    final_seen = None
    for (step, shown), by_poll in zip(delivered, itertools.cycle(via_poll), strict=False):
        record = _record(ref_id, step, shown)
        with engine.begin() as conn:
            batches = store.claim_batches(conn, "default", 1, 200, 60) if by_poll else []
            if batches:
                store.complete_batch(conn, batches[0], [record], settings)
            else:
                store.merge_callbacks(conn, [record], source="push")
            conn.execute(
                text(
                    "UPDATE messages SET next_poll_at = now() WHERE ref_id = :r "
                    "AND state = 'pending'"
                ),
                {"r": ref_id},
            )
            row = (
                conn.execute(text("SELECT * FROM messages WHERE ref_id = :r"), {"r": ref_id})
                .mappings()
                .one()
            )
        after = {name: row[name] for name in WATCHED}
        # Known values stay known; once final, nothing moves.
        for name in WATCHED:
            if before[name] is not None:
                assert after[name] is not None, f"{name} erased by {record}"
            if final_seen is not None:
                assert after[name] == before[name], f"{name} changed after the final report"
        # Nothing is invented: each value is the truth of that field.
        for name in FIELDS:
            assert after[name] in (None, TRUTH[name])
        if final_seen is None and derive_state(record) is not State.PENDING:
            final_seen = record
        before = after

    assert row["state"] == (State.FAILED if final_seen else State.PENDING)
    if final_seen is not None:
        assert row["next_poll_at"] is None and row["resolved_at"] is not None
        assert (row["send_status"], row["send_failed"], row["error_code"]) == (5, 1, -118)
        for name in FIELDS:  # what the final report showed is what the row holds
            if getattr(final_seen, name) is not None:
                assert row[name] == TRUTH[name]
    elif any(STEPS[step]["send_status"] == 5 for step, _ in delivered):
        assert row["send_status"] == 5  # done without an outcome: kept, and polled again
        assert row["next_poll_at"] is not None
