"""The counts of final rows (migration 0008) stay equal to counting `messages` itself, through every
writer that changes a final row, before and after beat folds them; retention prunes what it
should and nothing else.

The reference queries are the views as migration 0003 wrote them: a count of the table.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import text

from worker import store, upkeep
from worker.records import CallbackRecord

pytestmark = pytest.mark.integration

REFERENCE = {
    "message_counts": """
        SELECT account, oa_id, state, count(*) AS messages,
               COALESCE(sum(total_price), 0) AS total_price
        FROM messages GROUP BY account, oa_id, state
    """,
    "resolved_hourly": """
        SELECT date_trunc('hour', resolved_at) AS hour, account, oa_id, zns_temp_id, state,
               count(*) AS messages, COALESCE(sum(total_price), 0) AS total_price
        FROM messages WHERE resolved_at IS NOT NULL
        GROUP BY 1, account, oa_id, zns_temp_id, state
    """,
    "failures_by_error": """
        SELECT account, error_code, count(*) AS messages, max(resolved_at) AS last_seen,
               (array_agg(error_info ORDER BY resolved_at DESC NULLS LAST)
                    FILTER (WHERE error_info IS NOT NULL))[1] AS sample_error_info
        FROM messages WHERE state IN ('failed', 'rejected')
        GROUP BY account, error_code
    """,
}


def rows_of(conn, query: str) -> list[tuple]:
    return sorted(
        (tuple(row) for row in conn.execute(text(query))), key=lambda row: tuple(map(str, row))
    )


def assert_views_count_the_table(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL TIME ZONE 'UTC'"))
        for view, reference in REFERENCE.items():
            assert rows_of(conn, f"SELECT * FROM {view}") == rows_of(conn, reference), view


def status_counts(engine) -> dict:
    with engine.begin() as conn:
        return {
            (row.account, row.oa_id): (row.pending, row.sent, row.failed, row.rejected,
                                       row.expired, row.resolved_recently)
            for row in store.status(conn, 300)
        }  # fmt: skip


def track(engine, *specs: tuple[str, str, str]) -> None:
    with engine.begin() as conn:
        store.track(conn, [store.NewMessage(ref, oa_id=oa, account=acc) for ref, acc, oa in specs])


def sent(ref_id: str, price: str, temp: str = "231001") -> CallbackRecord:
    return CallbackRecord(
        ref_id, send_status=5, send_success=1, send_failed=0, total_price=Decimal(price),
        error_info='{"error":0,"message":"Success"}', zns_temp_id=temp,
    )  # fmt: skip


def failed(ref_id: str, code: int | None, temp: str = "231001") -> CallbackRecord:
    info = None if code is None else f'{{"error":{code},"message":"no"}}'
    return CallbackRecord(
        ref_id, send_status=5, send_success=0, send_failed=1, total_price=Decimal("0"),
        error_info=info, zns_temp_id=temp,
    )  # fmt: skip


def merge(engine, *records: CallbackRecord, source: str = "poll") -> None:
    with engine.begin() as conn:
        store.merge_callbacks(conn, list(records), source=source, batch_id=uuid.uuid4())


def make_old(engine, *ref_ids: str) -> None:
    """Pending rows past any maximum age (a hand change of pending rows: not counted anyway)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET created_at = now() - interval '5 days' WHERE ref_id = ANY(:r)"
            ),
            {"r": list(ref_ids)},
        )


def fold(engine) -> int:
    with engine.begin() as conn:
        return store.fold_counts(conn)


def test_every_writer_keeps_the_counts_equal_to_the_table(engine):
    track(
        engine,
        *((f"a-{i}", "default", "oa-1") for i in range(8)),
        *((f"b-{i}", "shopb", "oa-2") for i in range(4)),
    )
    assert_views_count_the_table(engine)
    merge(engine, sent("a-0", "300"), sent("a-1", "150.5", "231002"), failed("a-2", -118))
    merge(engine, CallbackRecord("a-3", send_status=2))  # progress, still pending
    merge(engine, failed("b-0", None), failed("b-1", -124), source="push")
    merge(engine, CallbackRecord("b-2", send_status=4, error_info='{"error":-108}'))  # rejected
    assert_views_count_the_table(engine)
    assert fold(engine) > 0
    assert_views_count_the_table(engine)

    # Expiry, then a final report for an expired row (leaves the expired count), then a revival.
    make_old(engine, "a-4", "a-5", "a-6", "b-3")
    with engine.begin() as conn:
        assert store.expire_old(conn, 259200, []) == 4
    assert_views_count_the_table(engine)
    merge(engine, sent("a-4", "300", "231003"), failed("a-5", -118))
    merge(engine, sent("a-0", "999"))  # a final row takes nothing
    assert_views_count_the_table(engine)
    with engine.begin() as conn:
        revived = store.repoll(conn, include_expired=True, ref_ids=["a-6", "b-3"])
    assert revived.revived == 2
    assert_views_count_the_table(engine)
    assert fold(engine) > 0
    assert fold(engine) == 0
    assert_views_count_the_table(engine)
    assert status_counts(engine) == {
        ("default", "oa-1"): (3, 3, 2, 0, 0, 5),  # a-3, a-6, a-7 pending; a-0, a-1, a-4 sent
        ("shopb", "oa-2"): (1, 0, 2, 1, 0, 3),
    }


