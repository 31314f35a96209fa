"""Operator mistakes and scale-out: two beats at once, and workers on "two hosts".

Two beats both queue a scheduling tick every second; the scheduler's advisory lock and
`FOR UPDATE SKIP LOCKED` claim must keep each RefId in at most one request at a time. Two workers
started with separate environments (own node name, pool size and timeout, as two hosts would
have) share one Postgres and one Redis; the Redis limiter must hold the rate per ApiKey in total.
"""

from __future__ import annotations

import re
import shutil

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
)
from tests.chaos.conftest import KEYS, OAS
from tests.processes import BIN, celery, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def polls_logged(log_text: str) -> int:
    return len(re.findall(r"account=default oa=\d+ size=\d+ duration=", log_text))


def test_two_beats_never_overlap_a_refid(engine, database_url, broker_url, children, emulator_with):
    emulator = emulator_with("--latency-min-ms", "50", "--latency-max-ms", "300")
    rows = new_messages(1500, OAS)
    insert_messages(engine, emulator, rows)
    env = daemon_env(database_url, broker_url, emulator.url, **KEYS)
    celery(children, "worker", env)
    beats = [celery(children, "beat", env), celery(children, "beat", env)]

    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])
    for beat in beats:
        assert beat.log().count("esms.schedule sent") >= 5, "a beat did not tick"
    log = request_log(emulator)
    assert overlapping_requests(log) == []
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT


def test_workers_on_two_hosts_share_the_rate(
    engine, database_url, broker_url, children, emulator_with
):
    emulator = emulator_with("--latency-min-ms", "50", "--latency-max-ms", "300")
    rows = new_messages(2000, OAS)
    insert_messages(engine, emulator, rows)
    host_a = daemon_env(database_url, broker_url, emulator.url, **KEYS)
    host_b = daemon_env(
        database_url, broker_url, emulator.url, ESMS_TIMEOUT_SECONDS="3",
        **KEYS,
    )  # fmt: skip
    workers = [
        celery(children, "worker", host_a, "-n", "poller@host-a"),
        celery(children, "worker", host_b, "-n", "poller@host-b"),
    ]
    celery(children, "beat", host_a)

    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])
    for worker in workers:
        assert polls_logged(worker.log()) >= 10, f"{worker.name} did not poll"
    log = request_log(emulator)
    # Together they pushed against the limit (the backlog needs 100 requests a round), and
    # together they stayed under it.
    assert RATE_LIMIT - 5 <= max(max_requests_per_second(log).values()) <= RATE_LIMIT
    assert overlapping_requests(log) == []


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (apt: faketime)")
def test_a_worker_whose_clock_runs_ahead_still_polls(
    engine, database_url, broker_url, children, emulator_with
):
    """A worker 5 s ahead of beat's host (libfaketime): no tick carries an absolute expiry, so it
    runs them all; every message ends true, and the worker reports the skew it sees."""
    emulator = emulator_with("--latency-min-ms", "20", "--latency-max-ms", "80")
    rows = new_messages(1000, OAS)
    insert_messages(engine, emulator, rows)
    env = daemon_env(database_url, broker_url, emulator.url, **KEYS)
    argv = ["faketime", "-f", "+5s", str(BIN / "celery"), "-A", "worker", "worker", "-l", "INFO"]
    worker = children.spawn("worker-ahead", argv, env)
    celery(children, "beat", env)

    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])
    skews = re.findall(r"clock is ([+-][\d.]+)s off (postgres|redis)'s", worker.log())
    assert {reference for _, reference in skews} == {"postgres", "redis"}
    assert all(4.5 < float(skew) < 5.5 for skew, _ in skews)
