"""The per-ApiKey rate limit, shared by every worker on every host: GCRA, a send log, AIMD.

Three Lua scripts, all on Redis's clock, so the hosts' own clocks never matter:

- `reserve` is GCRA (virtual scheduling): one number per budget, the theoretical arrival time
  (TAT) of the next request; a caller takes the slot `max(TAT, now)` and moves TAT one interval
  on. Slots are handed out at most a second ahead: a caller further back in the line sleeps
  and asks again, so a cut of the rate reaches the whole line within a second.
- `confirm` runs right before the request leaves. It refuses a slot that passed more than
  `late_tolerance` ago (a caller the CPU scheduler woke late would bunch with the next ones) or
  that was handed out before the last change of rate, and it keeps a moving-window log of the
  actual send times: a request that would make `window_limit` + 1 sends inside `window` does not
  leave. A refused caller takes a new slot. Whatever the hosts, pools or CPU load, no more than
  `window_limit` requests leave inside any `window`.
- `congestion` is called when the provider answers Code 160 ("too fast"): the budget's rate drops
  at once to `DECREASE` × the rate in force (not below the floor), sending pauses for one provider
  window, and the rate creeps back by `INCREASE_PER_SECOND` every second, up to a ceiling just
  under the rate that was refused, which itself rises again only after `PROBE_AFTER_SECONDS`
  without a refusal (additive increase, multiplicative decrease, as the AWS SDKs' adaptive retry
  mode does). One refusal per provider window counts: the 160s of requests that left before the
  cut, or while the provider's window still held the excess, are the same congestion event.

`RatePolicy.from_settings` turns the provider's limit and our safety margin into these numbers.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from worker.settings import Settings

_STATE_PREFIX = "esms:rate:"
_SENT_PREFIX = "esms:sent:"
# State without traffic for this long is dropped (a budget at its full rate needs none).
_STATE_TTL_MS = 6 * 3600 * 1000

# AIMD after Code 160. After a cut the rate climbs back INCREASE_PER_SECOND req/s every second,
# up to CEILING × the rate the provider refused; the ceiling rises by PROBE_PER_SECOND every
# second once PROBE_AFTER_SECONDS passed without a refusal.
DECREASE = 0.7
INCREASE_PER_SECOND = 2.0
CEILING = 0.95
PROBE_AFTER_SECONDS = 300.0
PROBE_PER_SECOND = 0.02

# Lua shared by the scripts: the current rate of a budget from its state `s` (HMGET of tat,
# epoch, cut_rate, cut_at, ceiling) at `now` (`max_rate` from ARGV, the AIMD constants literal),
# Redis's clock, and number formatting.
_HELPERS = f"""
local function current_rate(s, now, max_rate)
  if not s[3] then return max_rate end
  local since = (now - tonumber(s[4])) / 1e6
  local ceiling = tonumber(s[5]) + {PROBE_PER_SECOND} * math.max(0, since - {PROBE_AFTER_SECONDS})
  return math.min(max_rate, ceiling, tonumber(s[3]) + {INCREASE_PER_SECOND} * since)
end
-- Redis turns Lua numbers into strings with 14 significant digits: too few for a microsecond
-- timestamp, so stored numbers are formatted here.
local function int(x) return string.format('%d', math.floor(x)) end
local function real(x) return string.format('%.6f', x) end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- Now, the budget's state (KEYS[1]) and the rate in force.
local function load_state(max_rate)
  local now = now_us()
  local s = redis.call('HMGET', KEYS[1], 'tat', 'epoch', 'cut_rate', 'cut_at', 'ceiling')
  return now, s, current_rate(s, now, max_rate)
end
"""

# KEYS[1] state; ARGV: max_rate, max_wait_us. Returns {granted, wait_us, slot_us, epoch,
# rate_millis, recovered}. `recovered` is 1 for the one caller that finds the rate back to full.
_RESERVE = (
    _HELPERS
    + f"""
local max_rate = tonumber(ARGV[1])
local now, s, rate = load_state(max_rate)
local recovered = 0
if s[3] and rate >= max_rate then
  redis.call('HDEL', KEYS[1], 'cut_rate', 'cut_at', 'ceiling')
  recovered = 1
end
local epoch = tonumber(s[2] or 0)
local tat = tonumber(s[1] or now)
if tat < now then tat = now end
local wait = tat - now
if wait > tonumber(ARGV[2]) then
  return {{0, math.floor(wait), 0, epoch, math.floor(rate * 1000), recovered}}
end
redis.call('HSET', KEYS[1], 'tat', int(tat + 1000000 / rate))
redis.call('PEXPIRE', KEYS[1], {_STATE_TTL_MS})
return {{1, math.floor(wait), math.floor(tat), epoch, math.floor(rate * 1000), recovered}}
"""
)

# KEYS[1] state, KEYS[2] send log, KEYS[3..] keys whose existence blocks the send; ARGV:
# slot_us, epoch, late_tolerance_us, window_us, window_limit, member. Returns {result, now_us,
# blocked_ms}: 1 sent, 2 rate changed, 3 late, 4 window full, 5 blocked.
_CONFIRM = (
    _HELPERS
    + """
