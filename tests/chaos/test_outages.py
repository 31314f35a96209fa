"""Redis or Postgres stopped for a few seconds and started again under a running daemon.

Both servers are private to the test (a `redis-server` child without persistence, a throwaway
Postgres cluster), so stopping them cannot disturb anything else on the machine. The worker and
beat processes are never restarted: they must find their way back by themselves.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine

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
    task_failures,
)
from tests.chaos.conftest import KEYS, OAS
from tests.processes import celery, start_private_postgres, start_private_redis, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

OUTAGE_SECONDS = 5


def test_redis_restarted_empty(engine, database_url, children, emulator_with):
    # A worker with spare processes waits in BRPOP while its running polls hold unacknowledged
    # messages: the state in which losing the broker used to stop the worker for good.
    emulator = emulator_with(
        "--latency-min-ms", "200", "--latency-max-ms", "500",
        "--final-after-min-s", "3", "--final-after-max-s", "8",
    )  # fmt: skip
    redis_server = start_private_redis(children)
    before = new_messages(200, OAS)
    insert_messages(engine, emulator, before)
    env = daemon_env(database_url, redis_server.url(), emulator.url, **KEYS)
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)
    wait_for(lambda: len(request_log(emulator)) >= 5, timeout=60, message="5 requests")
    wait_for(
        lambda: request_log(emulator)[-1]["t"] > time.time() - 0.1,
        timeout=30, interval=0.01, message="a request just sent",
    )  # fmt: skip

    redis_server.stop()
    time.sleep(OUTAGE_SECONDS)
    redis_server.start()
    restarted_at = time.time()
    # New work after the restart: it must be polled without anyone touching the daemon.
    after = new_messages(1000, OAS)
    insert_messages(engine, emulator, after)

    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    # Both reconnected on their own; the tasks that met the outage failed with its error alone.
    assert worker.proc.poll() is None and beat.proc.poll() is None
    assert "Unrecoverable error" not in worker.log()
    assert worker.log().count("Connected to") >= 2
    # Redis's ConnectionError, or kombu's OperationalError from a tick that could not queue
    # the batches it had leased (they come back when the lease runs out).
    failures = set(task_failures(worker.log()))
    assert failures <= {"network:ConnectionError", "ConnectionError", "OperationalError"}
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in before + after])
    log = request_log(emulator)
    resumed = [entry for entry in log if entry["t"] > restarted_at]
    assert len(resumed) >= 50  # the second wave alone is 50 batches of 20
    # The limiter's state went with Redis; the rate must hold anyway.
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
    assert overlapping_requests(log) == []


@pytest.fixture
def private_postgres():
    server = start_private_postgres()
    engine = create_engine(server.url, pool_pre_ping=True)
    yield server, engine
    engine.dispose()
    server.destroy()


def test_postgres_restarted(private_postgres, broker_url, children, emulator_with):
    server, engine = private_postgres
    emulator = emulator_with("--latency-min-ms", "50", "--latency-max-ms", "200")
    rows = new_messages(1500, OAS)
    insert_messages(engine, emulator, rows)
    env = daemon_env(server.url, broker_url, emulator.url, **KEYS)
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)
    wait_for(lambda: len(request_log(emulator)) >= 30, timeout=60, message="30 requests")

    server.stop()
    time.sleep(OUTAGE_SECONDS)
    server.start()

    wait_for(lambda: count_pending(engine) == 0, timeout=120, message="every message final")
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease left")
    assert worker.proc.poll() is None and beat.proc.poll() is None
    assert set(task_failures(worker.log())) <= {"OperationalError"}
    # Final only with the provider's final word, exactly; nothing left claimed.
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in rows])
    log = request_log(emulator)
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
    assert overlapping_requests(log) == []
