"""The shared limiter on a real Redis: GCRA spacing across processes, the never-late and send-log
checks right before a request leaves, and AIMD after Code 160."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from worker import ratelimit
from worker.emulator.ratelimit import max_in_window
from worker.ratelimit import RateLimiter, RatePolicy
from worker.settings import Settings

pytestmark = pytest.mark.integration

POLICY = RatePolicy.from_settings(Settings(_env_file=None))


def _hammer(url: str, budget: str, policy: RatePolicy, count: int, out) -> None:
    limiter = RateLimiter(redis.Redis.from_url(url), policy)
    stamps = []
    while len(stamps) < count:
        if limiter.acquire(budget, 5) is not None:
            stamps.append(time.time())
    out.put((budget, stamps))


def run_processes(url, budgets, policy, per_process):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(url, b, policy, per_process, out)) for b in budgets]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(10)
    return results


def test_default_policy_arithmetic():
    # 20/s less 4 %: GCRA spaces requests 52.1 ms apart; a send may be 19.8 ms late; the send
    # log allows 20 sends in any 1.0208 s, which on-time or tolerably late sends never reach.
    assert POLICY.max_rate == pytest.approx(19.2)
    assert POLICY.window_limit == 20
    span_of_21 = 20 / POLICY.max_rate
    assert span_of_21 - POLICY.late_tolerance_seconds > POLICY.window_seconds > 1.0


def test_rate_holds_across_processes(redis_url):
    # Four processes share one budget: together they never exceed 20 in any one-second window,
    # and they are not slowed much below it either.
    results = run_processes(redis_url, ["shared"] * 4, POLICY, 15)
    stamps = sorted(t for _, result in results for t in result)
    assert max_in_window(stamps, 1.0) <= 20
    span = stamps[-1] - stamps[0]
    assert 59 / POLICY.max_rate * 0.95 <= span <= 59 / POLICY.max_rate * 1.25


def test_budgets_are_independent(redis_url):
    policy = RatePolicy(9.6, 1, 10, 1.02, 0.02)
    results = run_processes(redis_url, ["a", "a", "b", "b"], policy, 10)
    by_budget: dict[str, list[float]] = {"a": [], "b": []}
    for budget, stamps in results:
        by_budget[budget].extend(stamps)
    for stamps in by_budget.values():
        assert len(stamps) == 20 and max_in_window(sorted(stamps), 1.0) <= 10
    # Two budgets of 10/s run side by side: 40 grants in about 2 s, not 4 s.
    everything = sorted(by_budget["a"] + by_budget["b"])
    assert everything[-1] - everything[0] < 2.9


def test_no_slot_within_the_wait_gives_none(redis_url):
    limiter = RateLimiter(redis.Redis.from_url(redis_url), RatePolicy(2, 1, 2, 1.0, 0.02))
    assert limiter.acquire("p", 0) is not None
    started = time.monotonic()
    assert limiter.acquire("p", 0.2) is None
    assert time.monotonic() - started < 0.3


def test_a_late_slot_is_not_used(redis_url, monkeypatch):
    """A caller that wakes after its slot passed by more than the tolerance (the CPU scheduler
    ran something else) takes a new slot instead of bunching with the next requests."""
    limiter = RateLimiter(redis.Redis.from_url(redis_url), POLICY)
    first = limiter.acquire("late", 1)  # the next slot is now 52 ms away
    real_sleep = time.sleep
    naps = []

    def oversleep(seconds):
        naps.append(seconds)
        real_sleep(seconds + (0.08 if len(naps) == 1 else 0))

    monkeypatch.setattr(ratelimit.time, "sleep", oversleep)
    permit = limiter.acquire("late", 1)
    assert permit is not None and permit.retimed == ("late",)
    # The slot it missed went unused: the request left a fresh slot later, not 80 ms late.
    assert (permit.sent_at_us - first.sent_at_us) / 1e6 >= 0.052 + 0.08


def test_the_send_log_caps_any_window_whatever_the_spacing(redis_url):
    """Even a limiter spacing requests far too closely (another host misconfigured, a rate
    changed in between) cannot make more than `window_limit` sends leave in any window."""
    hasty = RatePolicy(
        max_rate=200, min_rate=1, window_limit=5, window_seconds=1.0, late_tolerance_seconds=0.5
    )
    limiter = RateLimiter(redis.Redis.from_url(redis_url), hasty)
    stamps, retimed = [], []
    for _ in range(12):
        permit = limiter.acquire("capped", 5)
        stamps.append(permit.sent_at_us / 1e6)
        retimed += permit.retimed
    assert max_in_window(stamps, 1.0) == 5
    assert "window_full" in retimed
    assert stamps[-1] - stamps[0] > 2.0


def test_code_160_cuts_the_rate_once_per_congestion_event(redis_url):
    client = redis.Redis.from_url(redis_url)
    limiter = RateLimiter(client, POLICY)
    first = limiter.acquire("busy", 1)
    second = limiter.acquire("busy", 1)
    cut = limiter.congestion("busy", first.sent_at_us)
    assert cut.cut and cut.old_rate == pytest.approx(19.2) and cut.new_rate == pytest.approx(13.44)
    # The second request left before the cut: its 160 is the same event.
    assert not limiter.congestion("busy", second.sent_at_us).cut
    # Everybody waits out the provider's window, then sends at the lower rate, climbing back.
    permit = limiter.acquire("busy", 5)
    assert permit.wait_seconds >= 0.9
    assert 13.44 <= permit.rate <= 13.44 + 2.5 * ratelimit.INCREASE_PER_SECOND


def test_repeated_congestion_stops_at_the_floor_and_recovers(redis_url, caplog):
    client = redis.Redis.from_url(redis_url)
    policy = RatePolicy(max_rate=19.2, min_rate=5, window_limit=20, window_seconds=1.02,
                        late_tolerance_seconds=0.02)  # fmt: skip
    limiter = RateLimiter(client, policy)
    far_later = int(time.time() * 1e6)
    rates = []
    for step in range(1, 8):
        # Each refusal comes from a request sent well after the previous cut: a new event.
        cut = limiter.congestion("floor", far_later + step * 10_000_000)
        assert cut.cut
        rates.append(cut.new_rate)
    assert rates[-1] == pytest.approx(5) and rates == sorted(rates, reverse=True)
    # Long after the last cut (its time moved back), the rate is full again, and exactly one
    # caller is told so.
    key = "esms:rate:floor"
    client.hset(key, mapping={"cut_at": int((time.time() - 3600) * 1e6), "tat": 0})
    permits = [limiter.acquire("floor", 2) for _ in range(3)]
    assert [p.rate for p in permits] == [pytest.approx(19.2)] * 3
    assert [p.recovered for p in permits] == [True, False, False]