local now = now_us()
for i = 3, #KEYS do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl > 0 then return {5, now, ttl} end
end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or 0)
if epoch ~= tonumber(ARGV[2]) then return {2, now, 0} end
if now - tonumber(ARGV[1]) > tonumber(ARGV[3]) then return {3, now, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now - tonumber(ARGV[4])))
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {4, now, 0} end
redis.call('ZADD', KEYS[2], string.format('%d', now), ARGV[6])
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[4]) / 1000) + 1000)
return {1, now, 0}
"""
)

# KEYS[1] state; ARGV: sent_at_us, max_rate, floor, provider_window_us. Returns {cut, old_millis,
# new_millis}: cut is 0 when this refusal belongs to a congestion event already answered.
_CONGESTION = (
    _HELPERS
    + f"""
local now, s, rate = load_state(tonumber(ARGV[2]))
if s[4] and tonumber(ARGV[1]) < tonumber(s[4]) + tonumber(ARGV[4]) then
  return {{0, math.floor(rate * 1000), math.floor(rate * 1000)}}
end
local floor = tonumber(ARGV[3])
local new_rate = math.max(floor, rate * {DECREASE})
local ceiling = math.max(floor, rate * {CEILING})
local tat = math.max(tonumber(s[1] or now), now + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'cut_rate', real(new_rate), 'cut_at', int(now),
           'ceiling', real(ceiling), 'epoch', int(tonumber(s[2] or 0) + 1), 'tat', int(tat))
redis.call('PEXPIRE', KEYS[1], {_STATE_TTL_MS})
return {{1, math.floor(rate * 1000), math.floor(new_rate * 1000)}}
"""
)

# Slots are handed out at most this far ahead (see RateLimiter.wait_for_slot).
HORIZON_SECONDS = 1.0

SENT = 1
RATE_CHANGED = 2
LATE = 3
WINDOW_FULL = 4
BLOCKED = 5
RETIME_REASONS = {
    RATE_CHANGED: "rate_changed",
    LATE: "late",
    WINDOW_FULL: "window_full",
    BLOCKED: "blocked",
}


@dataclass(frozen=True)
class RatePolicy:
    """The numbers the scripts enforce, derived from the provider's limit by `Settings`."""

    max_rate: float  # requests/s GCRA spaces requests at (the limit less the safety margin)
    min_rate: float  # the floor AIMD never goes below
    window_limit: int  # no more than this many sends ...
    window_seconds: float  # ... inside any window this long
    late_tolerance_seconds: float  # a slot that passed longer ago than this is not used
    provider_window_seconds: float = 1.0  # the window the provider counts in

    @classmethod
    def from_settings(cls, settings: Settings) -> RatePolicy:
        """GCRA spaces requests 1/effective_rate apart, so 21 consecutive ones span
        `limit / effective_rate` seconds: 1 s plus a slack (41.7 ms at 20/s and 4 %). Half the
        slack is the lateness a send may have; the send log allows `limit` sends in any 1 s plus
        half the slack, which sends on time or within that lateness never reach. The other half
        is what the network may add between two requests' arrivals at the provider.
        """
        window_limit = max(1, math.floor(settings.esms_rate_limit_per_second))
        max_rate = settings.effective_rate_per_second
        slack = max(window_limit / max_rate - 1.0, 0.0)
        return cls(
            max_rate=max_rate,
            min_rate=min(settings.esms_rate_min_per_second, max_rate),
            window_limit=window_limit,
            window_seconds=1.0 + slack / 2,
            late_tolerance_seconds=max(slack / 2 - 0.001, 0.0),
        )


@dataclass(frozen=True)
class Slot:
    """A reserved moment to send at; `confirm` turns it into a send, or refuses it."""

    budget: str
    slot_us: int
    epoch: int
    rate: float  # requests/s the budget allowed when the slot was taken
    recovered: bool = False  # this caller saw the rate back to full after a cut
    due: float = 0.0  # the slot on this process's clock (time.monotonic)


@dataclass(frozen=True)
class Permit:
    """A request may leave now. `sent_at_us` is the moment on Redis's clock the send log holds."""

    sent_at_us: int
    wait_seconds: float
    rate: float
    retimed: tuple[str, ...] = ()  # why earlier slots were given up, one entry each
    recovered: bool = False  # this caller saw the rate back to full after a cut


