"""One poll against the real emulator: success, and every failure leaving the data alone."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from prometheus_client import REGISTRY
from pydantic import SecretStr
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.processes import start_emulator
from worker import poller, scheduler, store
from worker.cooloff import CoolOffs, account_scope
from worker.esms_client import EsmsClient
from worker.notfound import ClaimLimits, NotFoundTracker
from worker.ratelimit import RateLimiter, RatePolicy, SlotRefused

pytestmark = pytest.mark.integration

FAULTS = {
    "fault_5xx_rate": "HTTP 5",
    "fault_broken_body_rate": "",
    "fault_slow_rate": "timeout",
}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    from tests.processes import Children

    children = Children(tmp_path_factory.mktemp("emulator"))
    running = start_emulator(
        children,
        "--account", f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s", "0", "--final-after-max-s", "0",
        "--slow-seconds", "3",
    )  # fmt: skip
    yield running
    children.stop_all()


def shared_limiter(settings):
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    return RateLimiter(client, RatePolicy.from_settings(settings))


@pytest.fixture
def poll(engine, make_settings, emulator):
    emulator.admin("POST", "/reset")
    emulator.admin(
        "POST",
        "/config",
        json={name: 0 for name in (*FAULTS, "fault_code_rate", "fault_stale_rate")},
    )
    settings = make_settings(esms_base_url=emulator.url, esms_timeout_seconds=1)
    client = EsmsClient(settings.esms_base_url, settings.esms_timeout_seconds)
    limiter = RateLimiter(
        redis.Redis.from_url(settings.redis_url.get_secret_value()),
        RatePolicy.from_settings(settings),
    )
    cooloffs = CoolOffs(redis.Redis.from_url(settings.redis_url.get_secret_value()))
    notfound = NotFoundTracker(
        redis.Redis.from_url(settings.redis_url.get_secret_value()), settings
    )

    def run(ref_ids, *, oa_id="oa-1", **overrides):
        local = settings.model_copy(update=overrides) if overrides else settings
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO messages (ref_id, oa_id, next_poll_at) "
                    "VALUES (:r, :o, now()) ON CONFLICT DO NOTHING"
                ),
                [{"r": ref, "o": oa_id} for ref in ref_ids],
            )
            conn.execute(text("UPDATE messages SET next_poll_at = now() WHERE state='pending'"))
            (batch,) = store.claim_batches(conn, "default", 1, 200, local.lease_seconds)
        return poller.poll_batch(
            batch.id,
            settings=local,
            engine=engine,
            client=client,
            limiter=limiter,
            cooloffs=cooloffs,
            notfound=notfound,
        )

    yield run
    client.close()


def snapshot(engine):
    with engine.begin() as conn:
        return {
            row["ref_id"]: row
            for row in conn.execute(text("SELECT * FROM messages ORDER BY ref_id")).mappings()
        }


def test_success_merges_the_answer(poll, engine, emulator):
    result = poll(["a1", "a2", "a3"])
    assert result.outcome is poller.Outcome.DONE and result.items == 3
    rows = snapshot(engine)
    assert {row["state"] for row in rows.values()} <= {"sent", "failed", "rejected"}
    truth = emulator.admin("GET", "/truth")["messages"]
    assert {ref: rows[ref]["state"] for ref in rows} == {
        ref: truth[ref]["final_state"] for ref in rows
    }


@pytest.mark.parametrize("knob", sorted(FAULTS))
def test_failed_request_changes_no_data(poll, engine, emulator, caplog, knob):
    emulator.admin("POST", "/messages", json={"messages": [{"ref_id": "b1", "oa_id": "oa-1"}]})
    emulator.admin("POST", "/config", json={knob: 1.0})
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES ('b1', 'oa-1')"))
        store.merge_callbacks(conn, [])
    before = snapshot(engine)
    with caplog.at_level(logging.INFO, logger="worker"):
        result = poll(["b1"])
    after = snapshot(engine)
    for column in ("state", "send_status", "error_info", "total_price", "updated_at"):
        assert after["b1"][column] == before["b1"][column]
    assert after["b1"]["lease_id"] is None
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == 0
    if result.outcome is poller.Outcome.DONE:
        # `Data_callback` null or missing under Code 100 reads as "no callback yet".
        assert knob == "fault_broken_body_rate" and result.items == 0
        return
    assert result.outcome is poller.Outcome.FAILED
    failures = [r.getMessage() for r in caplog.records if "request failed" in r.getMessage()]
    assert len(failures) == 1
    assert "account=default oa=oa-1 size=1" in failures[0]
    assert FAULTS[knob] in failures[0]
    assert TEST_SECRET_KEY not in caplog.text and TEST_API_KEY not in caplog.text


def test_wrong_keys_change_no_data_and_pause_the_account(
    poll, engine, emulator, caplog, make_settings
):
    wrong = SecretStr("not-the-secret")
    with caplog.at_level(logging.INFO, logger="worker"):
        result = poll(["c1"], esms_secret_key=wrong)
        again = poll(["c2"], esms_secret_key=wrong)
    assert result.outcome is poller.Outcome.FAILED and "Code 101" in result.reason
    # A batch queued before the refusal is not sent at all while the account cools off.
    assert again.outcome is poller.Outcome.PAUSED
    assert len(emulator.admin("GET", "/requests")["requests"]) == 1
    rows = snapshot(engine)
    assert rows["c1"]["state"] == "pending" and rows["c1"]["send_status"] is None
    assert "not-the-secret" not in caplog.text
    # One error per cool-off, naming the account and the code, however many batches failed.
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "account:default" in errors[0] and "101" in errors[0]
    # The rows wait out the cool-off, and the scheduler claims nothing for the account.
    waits = [(row["next_poll_at"] - row["updated_at"]).total_seconds() for row in rows.values()]
    assert min(waits) > 20
    settings = make_settings()
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET next_poll_at = now()"))
    cooloffs = CoolOffs(redis.Redis.from_url(settings.redis_url.get_secret_value()))
    assert cooloffs.paused([account_scope("default")]) == {account_scope("default")}
    tick = scheduler.schedule_tick(engine, settings, lambda batches: None, cooloffs)
    assert tick.batches == []
    # The tick shows the cool-off and its own time to Prometheus (docs/alerts.md).
    paused = {"account": "default", "scope": "account"}
    assert REGISTRY.get_sample_value("esms_cooling_off", paused) == 1
    last_tick = REGISTRY.get_sample_value("esms_scheduler_last_tick_timestamp_seconds")
    assert time.time() - last_tick < 5
    # Keys accepted again: the cool-off ends with the first good answer.
    cooloffs.clear(account_scope("default"))
    result = poll(["c3"])
    assert result.outcome is poller.Outcome.DONE
    assert cooloffs.paused([account_scope("default")]) == set()
    scheduler.schedule_tick(engine, settings, lambda batches: None, cooloffs)
    assert REGISTRY.get_sample_value("esms_cooling_off", paused) == 0


def test_rate_limited_answer_cuts_the_shared_rate(poll, emulator, make_settings, caplog):
    emulator.admin("POST", "/config", json={"fault_code_rate": 1.0, "fault_codes": [160]})
    with caplog.at_level("WARNING", logger="worker.poller"):
        result = poll(["d1"])
    assert result.outcome is poller.Outcome.FAILED and "160" in result.reason
    settings = make_settings()
    limiter = RateLimiter(
        redis.Redis.from_url(settings.redis_url.get_secret_value()),
        RatePolicy.from_settings(settings),
    )
    # Every worker now waits out the provider's window, then sends at the lower rate.
    permit = limiter.acquire(settings.accounts["default"].limiter_key, 5)
    assert permit.wait_seconds > 0.5
    assert permit.rate == pytest.approx(settings.effective_rate_per_second * 0.7, abs=0.5)
    cuts = [r.getMessage() for r in caplog.records if "rate cut" in r.getMessage()]
    assert len(cuts) == 1 and "19.2/s to 13.4/s" in cuts[0]


def test_stale_batch_sends_nothing(engine, make_settings, emulator):
    settings = make_settings(esms_base_url=emulator.url)
    emulator.admin("POST", "/reset")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id, next_poll_at) VALUES ('e1', 'oa', now())")
        )
        # A lease too short to cover the wait, the request and the write.
        (batch,) = store.claim_batches(conn, "default", 1, 200, 3)
    client = EsmsClient(settings.esms_base_url, 1)
    limiter = RateLimiter(
        redis.Redis.from_url(settings.redis_url.get_secret_value()),
        RatePolicy.from_settings(settings),
    )
    cooloffs = CoolOffs(redis.Redis.from_url(settings.redis_url.get_secret_value()))
    result = poller.poll_batch(
        batch.id, settings=settings, engine=engine, client=client, limiter=limiter,
        cooloffs=cooloffs, notfound=NotFoundTracker(limiter._redis, settings),
    )  # fmt: skip
    assert result.outcome is poller.Outcome.STALE
    assert emulator.admin("GET", "/requests")["requests"] == []
    # Released on the spot, not left claimed for the rest of its lease: due again now.
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == 0
        assert [b.ref_ids for b in store.claim_batches(conn, "default", 1, 200, 60)] == [("e1",)]


def _search(engine, settings, emulator, ref_ids):
    """Poll one batch of `ref_ids` and every batch its polls queue, against an emulator that
    answers Code 105 to a whole request naming a RefId it does not know."""
    connection = redis.Redis.from_url(settings.redis_url.get_secret_value())
    client = EsmsClient(settings.esms_base_url, 2)
    limiter = RateLimiter(connection, RatePolicy.from_settings(settings))
    cooloffs, notfound = CoolOffs(connection), NotFoundTracker(connection, settings)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id, next_poll_at) VALUES (:r, 'oa', now())"),
            [{"r": ref} for ref in ref_ids],
        )
        queue = store.claim_batches(conn, "default", 1, 200, settings.lease_seconds)
    outcomes = []
    try:
        while queue:
            outcomes.append(
                poller.poll_batch(
                    queue.pop(0).id, settings=settings, engine=engine, client=client,
                    limiter=limiter, cooloffs=cooloffs, notfound=notfound, enqueue=queue.extend,
                ).outcome
            )  # fmt: skip
    finally:
        client.close()
    return outcomes, emulator.admin("GET", "/requests")["requests"]


@pytest.fixture
def strict_emulator(emulator, engine):
    """The emulator knowing k0..k6 only, answering 105 for a whole request naming another."""
    emulator.admin("POST", "/reset")
    known = [f"k{i}" for i in range(7)]
    emulator.admin(
        "POST", "/messages", json={"messages": [{"ref_id": r, "oa_id": "oa"} for r in known]}
    )
    quiet = {name: 0 for name in (*FAULTS, "fault_code_rate", "fault_stale_rate")}
    emulator.admin(
        "POST", "/config", json={**quiet, "auto_register": False, "not_found_code": True}
    )
    yield emulator
    emulator.admin("POST", "/config", json={"auto_register": True, "not_found_code": False})


def test_code_105_search_infers_the_last_half(engine, make_settings, strict_emulator):
    """One RefId the provider does not know among 8 (sorted last): the first half of each
    105'd batch is sent, answered, and so the unknown RefId is in the parked half, split in turn
    without being sent whole; the lone unknown one is inferred, never sent. 4 requests."""
    settings = make_settings(esms_base_url=strict_emulator.url)
    known = [f"k{i}" for i in range(7)]
    outcomes, requests = _search(engine, settings, strict_emulator, [*known, "unknown"])
    assert [len(entry["refids"]) for entry in requests] == [8, 4, 2, 1]
    assert [entry["code"] for entry in requests] == [105, 100, 100, 100]
    assert outcomes.count(poller.Outcome.DONE) == 3
    rows = snapshot(engine)
    truth = strict_emulator.admin("GET", "/truth")["messages"]
    assert {ref: rows[ref]["state"] for ref in known} == {
        ref: truth[ref]["final_state"] for ref in known
    }
    lone = rows["unknown"]
    assert (lone["state"], lone["not_found_count"], lone["lease_id"]) == ("pending", 1, None)
    assert lone["last_polled_at"] is None  # inferred, not polled: it gets a real look later
    with engine.begin() as conn:
        wait = conn.execute(
            text("SELECT extract(epoch FROM next_poll_at - now()) FROM messages WHERE ref_id = :r"),
            {"r": "unknown"},
        ).scalar()
        assert wait == pytest.approx(30, abs=2)
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == 0
    # From now on it goes alone: the next claim puts it in a batch of its own.
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET next_poll_at = now() WHERE state = 'pending'"))
        batches = store.claim_batches(conn, "default", 5, 200, 60)
    assert [(b.kind, b.ref_ids) for b in batches] == [("lone", ("unknown",))]


def test_code_105_search_goes_on_in_the_half_answered_105(engine, make_settings, strict_emulator):
    """The unknown RefId sorted first: each first half is answered 105 too, the parked halves
    go back to be polled, the unknown RefId is answered 105 alone and polled alone from then
    on; the evidence makes the account's new RefIds go in smaller pools."""
    settings = make_settings(esms_base_url=strict_emulator.url)
    known = [f"k{i}" for i in range(7)]
    outcomes, requests = _search(engine, settings, strict_emulator, ["a-unknown", *known])
    assert [len(entry["refids"]) for entry in requests] == [8, 4, 2, 1]
    assert [entry["code"] for entry in requests] == [105, 105, 105, 105]
    assert outcomes == [poller.Outcome.FAILED] * 4
    rows = snapshot(engine)
    lone = rows["a-unknown"]
    assert (lone["not_found_count"], lone["lease_id"]) == (1, None)
    assert lone["last_polled_at"] is not None
    assert all(rows[ref]["lease_id"] is None and rows[ref]["poll_count"] == 0 for ref in known)
    connection = redis.Redis.from_url(settings.redis_url.get_secret_value())
    assert NotFoundTracker(connection, settings).pool_size("default") < 200
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET next_poll_at = now() WHERE state = 'pending'"))
        limits = NotFoundTracker(connection, settings).limits("default")
        batches = store.claim_batches(conn, "default", 10, 200, 60, limits=limits)
        pool = limits.new_size
    assert sorted((b.kind, len(b.ref_ids)) for b in batches) == sorted(
        [("lone", 1)] + [("new", len(part)) for part in _chunks(known, pool)]
    )


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def test_the_claim_keeps_refids_the_provider_may_not_know_within_the_budget(engine):
    """Pools of new RefIds and lone RefIds answered 105 come in the sizes and numbers the
    account's limits allow; RefIds the provider answered for before go in full batches."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, next_poll_at, poll_count, not_found_count)"
                " VALUES (:r, 'oa', now() - make_interval(secs => :age), :polls, :nf)"
            ),
            [{"r": f"new{i:02d}", "age": 10 + i, "polls": 0, "nf": 0} for i in range(10)]
            + [{"r": f"lone{i}", "age": 5 + i, "polls": 0, "nf": 1} for i in range(5)]
            + [{"r": f"known{i}", "age": 1, "polls": 1, "nf": 0} for i in range(7)],
        )
        limits = ClaimLimits(new_size=2, new_limit=3, lone_limit=2)
        batches = store.claim_batches(conn, "default", 50, 200, 60, limits=limits)
    kinds = sorted((b.kind, len(b.ref_ids)) for b in batches)
    assert kinds == [("known", 7), ("lone", 1), ("lone", 1), ("new", 2), ("new", 2), ("new", 2)]
    # The oldest of each kind first.
    new = sorted(ref for b in batches if b.kind == "new" for ref in b.ref_ids)
    assert new == [f"new{i:02d}" for i in range(4, 10)]
    assert sorted(b.ref_ids[0] for b in batches if b.kind == "lone") == ["lone3", "lone4"]


def test_code_105_without_a_queue_releases_the_batch(poll, engine, emulator):
    emulator.admin("POST", "/config", json={"auto_register": False, "not_found_code": True})
    try:
        result = poll(["n1", "n2"])
    finally:
        emulator.admin("POST", "/config", json={"auto_register": True, "not_found_code": False})
    assert result.outcome is poller.Outcome.FAILED and "Code 105" in result.reason
    rows = snapshot(engine)
    assert all(row["lease_id"] is None and row["poll_count"] == 0 for row in rows.values())


def test_the_limiters_last_word_comes_as_the_request_leaves(emulator, make_settings):
    """`before_send` runs once the connection is ready, right before the first byte; whatever
    it raises stops the request before anything reaches the provider."""
    settings = make_settings(esms_base_url=emulator.url)
    emulator.admin("POST", "/reset")
    client = EsmsClient(settings.esms_base_url, 2)
    account = settings.accounts["default"]
    seen = []

    def refuse():
        seen.append(len(emulator.admin("GET", "/requests")["requests"]))
        raise SlotRefused("late")

    try:
        with pytest.raises(SlotRefused):
            client.get_callback(account, "oa", ["a"], before_send=refuse)
        assert emulator.admin("GET", "/requests")["requests"] == []
        client.get_callback(account, "oa", ["a"], before_send=lambda: seen.append("sent"))
    finally:
        client.close()
    assert seen == [0, "sent"]
    assert len(emulator.admin("GET", "/requests")["requests"]) == 1


def test_a_connection_slower_than_the_late_tolerance_still_sends(poll, emulator, monkeypatch):
    """Reaching the provider takes longer than a slot may be late (a TLS handshake across the
    internet takes a few round trips): the connection made while that slot passed is kept, the
    poll takes the next slot holding it, and the request leaves on time over it. (Giving the
    connection up with the slot made every slot late: each new slot opened a new connection.)"""
    from httpcore._backends.sync import SyncBackend

    connect = SyncBackend.connect_tcp
    connects = []

    def slow_connect(self, *args, **kwargs):
        connects.append(time.monotonic())
        time.sleep(0.08)  # four times the late tolerance (19.8 ms at the defaults)
        return connect(self, *args, **kwargs)

    emulator.admin("POST", "/reset")
    monkeypatch.setattr(SyncBackend, "connect_tcp", slow_connect)
    started = time.monotonic()
    result = poll(["slow-connect-1", "slow-connect-2"])
    assert result.outcome is poller.Outcome.DONE, result
    assert len(connects) == 1
    assert time.monotonic() - started < 2
    monkeypatch.undo()
    assert len(emulator.admin("GET", "/requests")["requests"]) == 1


def test_a_poll_gets_its_request_ready_before_its_slot(poll, emulator, make_settings, monkeypatch):
    """Getting the request ready takes longer than a slot may be late (here a new connection
    takes 40 ms, twice the late tolerance; on a busy host it is other polls' CPU work): the poll
    wakes PREPARE_SECONDS before its slot, connects then, and sends on the slot itself, with
    no slot given up. (Woken on the slot, it sent 40 ms late and had to take another one.)"""
    from httpcore._backends.sync import SyncBackend

    from worker.metrics import SENDS_RETIMED
    from worker.ratelimit import _STATE_PREFIX

    assert poller.PREPARE_SECONDS > 0.04
    settings = make_settings(esms_base_url=emulator.url)
    account = settings.accounts["default"]
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    seconds, micros = client.time()
    slot = seconds + micros / 1e6 + 0.3
    client.hset(_STATE_PREFIX + account.limiter_key, "tat", str(int(slot * 1e6)))
    connect = SyncBackend.connect_tcp
    connects = []

    def slow_connect(self, *args, **kwargs):
        connects.append(time.time())
        time.sleep(0.04)
        return connect(self, *args, **kwargs)

    def retimed():
        return sum(
            SENDS_RETIMED.labels("default", reason)._value.get()
            for reason in ("late", "window_full", "rate_changed")
        )

    before = retimed()
    emulator.admin("POST", "/reset")
    monkeypatch.setattr(SyncBackend, "connect_tcp", slow_connect)
    result = poll(["ready-1", "ready-2"])
    monkeypatch.undo()
    assert result.outcome is poller.Outcome.DONE, result
    assert retimed() == before
    (request,) = emulator.admin("GET", "/requests")["requests"]
    assert len(connects) == 1 and connects[0] < slot
    # On the slot: not before it, and within the late tolerance after it.
    assert (
        slot - 0.002
        <= request["t"]
        <= slot + RatePolicy.from_settings(settings).late_tolerance_seconds
    )
    client.delete(_STATE_PREFIX + account.limiter_key)


def test_a_poll_whose_slot_lies_beyond_its_wait_gives_its_batch_back_unsent(
    poll, emulator, make_settings, engine
):
    """The budget's next slot is a minute away (other polls took them all): the poll sends
    nothing, at once, and its rows are due again."""
    from worker.ratelimit import _STATE_PREFIX

    settings = make_settings(esms_base_url=emulator.url)
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    seconds, micros = client.time()
    budget = _STATE_PREFIX + settings.accounts["default"].limiter_key
    client.hset(budget, "tat", str((seconds + 60) * 1_000_000 + micros))
    emulator.admin("POST", "/reset")
    started = time.monotonic()
    result = poll(["no-slot-1"])
    assert result.outcome is poller.Outcome.NO_SLOT
    assert time.monotonic() - started < 2
    assert emulator.admin("GET", "/requests")["requests"] == []
    with engine.begin() as conn:
        due = conn.execute(
            text("SELECT next_poll_at <= now(), lease_id FROM messages WHERE ref_id = 'no-slot-1'")
        ).one()
    assert tuple(due) == (True, None)
    client.delete(budget)