def test_message_retention_leaves_the_counts_with_the_rows(engine, make_settings):
    track(engine, *((f"m-{i}", "default", "oa-1") for i in range(6)))
    merge(engine, *(sent(f"m-{i}", "10") for i in range(4)), failed("m-4", -118))
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET resolved_at = now() - interval '40 days' "
                "WHERE ref_id IN ('m-0', 'm-1', 'm-4')"
            )
        )
    store.recount(engine)  # resolved_at was changed by hand
    assert_views_count_the_table(engine)
    report = upkeep.run(engine, make_settings(message_retention_days=30), batch=2)
    assert report.messages_pruned == 3
    with engine.begin() as conn:
        left = {ref for (ref,) in conn.execute(text("SELECT ref_id FROM messages"))}
    assert left == {"m-2", "m-3", "m-5"}  # the pending m-5 too
    assert_views_count_the_table(engine)
    assert status_counts(engine) == {("default", "oa-1"): (1, 2, 0, 0, 0, 2)}


def test_history_retention_prunes_only_what_is_older(engine, make_settings):
    track(engine, *((f"h-{i}", "default", "oa-1") for i in range(5)))
    merge(engine, *(sent(f"h-{i}", "10") for i in range(5)))
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE message_history SET at = now() - interval '31 days' "
                "WHERE ref_id IN ('h-0', 'h-1', 'h-2')"
            )
        )
    settings = make_settings()
    assert settings.history_retention_days == 30
    assert settings.message_retention_days is None
    report = upkeep.run(engine, settings, batch=2)
    assert (report.history_pruned, report.messages_pruned) == (3, 0)
    with engine.begin() as conn:
        kept = {ref for (ref,) in conn.execute(text("SELECT ref_id FROM message_history"))}
        messages = conn.execute(text("SELECT count(*) FROM messages")).scalar()
    assert kept == {"h-3", "h-4"}
    assert messages == 5


def test_event_retention_prunes_only_what_is_older(engine, make_settings):
    track(engine, *((f"e-{i}", "default", "oa-1") for i in range(5)))
    merge(engine, *(sent(f"e-{i}", "10") for i in range(5)))
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE message_events SET at = now() - interval '31 days' "
                "WHERE ref_id IN ('e-0', 'e-1', 'e-2')"
            )
        )
    settings = make_settings()
    assert settings.event_retention_days == 30
    report = upkeep.run(engine, settings, batch=2)
    assert report.events_pruned == 3
    with engine.begin() as conn:
        kept = {ref for (ref,) in conn.execute(text("SELECT ref_id FROM message_events"))}
    assert kept == {"e-3", "e-4"}


def test_one_upkeep_run_at_a_time(engine, make_settings):
    with store.single_statements(engine) as holder:  # another worker's run
        assert store.try_upkeep_lock(holder)
        try:
            assert upkeep.run(engine, make_settings()).skipped
        finally:
            store.upkeep_unlock(holder)
    assert not upkeep.run(engine, make_settings()).skipped


def test_recount_repairs_counts_after_a_change_by_hand(engine):
    track(engine, ("r-1", "default", "oa-1"), ("r-2", "default", "oa-1"))
    merge(engine, sent("r-1", "10"), failed("r-2", -118))
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET state = 'sent' WHERE ref_id = 'r-2'"))
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL TIME ZONE 'UTC'"))
        counted = rows_of(conn, "SELECT * FROM message_counts")
        reference = rows_of(conn, REFERENCE["message_counts"])
    assert counted != reference
    store.recount(engine)
    assert_views_count_the_table(engine)