class SlotRefused(Exception):
    """`confirm` refused the slot: `reason` is one of RETIME_REASONS' values. Take a new one,
    unless it is "blocked": one of the blocking keys exists for `blocked_seconds` more."""

    def __init__(self, reason: str, blocked_seconds: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.blocked_seconds = blocked_seconds


@dataclass(frozen=True)
class Cut:
    """The result of a Code 160: whether it cut the rate, and from what to what."""

    cut: bool
    old_rate: float
    new_rate: float


class RateLimiter:
    """One budget per ApiKey (named by the caller), enforced by the scripts above."""

    def __init__(self, client: redis.Redis, policy: RatePolicy) -> None:
        self._redis = client
        self.policy = policy
        self._reserve = client.register_script(_RESERVE)
        self._confirm = client.register_script(_CONFIRM)
        self._congestion = client.register_script(_CONGESTION)

    def wait_for_slot(
        self, budget: str, max_wait_seconds: float, lead_seconds: float = 0.0
    ) -> Slot | None:
        """Take the budget's next slot and sleep until `lead_seconds` before it (the caller
        gets its request ready meanwhile, and waits the rest out with `Slot.due`); None when it
        would come later than `max_wait_seconds` from now (the caller gives its work back).

        Slots are handed out at most `HORIZON_SECONDS` ahead; a caller further back in the line
        sleeps until its turn is about half that away and asks again. So the line holds at most
        a second of slots taken at the old rate when a cut comes."""
        deadline = time.monotonic() + max(max_wait_seconds, 0.0)
        while True:
            reach = min(HORIZON_SECONDS, max(deadline - time.monotonic(), 0.0))
            granted, wait_us, slot_us, epoch, rate_millis, back = self._reserve(
                keys=[_STATE_PREFIX + budget], args=[self.policy.max_rate, int(reach * 1e6)]
            )
            wait = wait_us / 1e6
            if granted:
                due = time.monotonic() + wait
                if wait > lead_seconds:
                    time.sleep(wait - lead_seconds)
                return Slot(budget, slot_us, epoch, rate_millis / 1000, bool(back), due)
            if time.monotonic() + wait > deadline:
                return None
            time.sleep(max(wait - HORIZON_SECONDS / 2, 0.001))

    def confirm(self, slot: Slot, blocked_by: Sequence[str] = ()) -> int:
        """Record the send of `slot` in the send log, right before the request's first byte
        leaves; the moment recorded (Redis's clock, microseconds). Raises SlotRefused when the
        slot passed too long ago, the rate was cut since it was taken, or the log already holds
        the limit, or one of the `blocked_by` keys exists (a cool-off, worker.cooloff: checked
        in the same script, so it costs no round trip), and also when the answer took so long
        to come back that the request would leave late after all (the entry is then taken out
        of the log again)."""
        policy = self.policy
        member = uuid.uuid4().hex
        asked = time.monotonic()
        result, now_us, blocked_ms = self._confirm(
            keys=[_STATE_PREFIX + slot.budget, _SENT_PREFIX + slot.budget, *blocked_by],
            args=[
                slot.slot_us,
                slot.epoch,
                int(policy.late_tolerance_seconds * 1e6),
                int(policy.window_seconds * 1e6),
                policy.window_limit,
                member,
            ],
        )
        if result != SENT:
            raise SlotRefused(RETIME_REASONS[result], blocked_ms / 1000)
        if time.monotonic() - asked > policy.late_tolerance_seconds / 2:
            # Something else ran between the log entry and now: the send would not be when
            # the log says.
            self._redis.zrem(_SENT_PREFIX + slot.budget, member)
            raise SlotRefused(RETIME_REASONS[LATE])
        return now_us

    def acquire(self, budget: str, max_wait_seconds: float) -> Permit | None:
        """`wait_for_slot` and `confirm` until a send is recorded, for a caller that sends right
        after this returns; None when no slot comes within `max_wait_seconds`."""
        started = time.monotonic()
        deadline = started + max_wait_seconds
        retimed: list[str] = []
        recovered = False
        while True:
            slot = self.wait_for_slot(budget, deadline - time.monotonic())
            if slot is None:
                return None
            recovered = recovered or slot.recovered
            try:
                sent_at = self.confirm(slot)
            except SlotRefused as refused:
                retimed.append(refused.reason)
                continue
            waited = time.monotonic() - started
            return Permit(sent_at, waited, slot.rate, tuple(retimed), recovered)

    def congestion(self, budget: str, sent_at_us: int) -> Cut:
        """The provider refused a request that left at `sent_at_us` as too fast: cut the rate,
        unless this refusal belongs to a congestion event already answered."""
        policy = self.policy
        cut, old, new = self._congestion(
            keys=[_STATE_PREFIX + budget],
            args=[
                sent_at_us,
                policy.max_rate,
                policy.min_rate,
                int(policy.provider_window_seconds * 1e6),
            ],
        )
        return Cut(bool(cut), old / 1000, new / 1000)

    def ping(self) -> None:
        self._redis.ping()
