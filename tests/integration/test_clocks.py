"""worker.clocks against real Redis and Postgres: the tick gate, and the skew it measures."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from worker import clocks, metrics


def test_the_gate_lets_one_tick_through_per_half_interval(redis_url):
    gate = clocks.TickGate(redis.Redis.from_url(redis_url), tick_seconds=0.4)
    assert gate.open()
    assert [gate.open() for _ in range(20)] == [False] * 20  # a pile of old ticks: skipped
    time.sleep(0.25)
    assert gate.open()


def test_skew_is_measured_against_the_shared_clocks(redis_url, engine):
    clocks.TickGate(redis.Redis.from_url(redis_url), 0.5).open()
    with engine.connect() as conn:
        skew = clocks.postgres_skew(conn)
    assert abs(skew) < 0.5  # this machine's processes share one clock
    for reference in ("redis", "postgres"):
        assert abs(metrics.CLOCK_SKEW_SECONDS.labels(reference)._value.get()) < 0.5


def test_a_large_skew_is_logged_once_and_its_end_once(caplog):
    caplog.set_level(logging.INFO, logger="worker.clocks")
    now = time.time()
    for _ in range(3):
        assert clocks.observe_skew("test", now - 5, now, now) == pytest.approx(5)
    clocks.observe_skew("test", now, now, now)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "+5.0s off test's: run NTP" in messages[0]
    assert "agrees with test's again" in messages[1]
