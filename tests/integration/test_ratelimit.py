"""The shared GCRA limiter on a real Redis, used by several processes at once."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from worker.ratelimit import RateLimiter
from worker.settings import Settings

pytestmark = pytest.mark.integration


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _hammer(url: str, budget: str, rate: float, count: int, out) -> None:
    limiter = RateLimiter(redis.Redis.from_url(url), rate)
    stamps = []
    while len(stamps) < count:
        if limiter.acquire(budget, 5).granted:
            stamps.append(time.time())
    out.put((budget, stamps))


def run_processes(url, budgets, rate, per_process):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(url, b, rate, per_process, out)) for b in budgets]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(10)
    return results


def test_rate_holds_across_processes(redis_url):
    # Four processes share one budget at the rate the daemon uses for a 20/s provider limit
    # (the configured safety margin included): together they never exceed 20 in any one-second
    # window, and they are not slowed much below it either.
    rate = Settings(_env_file=None).effective_rate_per_second
    results = run_processes(redis_url, ["shared"] * 4, rate, 15)
    stamps = [t for _, result in results for t in result]
    assert max_in_window(stamps) <= 20
    span = max(stamps) - min(stamps)
    assert 59 / rate * 0.95 <= span <= 59 / rate * 1.2


def test_budgets_are_independent(redis_url):
    results = run_processes(redis_url, ["a", "a", "b", "b"], 9.6, 10)
    by_budget: dict[str, list[float]] = {"a": [], "b": []}
    for budget, stamps in results:
        by_budget[budget].extend(stamps)
    for stamps in by_budget.values():
        assert len(stamps) == 20 and max_in_window(stamps) <= 10
    # Two budgets of 10/s run side by side: 40 grants in about 2 s, not 4 s.
    everything = sorted(by_budget["a"] + by_budget["b"])
    assert everything[-1] - everything[0] < 2.9


def test_reserve_refuses_beyond_max_wait_and_penalty_pushes_back(redis_url):
    limiter = RateLimiter(redis.Redis.from_url(redis_url), 10)
    assert limiter.reserve("p", 0).granted
    second = limiter.reserve("p", 0)
    assert not second.granted and 0.05 < second.wait_seconds <= 0.1
    limiter.penalize("p", 2.0)
    after = limiter.reserve("p", 10)
    assert after.granted and 1.9 <= after.wait_seconds <= 2.0
