"""A rate limiter shared by every worker process on every host: GCRA in Redis, on Redis's clock.

The Generic Cell Rate Algorithm keeps one number per budget, the theoretical arrival time (TAT) of
the next allowed request. `reserve` runs one Lua script that reads Redis's own clock, takes the
slot `max(TAT, now)`, moves TAT one emission interval further and answers how long the caller must
wait for its slot. With no burst allowance, requests leave at least one interval apart, so any
one-second window holds at most `rate` of them whatever the number of callers; the settings keep a
safety margin below the provider's limit for the jitter between leaving here and arriving there.
Reservation (rather than "try again") means one Redis round trip per request and first come, first
served. `penalize` pushes TAT into the future after the provider says we were too fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

_KEY_PREFIX = "esms:gcra:"

# KEYS[1] budget key; ARGV: interval_us, max_wait_us. Returns {granted, wait_us}.
_RESERVE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - now
if wait > max_wait then return {0, wait} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, wait}
"""

# KEYS[1] budget key; ARGV: penalty_us. Nobody gets a slot before now + penalty.
_PENALIZE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local floor = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < floor then tat = floor end
redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
return tat - now
"""


@dataclass(frozen=True)
class Reservation:
    granted: bool
    wait_seconds: float


class RateLimiter:
    """Per-budget GCRA at `rate_per_second`; budgets are named by the caller (one per ApiKey)."""

    def __init__(self, client: redis.Redis, rate_per_second: float) -> None:
        self._redis = client
        self._interval_us = int(round(1_000_000 / rate_per_second))
        self._reserve = client.register_script(_RESERVE)
        self._penalize = client.register_script(_PENALIZE)

    def reserve(self, budget: str, max_wait_seconds: float) -> Reservation:
        """Take the next slot if it comes within `max_wait_seconds`; else take nothing."""
        granted, wait_us = self._reserve(
            keys=[_KEY_PREFIX + budget], args=[self._interval_us, int(max_wait_seconds * 1e6)]
        )
        return Reservation(bool(granted), wait_us / 1e6)

    def acquire(self, budget: str, max_wait_seconds: float) -> Reservation:
        """`reserve`, then sleep until the slot; the caller sends right after this returns."""
        reservation = self.reserve(budget, max_wait_seconds)
        if reservation.granted and reservation.wait_seconds > 0:
            time.sleep(reservation.wait_seconds)
        return reservation

    def ping(self) -> None:
        self._redis.ping()

    def penalize(self, budget: str, seconds: float) -> None:
        self._penalize(keys=[_KEY_PREFIX + budget], args=[int(seconds * 1e6)])
