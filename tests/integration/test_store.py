"""The store and scheduler on a real Postgres: claims, leases, merge rules, backoff, expiry."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from itertools import pairwise

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from worker import scheduler, store
from worker.records import CallbackRecord

pytestmark = pytest.mark.integration


def insert(engine, rows, *, due_now=True):
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, account) VALUES (:ref_id, :oa_id, :account)"
            ),
            [{"account": "default", **row} for row in rows],
        )
        if due_now:
            conn.execute(text("UPDATE messages SET next_poll_at = now() - interval '1 second'"))


def make_due(engine, ref_ids):
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE messages SET next_poll_at = now() WHERE ref_id = ANY(:r)"), {"r": ref_ids}
        )


def fetch(engine, ref_id):
    with engine.begin() as conn:
        return (
            conn.execute(text("SELECT * FROM messages WHERE ref_id = :r"), {"r": ref_id})
            .mappings()
            .one()
        )


def lease(engine, settings, account="default", seconds=None):
    with engine.begin() as conn:
        return store.claim_batches(
            conn, account, 1000, settings.esms_batch_size, seconds or settings.lease_seconds
        )


def test_new_rows_get_first_poll_after_interval(engine, make_settings):
    insert(engine, [{"ref_id": "a", "oa_id": "oa1"}], due_now=False)
    with engine.begin() as conn:
        assert store.initialize_new(conn, 30) == 1
        gap = conn.execute(
            text("SELECT extract(epoch FROM next_poll_at - created_at) FROM messages")
        ).scalar()
    assert float(gap) == pytest.approx(30)


def test_two_claimers_never_get_the_same_ref_id(engine):
    insert(engine, [{"ref_id": f"r{i}", "oa_id": f"oa{i % 3}"} for i in range(3000)])
    claimed: list[list[store.Batch]] = [[], []]
    barrier = threading.Barrier(2)

    def claimer(slot):
        with engine.begin() as conn:
            barrier.wait()
            claimed[slot] = store.claim_batches(conn, "default", 32, 50, 60)

    threads = [threading.Thread(target=claimer, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Two claims at once (the scheduler lock normally prevents it) never share a RefId: rows
    # the other holds are skipped, and a batch records only the rows it leased.
    ids = [ref for batches in claimed for batch in batches for ref in batch.ref_ids]
    assert len(ids) == len(set(ids)) >= 1600
    with engine.begin() as conn:
        leased = conn.execute(text("SELECT count(*) FROM messages WHERE lease_id IS NOT NULL"))
        assert leased.scalar() == len(ids)
        rest = store.claim_batches(conn, "default", 1000, 50, 60)
    assert len(ids) + sum(len(batch.ref_ids) for batch in rest) == 3000
    # A leased row is not due again until its lease runs out.
    with engine.begin() as conn:
        assert store.claim_batches(conn, "default", 10, 50, 60) == []
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == len(
            claimed[0]
        ) + len(claimed[1]) + len(rest)


def test_batches_hold_one_oa_and_at_most_batch_size(engine, make_settings):
    insert(engine, [{"ref_id": f"r{i}", "oa_id": f"oa{i % 4}"} for i in range(1000)])
    settings = make_settings(esms_batch_size=200)
    batches = lease(engine, settings)
    with engine.begin() as conn:
        for batch in batches:
            assert len(batch.ref_ids) <= 200
            oas = (
                conn.execute(
                    text("SELECT DISTINCT oa_id FROM messages WHERE ref_id = ANY(:ids)"),
                    {"ids": list(batch.ref_ids)},
                )
                .scalars()
                .all()
            )
            assert oas == [batch.oa_id]
            leased = conn.execute(
                text("SELECT count(*) FROM messages WHERE lease_id = :id"), {"id": batch.id}
            ).scalar()
            assert leased == len(batch.ref_ids)


def test_empty_oa_and_unknown_account_are_never_claimed(engine, make_settings):
    insert(engine, [{"ref_id": "blank", "oa_id": ""}])
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, account, next_poll_at) "
                "VALUES ('other', 'oa1', 'nobody', now() - interval '1 s')"
            )
        )
    report = scheduler.schedule_tick(engine, make_settings(), lambda batches: None)
    assert report.batches == []


def test_complete_batch_merges_and_backs_off(engine, make_settings):
    settings = make_settings(poll_interval_seconds=30, poll_max_interval_seconds=100)
    insert(
        engine,
        [
            {"ref_id": "done", "oa_id": "oa"},
            {"ref_id": "wait", "oa_id": "oa"},
            {"ref_id": "none", "oa_id": "oa"},
        ],
    )
    intervals = []
    for _ in range(4):
        with engine.begin() as conn:
            conn.execute(text("UPDATE messages SET next_poll_at = now() WHERE state = 'pending'"))
        (batch,) = lease(engine, settings)
        records = [
            CallbackRecord(
                "done",
                send_status=5,
                send_success=1,
                total_price=Decimal("385.5"),
                error_info='{"error":0,"message":"Success"}',
            ),
            CallbackRecord("wait", send_status=2),
            CallbackRecord("stranger", send_status=5, send_success=1),
        ]
        with engine.begin() as conn:
            store.complete_batch(conn, batch, records, settings)
            intervals.append(
                float(
                    conn.execute(
                        text(
                            "SELECT extract(epoch FROM next_poll_at - last_polled_at) "
                            "FROM messages WHERE ref_id = 'none'"
                        )
                    ).scalar()
                )
            )
    assert intervals == pytest.approx([30, 60, 100, 100], abs=0.5)
    done = fetch(engine, "done")
    assert (done["state"], done["send_status"], done["total_price"]) == (
        "sent",
        5,
        Decimal("385.5"),
    )
    assert done["resolved_at"] is not None and done["next_poll_at"] is None
    assert done["error_code"] == 0 and done["poll_count"] == 1
    wait = fetch(engine, "wait")
    assert (wait["state"], wait["send_status"], wait["poll_count"]) == ("pending", 2, 4)
    with engine.begin() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM messages WHERE ref_id='stranger'")).scalar()
            == 0
        )
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == 0


def test_merge_is_forward_only(engine):
    insert(engine, [{"ref_id": "m", "oa_id": "oa"}])

    def merge(*records):
        with engine.begin() as conn:
            return store.merge_callbacks(conn, list(records)).changed

    assert merge(CallbackRecord("m", send_status=7)) == 1
    # An older status does not undo a later one.
    assert merge(CallbackRecord("m", send_status=2)) == 0
    assert fetch(engine, "m")["send_status"] == 7
    # Duplicates in one answer: the most advanced wins, whatever the order.
    final = CallbackRecord(
        "m", send_status=5, send_success=0, send_failed=1, error_info='{"error":-118,"message":"x"}'
    )
    assert merge(final, CallbackRecord("m", send_status=2)) == 1
    row = fetch(engine, "m")
    assert (row["state"], row["error_code"], row["send_failed"]) == ("failed", -118, 1)
    # A final row never changes again: not by a later "sent", not by the same batch twice.
    assert merge(CallbackRecord("m", send_status=5, send_success=1)) == 0
    assert merge(final) == 0
    again = fetch(engine, "m")
    assert (again["state"], again["resolved_at"], again["updated_at"]) == (
        "failed",
        row["resolved_at"],
        row["updated_at"],
    )


def test_rejected_is_final(engine):
    insert(engine, [{"ref_id": "r", "oa_id": "oa"}])
    with engine.begin() as conn:
        store.merge_callbacks(conn, [CallbackRecord("r", send_status=4)])
    assert fetch(engine, "r")["state"] == "rejected"


def test_release_changes_no_data(engine, make_settings):
    settings = make_settings()
    insert(engine, [{"ref_id": "x", "oa_id": "oa"}])
    with engine.begin() as conn:
        store.merge_callbacks(conn, [CallbackRecord("x", send_status=2, phone_number="0909")])
    before = fetch(engine, "x")
    (batch,) = lease(engine, settings)
    with engine.begin() as conn:
        store.release_batch(conn, batch, 0)
    after = fetch(engine, "x")
    for column in ("state", "send_status", "phone_number", "poll_count", "updated_at"):
        assert after[column] == before[column]
    assert after["lease_id"] is None


def test_lapsed_lease_makes_rows_due_again(engine, make_settings):
    settings = make_settings()
    insert(engine, [{"ref_id": "l", "oa_id": "oa"}])
    (batch,) = lease(engine, settings, seconds=0.2)
    with engine.begin() as conn:
        assert store.claim_batches(conn, "default", 10, 200, 60) == []
        conn.execute(text("SELECT pg_sleep(0.3)"))
    with engine.begin() as conn:
        assert store.load_batch(conn, batch.id, 0) is None
        assert [b.ref_ids for b in store.claim_batches(conn, "default", 10, 200, 60)] == [("l",)]


def _age(engine, ref_id: str, days: float, *, polled_days_ago: float | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET created_at = now() - make_interval(days => :days),"
                " last_polled_at = now() - make_interval(secs => :polled * 86400)"
                " WHERE ref_id = :ref_id"
            ),
            {"days": days, "polled": polled_days_ago, "ref_id": ref_id},
        )


def test_expiry_sweep_needs_a_poll_at_the_maximum_age(engine):
    rows = ["old-polled", "old-polled-early", "old-unpolled", "young", "orphan", "no-oa"]
    insert(engine, [{"ref_id": ref, "oa_id": "oa"} for ref in rows[:-2]])
    insert(engine, [{"ref_id": "orphan", "oa_id": "oa", "account": "gone"}])
    insert(engine, [{"ref_id": "no-oa", "oa_id": ""}])
    _age(engine, "old-polled", 4, polled_days_ago=0.5)  # polled after its 3 days were up
    _age(engine, "old-polled-early", 4, polled_days_ago=2)  # last polled on day 2
    _age(engine, "old-unpolled", 4)  # the poller was away: never polled
    for ref in ("orphan", "no-oa"):  # nothing can poll these: the age alone expires them
        _age(engine, ref, 4)
    with engine.begin() as conn:
        assert store.expire_old(conn, 259200, ["default"]) == 3
    states = {ref: fetch(engine, ref)["state"] for ref in rows}
    assert states == {
        "old-polled": "expired",
        "old-polled-early": "pending",
        "old-unpolled": "pending",
        "young": "pending",
        "orphan": "expired",
        "no-oa": "expired",
    }


def test_expiry_sweep_leaves_rows_in_flight_to_their_request(engine, make_settings):
    settings = make_settings()
    insert(engine, [{"ref_id": "held", "oa_id": "oa"}])
    _age(engine, "held", 4, polled_days_ago=0.5)
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET next_poll_at = now() WHERE ref_id = 'held'"))
    (batch,) = lease(engine, settings)
    with engine.begin() as conn:
        assert store.expire_old(conn, 259200, ["default"]) == 0
        store.complete_batch(conn, batch, [CallbackRecord("held", send_status=2)], settings)
    row = fetch(engine, "held")
    assert (row["state"], row["send_status"], row["lease_id"]) == ("pending", 2, None)
    with engine.begin() as conn:  # its answer came after the maximum age: now it may expire
        assert store.expire_old(conn, 259200, ["default"]) == 1


def test_a_polled_row_is_due_again_no_later_than_its_maximum_age(engine, make_settings):
    settings = make_settings(poll_interval_seconds=30, poll_max_interval_seconds=600)
    insert(engine, [{"ref_id": "near", "oa_id": "oa"}, {"ref_id": "far", "oa_id": "oa"}])
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET next_poll_at = now(), poll_count = 10,"
                " created_at = now() - make_interval(secs => CASE ref_id"
                " WHEN 'near' THEN 259200 - 60 ELSE 0 END)"
            )
        )
    (batch,) = lease(engine, settings)
    with engine.begin() as conn:
        store.complete_batch(conn, batch, [], settings)
        due = dict(
            conn.execute(
                text("SELECT ref_id, extract(epoch FROM next_poll_at - now()) FROM messages")
            ).all()
        )
    assert 55 <= due["near"] <= 60  # at its maximum age, not 600 s later
    assert 595 <= due["far"] <= 600


def test_a_final_report_replaces_expired(engine):
    insert(engine, [{"ref_id": "late", "oa_id": "oa"}, {"ref_id": "vague", "oa_id": "oa"}])
    for ref in ("late", "vague"):
        _age(engine, ref, 4, polled_days_ago=0.1)
    with engine.begin() as conn:
        assert store.expire_old(conn, 259200, ["default"]) == 2
        # A report that is not final does not bring an expired row back.
        assert store.merge_callbacks(conn, [CallbackRecord("vague", send_status=7)]).changed == 0
        done = store.merge_callbacks(
            conn, [CallbackRecord("late", send_status=5, send_success=1)], source="push"
        )
    assert (done.changed, done.resolved) == (1, {"sent": 1})
    late = fetch(engine, "late")
    assert (late["state"], late["send_status"], late["next_poll_at"]) == ("sent", 5, None)
    assert fetch(engine, "vague")["state"] == "expired"
    with engine.connect() as conn:
        history = conn.execute(
            text(
                "SELECT source, old_state, new_state FROM message_history"
                " WHERE ref_id = 'late' ORDER BY id"
            )
        ).all()
    assert [tuple(row) for row in history] == [
        ("expiry", "pending", "expired"),
        ("push", "expired", "sent"),
    ]
    with engine.begin() as conn:  # and the provider's final state is final
        again = store.merge_callbacks(conn, [CallbackRecord("late", send_status=4)])
    assert again.changed == 0 and fetch(engine, "late")["state"] == "sent"


def test_scheduler_keeps_queue_short(engine, make_settings):
    settings = make_settings(esms_batch_size=10, schedule_lookahead_seconds=2)
    insert(engine, [{"ref_id": f"q{i}", "oa_id": "oa"} for i in range(5000)])
    sent = []
    first = scheduler.schedule_tick(engine, settings, sent.extend)
    wanted = scheduler.batches_wanted(settings, 0)
    assert len(first.batches) == wanted == len(sent)
    # Nothing completed: the next tick adds nothing.
    assert scheduler.schedule_tick(engine, settings, sent.extend).batches == []
    with engine.begin() as conn:
        ticks, age = conn.execute(
            text("SELECT ticks, now() - last_tick_at FROM scheduler_heartbeat")
        ).one()
    assert ticks >= 2 and age.total_seconds() < 5


def test_a_tick_queues_half_a_second_of_batches_before_claiming_the_rest(engine, make_settings):
    # A worker that starts with a due backlog: its first request must not wait for the claim
    # of the whole lookahead.
    settings = make_settings(esms_batch_size=10, schedule_lookahead_seconds=3)
    insert(engine, [{"ref_id": f"h{i}", "oa_id": "oa"} for i in range(5000)])
    wanted = scheduler.batches_wanted(settings, 0)
    first = scheduler.first_round(settings, wanted)
    assert 0 < first < wanted
    queued, leased_when_queued = [], []

    def enqueue(batches):
        with engine.connect() as conn:
            leased = "SELECT count(*) FROM messages WHERE lease_id IS NOT NULL"
            leased_when_queued.append(conn.execute(text(leased)).scalar())
        queued.append(len(batches))

    report = scheduler.schedule_tick(engine, settings, enqueue)
    assert queued == [first, wanted - first]
    assert leased_when_queued == [first * 10, wanted * 10]
    assert len(report.batches) == wanted
    # With batches in flight, a tick tops up in one round.
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM poll_batches WHERE id = ANY(:ids)"),
                     {"ids": [batch.id for batch in report.batches[:first + 1]]})  # fmt: skip
    queued.clear()
    again = scheduler.schedule_tick(engine, settings, enqueue)
    assert queued == [first + 1] and len(again.batches) == first + 1


def test_the_second_round_leaves_the_rest_to_a_tick_that_holds_the_lock(engine, make_settings):
    settings = make_settings(esms_batch_size=10, schedule_lookahead_seconds=3)
    insert(engine, [{"ref_id": f"l{i}", "oa_id": "oa"} for i in range(5000)])
    wanted = scheduler.batches_wanted(settings, 0)
    first = scheduler.first_round(settings, wanted)
    other = engine.connect()
    lock = text("SELECT pg_advisory_lock(:key)")

    def enqueue(_batches):
        # Another tick (a second beat) takes the lock between the two rounds.
        other.execute(lock, {"key": store._SCHEDULER_LOCK})

    try:
        report = scheduler.schedule_tick(engine, settings, enqueue)
    finally:
        other.execute(text("SELECT pg_advisory_unlock_all()"))
        other.close()
    assert len(report.batches) == first
    # The next tick claims what the second round left.
    again = scheduler.schedule_tick(engine, settings, lambda batches: None)
    assert len(again.batches) == wanted - first


def test_two_accounts_alternate_in_the_queue(engine, make_settings):
    settings = make_settings(
        esms_batch_size=10,
        esms_accounts={"shopb": {"api_key": "kb", "secret_key": "sb"}},
    )
    insert(engine, [{"ref_id": f"a{i}", "oa_id": "oa"} for i in range(2000)])
    insert(engine, [{"ref_id": f"b{i}", "account": "shopb", "oa_id": "oa"} for i in range(2000)])
    report = scheduler.schedule_tick(engine, settings, lambda batches: None)
    order = [batch.account for batch in report.batches]
    assert len(order) == 2 * scheduler.batches_wanted(settings, 0)
    # Pool processes take tasks in this order and wait in them for their account's rate slot.
    assert sorted(set(order)) == ["default", "shopb"]
    assert all(first != second for first, second in pairwise(order))


def test_short_batch_of_first_polls_waits_to_fill(engine, make_settings):
    settings = make_settings(esms_batch_size=10, poll_batch_fill_seconds=30)
    insert(engine, [{"ref_id": f"w{i}", "oa_id": "few"} for i in range(4)])
    insert(engine, [{"ref_id": f"m{i}", "oa_id": "many"} for i in range(25)])
    report = scheduler.schedule_tick(engine, settings, lambda batches: None)
    # Full batches go at once; the short ones (4 of "few", 5 of "many") wait for more rows.
    assert sorted((b.oa_id, len(b.ref_ids)) for b in report.batches) == [("many", 10)] * 2
    with engine.begin() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM messages WHERE lease_id IS NULL")).scalar() == 9
        )
    # Six more messages of "few" fall due: together they fill a batch.
    insert(engine, [{"ref_id": f"w{i}", "oa_id": "few"} for i in range(4, 10)], due_now=False)
    make_due(engine, [f"w{i}" for i in range(4, 10)])
    report = scheduler.schedule_tick(engine, settings, lambda batches: None)
    assert [(b.oa_id, len(b.ref_ids)) for b in report.batches] == [("few", 10)]
    # Waited out: the short batch goes as it is.
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE messages SET next_poll_at = now() - interval '31 seconds' "
                "WHERE lease_id IS NULL"
            )
        )
    report = scheduler.schedule_tick(engine, settings, lambda batches: None)
    assert [(b.oa_id, len(b.ref_ids)) for b in report.batches] == [("many", 5)]


def test_rows_polled_before_never_wait_to_fill(engine, make_settings):
    settings = make_settings(esms_batch_size=10, poll_batch_fill_seconds=30)
    insert(engine, [{"ref_id": f"p{i}", "oa_id": "oa"} for i in range(3)])
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET poll_count = 1 WHERE ref_id = 'p0'"))
    report = scheduler.schedule_tick(engine, settings, lambda batches: None)
    # One row on its backoff makes the whole short batch go: its gap between polls must not grow.
    assert [sorted(b.ref_ids) for b in report.batches] == [["p0", "p1", "p2"]]
    # Off (the default): whatever is due goes at each tick.
    insert(engine, [{"ref_id": "alone", "oa_id": "oa"}], due_now=False)
    make_due(engine, ["alone"])
    report = scheduler.schedule_tick(engine, make_settings(esms_batch_size=10), lambda b: None)
    assert [b.ref_ids for b in report.batches] == [("alone",)]


def test_claim_cut_across_oas_still_sends_full_batches(engine, make_settings):
    settings = make_settings(esms_batch_size=100)
    insert(engine, [{"ref_id": f"f{i}", "oa_id": f"oa{i % 3}"} for i in range(9000)])
    report = scheduler.schedule_tick(engine, settings, lambda batches: None)
    wanted = scheduler.batches_wanted(settings, 0)
    assert len(report.batches) == wanted
    assert all(len(batch.ref_ids) == 100 for batch in report.batches)
    ref_ids = [ref for batch in report.batches for ref in batch.ref_ids]
    assert len(ref_ids) == len(set(ref_ids))


def test_unpollable_rows_are_reported_once(engine, make_settings, caplog):
    insert(engine, [{"ref_id": "blank", "oa_id": ""}])
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id, account) VALUES ('o', 'oa', 'nobody')")
        )
    scheduler._last_unpollable_check = float("-inf")
    scheduler._reported_unpollable.clear()
    settings = make_settings()
    with caplog.at_level("WARNING", logger="worker"):
        scheduler.schedule_tick(engine, settings, lambda batches: None)
        scheduler._last_unpollable_check = float("-inf")
        scheduler.schedule_tick(engine, settings, lambda batches: None)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert any("'nobody'" in w and "not configured" in w for w in warnings)
    assert any("empty oa_id" in w for w in warnings)


def test_every_change_is_in_the_history(engine, make_settings):
    settings = make_settings()
    insert(engine, [{"ref_id": "h", "oa_id": "oa"}])
    (batch,) = lease(engine, settings)
    with engine.begin() as conn:
        store.complete_batch(conn, batch, [CallbackRecord("h", send_status=2)], settings)
    with engine.begin() as conn:
        store.merge_callbacks(conn, [CallbackRecord("h", send_status=2)], source="push")
        store.merge_callbacks(
            conn, [CallbackRecord("h", send_status=5, send_success=0,
                                  error_info='{"error":-108}')], source="push"
        )  # fmt: skip
        store.merge_callbacks(conn, [CallbackRecord("h", send_status=5, send_success=1)])
        history = conn.execute(
            text(
                "SELECT source, batch_id, old_state, new_state, old_send_status, "
                "new_send_status, error_code FROM message_history WHERE ref_id = 'h' ORDER BY id"
            )
        ).all()
    assert history == [
        ("poll", batch.id, "pending", "pending", None, 2, None),
        ("push", None, "pending", "failed", 2, 5, -108),
    ]


def test_every_program_waits_for_postgres_within_its_deadlines(engine, make_settings):
    """The engines of the daemon carry the statement and lock timeouts and TCP keepalives: a
    write that meets an exclusive lock gives up after DATABASE_LOCK_TIMEOUT_SECONDS."""
    settings = make_settings(database_lock_timeout_seconds=1, database_statement_timeout_seconds=3)
    polling = store.make_engine(settings, pool_size=1, for_polling=True)
    try:
        with polling.connect() as conn:
            shown = {
                name: conn.execute(text(f"SHOW {name}")).scalar()
                for name in ("statement_timeout", "lock_timeout", "synchronous_commit")
            }
            assert shown == {
                "statement_timeout": "3s",
                "lock_timeout": "1s",
                "synchronous_commit": "off",
            }
            params = conn.connection.dbapi_connection.info.get_parameters()
            assert (params["keepalives_idle"], params["tcp_user_timeout"]) == ("10", "25000")
        insert(engine, [{"ref_id": "locked", "oa_id": "oa"}])
        with engine.begin() as holder:
            holder.execute(text("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                with polling.begin() as conn:
                    store.claim_batches(conn, "default", 1, 200, 60)
            assert time.monotonic() - started < 2.5
        with polling.begin() as conn:  # and the pool recovers at once
            assert len(store.claim_batches(conn, "default", 1, 200, 60)) == 1
    finally:
        polling.dispose()


def test_the_worker_names_its_sessions_and_opens_none_beyond_its_pool(make_settings, monkeypatch):
    """`pg_stat_activity` says which program holds a session; the worker's pool has no overflow
    (a connection opened past the pool was closed at its return: a new backend per poll)."""
    from worker import runtime
    from worker.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", make_settings().database_url.get_secret_value())
    get_settings.cache_clear()
    runtime.engine.cache_clear()
    engine = runtime.engine()
    try:
        with engine.connect() as conn:
            name = conn.execute(text("SELECT current_setting('application_name')")).scalar()
        assert name == "esms-worker"
        assert engine.pool.size() == 10 and engine.pool._max_overflow == 0
    finally:
        engine.dispose()
        runtime.engine.cache_clear()
        get_settings.cache_clear()
