"""Unit tests for worker.notfound: pool sizes from the evidence, and the budget they set."""

from __future__ import annotations

import math

import pytest
import redis

from worker.notfound import ClaimLimits, NotFoundTracker, pool_size, pools_per_tick


def test_full_batches_while_no_refid_was_ever_unknown():
    assert pool_size(0, 0, 200) == 200
    assert pool_size(100_000, 0.4, 200) == 200


@pytest.mark.parametrize(
    ("known", "unknown", "expected"),
    [
        (1900, 100, 19),  # 5 %: about (1 - p) / p, as Hwang's splitting would pool them
        (980, 20, 48),
        (0, 1, 13),  # one unknown RefId seen first: pools shrink, not to one RefId each
        (10, 90, 1),  # most are unknown: each goes alone
        (10_000, 1, 200),
    ],
)
def test_pools_shrink_with_the_share_of_unknown_refids(known, unknown, expected):
    assert pool_size(known, unknown, 200) == expected


def test_a_pool_is_found_clean_about_half_the_time():
    for share in (0.01, 0.05, 0.2):
        size = pool_size(1000 * (1 - share), 1000 * share, 10_000)
        assert 0.3 < (1 - share) ** size < 0.6


def test_pools_per_tick_pay_for_their_searches():
    assert pools_per_tick(4, 200) == 1  # never none: new RefIds must get polled
    assert pools_per_tick(20, 16) == 6  # 20 / (1 + 0.5 * 4)
    assert pools_per_tick(20, 1) == 20


def test_the_tracker_shares_evidence_in_redis(make_settings, redis_url):
    settings = make_settings(not_found_budget_share=0.5, schedule_tick_seconds=1)
    client = redis.Redis.from_url(redis_url)
    tracker, other_host = NotFoundTracker(client, settings), NotFoundTracker(client, settings)
    assert tracker.budget_per_tick == 9  # half of 19.2 requests a second
    assert other_host.limits("a") == ClaimLimits(200, None, 4)
    tracker.observe("a", known=190, unknown=10)
    limits = other_host.limits("a")
    assert limits.new_size == pool_size(190, 10, 200) < 200
    assert limits.new_limit == pools_per_tick(9, limits.new_size)
    assert other_host.limits("b").new_size == 200  # per account


def test_evidence_follows_what_the_sender_does_now(make_settings, redis_url):
    tracker = NotFoundTracker(redis.Redis.from_url(redis_url), make_settings())
    tracker.observe("a", known=100, unknown=100)
    for _ in range(40):  # then only RefIds the provider knows
        tracker.observe("a", known=1000)
    assert tracker.pool_size("a") == 200
    assert math.isfinite(tracker.pool_size("a"))
