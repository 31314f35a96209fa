"""Postgres, then Redis, behind a network path that dies silently for longer than the lease.

Unlike a stopped server (tests/chaos/test_outages.py), a dead path answers nothing: the daemon's
connections stay open, what it sends goes nowhere, and no error ever comes back unless the
daemon has a deadline of its own (issue 14, "Deadlines everywhere"). The worker and beat reach
the server through a `BlackholeProxy` (tests/blackhole.py); the test's own checks go to the
server directly. The blackhole keeps the server's side of each connection open too (a partition,
not a crash): what ends the server's half-done sessions is the daemon's own server-side timers.

After `resume()` the connections that lived through the blackhole stay dead, and only new ones
work: the worker and beat must notice, drop them and reconnect by themselves. The tests then
require what every chaos test does (tests/chaos/audit.py), plus: new messages inserted after
the blackhole are polled (the daemon is not stuck), and the processes are never restarted.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy.engine import make_url

from tests.blackhole import BlackholeProxy
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
from tests.processes import celery, start_private_redis, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# Longer than LEASE_SECONDS (20, tests/chaos/audit.py): every lease held when the path died has
# run out before it comes back, and so has any deadline the worker sets for one task.
BLACKHOLE_SECONDS = 25
# From the end of the blackhole until every message is final. Generous: a session the server
# still holds open for the dead connection keeps its locks until the daemon's server-side
# timeout (idle_in_transaction_session_timeout) ends it.
RECOVERY_SECONDS = 60
MESSAGES, MESSAGES_AFTER = 1500, 300


@pytest.fixture
def proxy_to():
    """Start a blackhole proxy to host:port; every proxy is closed after the test."""
    proxies: list[BlackholeProxy] = []

    def start(host: str, port: int) -> BlackholeProxy:
        proxies.append(BlackholeProxy(host, port))
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.close()


def first_request_after(emulator, moment: float) -> float | None:
    """Seconds from `moment` until the emulator's next request, None if none came."""
    later = [entry["t"] for entry in request_log(emulator) if entry["t"] > moment]
    return min(later) - moment if later else None


def blackhole_and_recover(proxy, engine, emulator, worker, beat, before) -> None:
    """Blackhole the proxy mid-polling, resume, insert more messages, check everything."""
    wait_for(lambda: len(request_log(emulator)) >= 30, timeout=60, message="30 requests")
    proxy.blackhole()
    time.sleep(BLACKHOLE_SECONDS)
    proxy.resume()
    resumed_at = time.time()
    # New work after the blackhole: only a daemon that found its way back polls it.
    after = new_messages(MESSAGES_AFTER, OAS)
    insert_messages(engine, emulator, after)

    try:
        wait_for(
            lambda: count_pending(engine) == 0,
            timeout=RECOVERY_SECONDS,
            message=f"every message final within {RECOVERY_SECONDS}s of the blackhole's end",
        )
    except AssertionError as stuck:
        raise AssertionError(
            f"{stuck}: {count_pending(engine)} pending; polling resumed after "
            f"{first_request_after(emulator, resumed_at)} s; worker alive "
            f"{worker.proc.poll() is None}, beat alive {beat.proc.poll() is None} "
            f"(pids {worker.proc.pid}, {beat.proc.pid})"
        ) from None
    wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=30, message="no lease left")
    # Never restarted: the same processes found their way back.
    assert worker.proc.poll() is None and beat.proc.poll() is None
    assert "Unrecoverable error" not in worker.log()
    assert_every_message_true(engine, emulator, [row["ref_id"] for row in before + after])
    log = request_log(emulator)
    # The second wave alone is 15 batches of 20.
    assert sum(entry["t"] > resumed_at for entry in log) >= MESSAGES_AFTER // 20
    assert max(max_requests_per_second(log).values()) <= RATE_LIMIT
    assert overlapping_requests(log) == []


def test_postgres_blackholed_longer_than_the_lease(
    engine, database_url, broker_url, children, emulator_with, proxy_to
):
    emulator = emulator_with("--latency-min-ms", "50", "--latency-max-ms", "200")
    direct = make_url(database_url)
    proxy = proxy_to(direct.host, direct.port)
    through_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    before = new_messages(MESSAGES, OAS)
    insert_messages(engine, emulator, before)
    env = daemon_env(through_proxy, broker_url, emulator.url, **KEYS)
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)
    blackhole_and_recover(proxy, engine, emulator, worker, beat, before)


def test_redis_blackholed_longer_than_the_lease(
    engine, database_url, children, emulator_with, proxy_to
):
    emulator = emulator_with("--latency-min-ms", "50", "--latency-max-ms", "200")
    redis_server = start_private_redis(children)
    proxy = proxy_to("127.0.0.1", redis_server.port)
    before = new_messages(MESSAGES, OAS)
    insert_messages(engine, emulator, before)
    # Broker, rate limiter, cool-offs and tick gate all go through the proxy.
    env = daemon_env(database_url, f"redis://127.0.0.1:{proxy.port}/0", emulator.url, **KEYS)
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)
    blackhole_and_recover(proxy, engine, emulator, worker, beat, before)
