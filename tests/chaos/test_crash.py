"""A worker that dies: `kill -9` in the middle of its batches, and a graceful SIGTERM.

Real `celery worker` and `celery beat` processes poll the emulator; the fault is the real signal.
Afterwards every message must hold exactly the emulator's truth, nothing may stay leased, and the
provider must never have seen more than 20 requests per second or one RefId in two requests at
once.
"""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import text

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
from tests.processes import celery, terminate, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def held_batches(engine) -> list[dict]:
    with engine.begin() as conn:
        return [
            dict(row)
            for row in conn.execute(
                text("SELECT id, ref_ids, created_at, lease_expires_at FROM poll_batches")
            ).mappings()
        ]


def was_sent(batch: dict, log: list[dict]) -> bool:
    """The provider received this batch's request (sent after the batch was made)."""
    made = batch["created_at"].timestamp() - 0.5
    wanted = set(batch["ref_ids"])
    return any(entry["t"] >= made and set(entry["refids"]) == wanted for entry in log)


def test_kill_9_mid_batch_loses_nothing(engine, database_url, broker_url, children, emulator_with):
    # Slow answers keep every pool process inside a request most of the time.
    emulator = emulator_with("--latency-min-ms", "200", "--latency-max-ms", "500")
    rows = new_messages(1200, OAS)
    insert_messages(engine, emulator, rows)
    env = daemon_env(database_url, broker_url, emulator.url, **KEYS)
    worker = celery(children, "worker", env)
    celery(children, "beat", env)
    wait_for(lambda: len(request_log(emulator)) >= 40, timeout=60, message="40 requests")

    # The whole process group, as the OOM killer or a lost container would: pool processes die
    # inside their requests and writes.
    worker.stop(signal.SIGKILL)
    killed_at = time.time()
    log = request_log(emulator)
    lost = [batch for batch in held_batches(engine) if was_sent(batch, log)]
    assert lost, "no batch was in flight when the worker died"

    celery(children, "worker", env)
    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])

    log = request_log(emulator)
    for batch in lost:
        asked_again = [
            entry["t"]
            for entry in log
            if entry["t"] > killed_at and set(entry["refids"]) & set(batch["ref_ids"])
        ]
        # Polled again, and not before the dead worker's lease ran out.
        assert asked_again, f"batch {batch['id']} never polled again"
        assert min(asked_again) >= batch["lease_expires_at"].timestamp() - 0.05
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
    assert overlapping_requests(log) == []


def test_sigterm_finishes_or_releases_its_batches(
    engine, database_url, broker_url, children, emulator_with
):
    emulator = emulator_with("--latency-min-ms", "200", "--latency-max-ms", "500")
    rows = new_messages(1200, OAS)
    insert_messages(engine, emulator, rows)
    env = daemon_env(database_url, broker_url, emulator.url, **KEYS)
    worker = celery(children, "worker", env)
    celery(children, "beat", env)
    wait_for(lambda: len(request_log(emulator)) >= 30, timeout=60, message="30 requests")

    # Signal the moment a request has just arrived: the worker is inside it (answers take
    # at least 200 ms), so shutdown has a batch in flight to deal with.
    wait_for(
        lambda: request_log(emulator)[-1]["t"] > time.time() - 0.1,
        timeout=30, interval=0.01, message="a request just sent",
    )  # fmt: skip
    signalled_at = time.time()
    # As docker compose (stop_grace_period: 30s) and systemd do. Celery's prefork pool has
    # been seen, rarely, to hang in its own shutdown after every task had finished; the
    # watchdog (worker.shutdown) ends it once no task can still run, well within the 30 s.
    assert terminate(worker, grace=30), "celery worker did not exit within 30 s of SIGTERM"
    assert "Warm shutdown" in worker.log()
    assert worker.proc.returncode == 0
    log = request_log(emulator)
    assert any(entry["t"] <= signalled_at < entry["t"] + entry["delay_ms"] / 1000 for entry in log)
    # No worker runs now, so nothing moves: every batch still held was never sent. A batch
    # whose request went out was finished (or released) before the worker went away.
    assert [batch for batch in held_batches(engine) if was_sent(batch, log)] == []

    celery(children, "worker", env)
    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])
    log = request_log(emulator)
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
    assert overlapping_requests(log) == []
