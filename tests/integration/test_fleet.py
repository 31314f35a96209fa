"""worker.fleet on real Redis: workers with different accounts are reported once."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis

from worker import fleet


@pytest.fixture
def client(redis_url, monkeypatch):
    monkeypatch.setattr(fleet, "RECORD_EVERY_SECONDS", 0)
    monkeypatch.setattr(fleet, "_last_reported", None)
    return redis.Redis.from_url(redis_url)


def test_workers_that_differ_are_reported_once_and_agreement_once(client, caplog):
    caplog.set_level(logging.INFO, logger="worker.fleet")
    fleet.check(client, ["shop-a", "shop-b"], "host1:1")
    fleet.check(client, ["shop-a"], "host2:7")
    fleet.check(client, ["shop-a"], "host2:7")
    fleet.check(client, ["shop-a", "shop-b"], "host2:7")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "different accounts" in messages[0]
    assert "host1:1: shop-a, shop-b; host2:7: shop-a" in messages[0]
    assert "the same accounts again" in messages[1]


def test_workers_not_seen_for_five_minutes_are_forgotten(client, caplog):
    stale = json.dumps({"accounts": ["old"], "at": time.time() - 301})
    client.hset("esms:fleet:accounts", "gone:1", stale)
    fleet.check(client, ["shop-a"], "host1:1")
    assert client.hkeys("esms:fleet:accounts") == [b"host1:1"]
    assert not [r for r in caplog.records if "different accounts" in r.getMessage()]
