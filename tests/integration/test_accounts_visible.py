"""Adding or renaming an account is visible: the gauge of pending rows no request can carry, set
by the scheduler's periodic check, and the one line a worker logs with its accounts' names."""

from __future__ import annotations

import json
import math

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from tests.processes import celery, child_env, wait_for
from worker import scheduler

pytestmark = pytest.mark.integration


def unpollable(account: str, reason: str) -> float | None:
    return REGISTRY.get_sample_value(
        "esms_unpollable_pending", {"account": account, "reason": reason}
    )


def tick(engine, settings, monkeypatch) -> None:
    # The check runs every few minutes per process: make this tick's the due one.
    monkeypatch.setattr(scheduler, "_last_unpollable_check", -math.inf)
    scheduler.schedule_tick(engine, settings, lambda batches: None)


def test_gauge_counts_rows_of_unknown_accounts_and_without_oa(engine, make_settings, monkeypatch):
    monkeypatch.setattr(scheduler, "_reported_unpollable", set())
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, account, oa_id) VALUES (:r, :a, :o)"),
            [
                *({"r": f"old-{i}", "a": "shop-old", "o": "oa"} for i in range(3)),
                {"r": "blank-1", "a": "default", "o": ""},
                {"r": "ok-1", "a": "default", "o": "oa"},
            ],
        )
    settings = make_settings()
    tick(engine, settings, monkeypatch)
    assert unpollable("shop-old", "account_not_configured") == 3
    assert unpollable("default", "empty_oa_id") == 1
    assert unpollable("default", "account_not_configured") is None

    # The account is configured under that name (a rename finished): the series goes to 0.
    renamed = make_settings(
        esms_accounts={"shop-old": {"api_key": "old-key-8Hq", "secret_key": "old-secret-3Zp"}}
    )
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM messages WHERE ref_id = 'blank-1'"))
    tick(engine, renamed, monkeypatch)
    assert unpollable("shop-old", "account_not_configured") == 0
    assert unpollable("default", "empty_oa_id") == 0


@pytest.mark.e2e
def test_a_worker_logs_its_account_names_once_never_a_key(database_url, redis_url, children):
    env = child_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        ESMS_API_KEY="names-key-Rt5",
        ESMS_SECRET_KEY="names-secret-Lm2",
        ESMS_ACCOUNTS=json.dumps({"shopb": {"api_key": "b-key-Qw8", "secret_key": "b-sec-Vx4"}}),
        ESMS_BASE_URL="http://127.0.0.1:9",  # nothing is due: never called
    )
    worker = celery(children, "worker", env)
    wait_for(lambda: "ready." in worker.log(), timeout=60, message="the worker is ready")
    log = worker.log()
    assert log.count("accounts configured: default, shopb") == 1
    for secret in ("names-key-Rt5", "names-secret-Lm2", "b-key-Qw8", "b-sec-Vx4"):
        assert secret not in log
