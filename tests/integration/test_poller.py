"""One poll against the real emulator: success, and every failure leaving the data alone."""

from __future__ import annotations

import logging

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.processes import start_emulator
from worker import poller, scheduler, store
from worker.cooloff import CoolOffs, account_scope
from worker.esms_client import EsmsClient
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
    # Keys accepted again: the cool-off ends with the first good answer.
    cooloffs.clear(account_scope("default"))
    result = poll(["c3"])
    assert result.outcome is poller.Outcome.DONE
    assert cooloffs.paused([account_scope("default")]) == set()


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
        cooloffs=cooloffs,
    )  # fmt: skip
    assert result.outcome is poller.Outcome.STALE
    assert emulator.admin("GET", "/requests")["requests"] == []
    # Released on the spot, not left claimed for the rest of its lease: due again now.
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == 0
        assert [b.ref_ids for b in store.claim_batches(conn, "default", 1, 200, 60)] == [("e1",)]


def test_code_105_splits_until_the_refid_not_found_is_alone(engine, make_settings, emulator):
    """A provider that answers Code 105 to a whole request for one RefId it cannot find: the
    other RefIds still get their data, the one not found backs off, and the search costs one
    request per halving, not one per RefId."""
    settings = make_settings(esms_base_url=emulator.url)
    emulator.admin("POST", "/reset")
    known = [f"k{i}" for i in range(7)]
    emulator.admin(
        "POST", "/messages", json={"messages": [{"ref_id": r, "oa_id": "oa"} for r in known]}
    )
    quiet = {name: 0 for name in (*FAULTS, "fault_code_rate", "fault_stale_rate")}
    emulator.admin(
        "POST", "/config", json={**quiet, "auto_register": False, "not_found_code": True}
    )
    client = EsmsClient(settings.esms_base_url, 2)
    limiter = RateLimiter(
        redis.Redis.from_url(settings.redis_url.get_secret_value()),
        RatePolicy.from_settings(settings),
    )
    cooloffs = CoolOffs(redis.Redis.from_url(settings.redis_url.get_secret_value()))
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO messages (ref_id, oa_id, next_poll_at) VALUES (:r, 'oa', now())"),
                [{"r": ref} for ref in [*known[:5], "unknown", *known[5:]]],
            )
            (batch,) = store.claim_batches(conn, "default", 1, 200, settings.lease_seconds)
        queue = [batch]
        outcomes = []
        while queue:
            outcomes.append(
                poller.poll_batch(
                    queue.pop(0).id, settings=settings, engine=engine, client=client,
                    limiter=limiter, cooloffs=cooloffs, enqueue=queue.extend,
                ).outcome
            )  # fmt: skip
    finally:
        emulator.admin("POST", "/config", json={"auto_register": True, "not_found_code": False})
        client.close()
    requests = emulator.admin("GET", "/requests")["requests"]
    # 8 RefIds: the whole batch, then 4+4, 2+2, 1+1; each 105 answer halves the search.
    assert [len(entry["refids"]) for entry in requests] == [8, 4, 4, 2, 2, 1, 1]
    assert [entry["code"] for entry in requests].count(105) == 4
    assert outcomes.count(poller.Outcome.DONE) == 3
    rows = snapshot(engine)
    truth = emulator.admin("GET", "/truth")["messages"]
    assert {ref: rows[ref]["state"] for ref in known} == {
        ref: truth[ref]["final_state"] for ref in known
    }
    lone = rows["unknown"]
    assert (lone["state"], lone["poll_count"], lone["lease_id"]) == ("pending", 1, None)
    assert (lone["next_poll_at"] - lone["last_polled_at"]).total_seconds() == pytest.approx(30, 1)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM poll_batches")).scalar() == 0


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
