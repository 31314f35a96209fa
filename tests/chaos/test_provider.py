"""A provider that misbehaves, and a provider that refuses one account.

The emulator's fault knobs are switched on at run time (`POST /_emulator/config`): server errors,
answers slower than the client timeout, truncated bodies and HTML pages, `Data_callback` null or
missing, Codes 99/105/160, stale and duplicate items, numbers as strings. Every message must still
end exactly true, and each failed request must leave one clear line in the worker log and no
traceback. A refused account (Code 101) must cool off without slowing the other account down.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest

from tests.chaos.audit import (
    RATE_LIMIT,
    assert_every_message_true,
    count_pending,
    daemon_env,
    insert_messages,
    leftover_leases,
    max_requests_per_second,
    new_messages,
    overlapping_requests,
    request_log,
    stored_rows,
)
from tests.chaos.conftest import KEYS, OAS
from tests.processes import celery, terminate, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FAULTS = {
    "fault_5xx_rate": 0.08,
    "fault_slow_rate": 0.08,
    "slow_seconds": 3.0,  # beyond ESMS_TIMEOUT_SECONDS=2
    "fault_broken_body_rate": 0.12,
    "fault_code_rate": 0.09,  # a third of them Code 160, which pauses the account 1 s
    "fault_codes": [99, 105, 160],
    "fault_stale_rate": 0.2,
    "fault_duplicate_rate": 0.3,
    "numbers_as_strings_rate": 0.3,
}
FAILED_LINE = re.compile(
    r"account=(\S+) oa=(\S+) size=(\d+) duration=[\d.]+s: request failed: (.+)$", re.MULTILINE
)


def failure_kind(entry: dict) -> str | None:
    """How the provider failed this request, as the worker should name it; None: it answered."""
    if entry["http_status"] >= 500:
        return "5xx"
    if entry["fault"] == "slow":
        return "timeout"
    if entry["code"] is None:
        return "not JSON"
    if entry["code"] != 100:
        return f"Code {entry['code']}"
    return None


def reason_kind(reason: str) -> str:
    if reason.startswith("HTTP 5"):
        return "5xx"
    if reason.startswith(("timeout", "no whole answer within")):  # read timeout, or the deadline
        return "timeout"
    if "not JSON" in reason:
        return "not JSON"
    match = re.match(r"Code (\d+)", reason)
    return f"Code {match.group(1)}" if match else reason


def test_misbehaving_provider(engine, database_url, broker_url, children, emulator_with):
    emulator = emulator_with("--latency-min-ms", "20", "--latency-max-ms", "150")
    emulator.admin("POST", "/config", json=FAULTS)
    rows = new_messages(400, OAS)
    insert_messages(engine, emulator, rows)
    # Batches of 5 make a few hundred requests, so every kind of fault comes up. About half the
    # polls of a final message fail or show an older status: poll it every second.
    env = daemon_env(
        database_url, broker_url, emulator.url, ESMS_BATCH_SIZE="5", POLL_MAX_INTERVAL_SECONDS="1",
        **KEYS,
    )  # fmt: skip
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)

    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])

    log = request_log(emulator)
    faults = Counter(entry["fault"] for entry in log)
    assert faults["5xx"] and faults["slow"] and faults["broken_body"] and faults["code"]
    assert any("stale" in (entry["fault"] or "") for entry in log)
    assert any("duplicate" in (entry["fault"] or "") for entry in log)
    assert any(entry["numbers_as_strings"] for entry in log)
    # One line per failed request, naming what went wrong, and nothing else failed.
    expected = Counter(kind for kind in map(failure_kind, log) if kind)
    logged = worker.log()
    lines = FAILED_LINE.findall(logged)
    assert Counter(reason_kind(reason) for *_, reason in lines) == expected
    assert all(account == "default" and int(size) >= 1 for account, _, size, _ in lines)
    assert "Traceback" not in logged and "Traceback" not in beat.log()
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
    # A RefId goes out again only after the client gave up on its last request (a slow answer
    # is still "in flight" at the provider after the 2 s timeout, which is no overlap of ours).
    assert overlapping_requests(log, timeout=2.0) == []


GOOD = ("good-key", "good-secret")
BAD = ("shopb-key", "shopb-secret")


def accounts_env(shopb_secret: str) -> str:
    return json.dumps(
        {
            "shopa": {"api_key": GOOD[0], "secret_key": GOOD[1]},
            "shopb": {"api_key": BAD[0], "secret_key": shopb_secret},
        }
    )


def test_refused_account_cools_off_alone(engine, database_url, broker_url, children, emulator_with):
    emulator = emulator_with(
        "--latency-min-ms", "50", "--latency-max-ms", "200",
        accounts=(":".join(GOOD), ":".join(BAD)),
    )  # fmt: skip
    good = new_messages(1500, OAS, account="shopa", api_key=GOOD[0])
    bad = new_messages(400, OAS, account="shopb", api_key=BAD[0])
    insert_messages(engine, emulator, good + bad)
    env = daemon_env(
        database_url, broker_url, emulator.url, ESMS_ACCOUNTS=accounts_env("wrong-secret")
    )
    worker = celery(children, "worker", env)
    celery(children, "beat", env)

    wait_for(lambda: count_pending(engine, "shopa") == 0, timeout=90, message="shopa final")
    refused = wait_for(
        lambda: [entry for entry in request_log(emulator) if entry["api_key"] == BAD[0]],
        timeout=30, message="a refused request",
    )  # fmt: skip
    first_refusal = refused[0]["t"]
    errors = [line for line in worker.log().splitlines() if "account:shopb refused" in line]
    assert len(errors) == 1 and "Code 101" in errors[0], errors
    assert all(
        row["send_status"] is None and row["state"] == "pending"
        for row in stored_rows(engine).values()
        if row["account"] == "shopb"
    )

    # The operator fixes the keys and restarts the worker. The cool-off (30 s, in Redis) still
    # runs: nothing of shopb is polled before it ends, then polling resumes by itself.
    terminate(worker, grace=30)
    fixed = daemon_env(database_url, broker_url, emulator.url, ESMS_ACCOUNTS=accounts_env(BAD[1]))
    celery(children, "worker", fixed)
    time.sleep(max(0.0, first_refusal + 20 - time.time()))
    log = request_log(emulator)
    refused = [entry for entry in log if entry["api_key"] == BAD[0]]
    # Not hammered: the batches queued before the first refusal (one second of rate at
    # SCHEDULE_LOOKAHEAD_SECONDS=1) went out and were refused, then nothing for 20 s.
    assert len(refused) <= 20
    assert all(entry["code"] == 101 and entry["t"] < first_refusal + 3 for entry in refused)
    # The other account ran at the full rate meanwhile.
    assert max_requests_per_second(log)[GOOD[0]] >= RATE_LIMIT - 5

    wait_for(lambda: count_pending(engine) == 0, timeout=90, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in good + bad])
    resumed = [e["t"] for e in request_log(emulator) if e["api_key"] == BAD[0] and e["code"] == 100]
    assert min(resumed) >= first_refusal + 25  # not before the cool-off ended
    log = request_log(emulator)
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
