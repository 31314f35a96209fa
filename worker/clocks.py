"""Time across hosts: scheduling ticks that do not need clocks to agree, and the skew we see.

Beat used to send each `esms.schedule` tick with a 2 s `expires`, which Celery turns into an
absolute time on beat's clock: a worker whose clock ran 5 s ahead discarded every tick as
expired and polled nothing, silently. Ticks now carry no expiry. What `expires` guarded against
(a pile of old ticks after the workers were away, all run one after the other) is handled where
the clock is shared: `TickGate` lets one tick through per half tick interval, timed by Redis
(`SET NX PX`), and the others return at once.

The skew itself is measured against the clocks every host shares: Postgres `now()` (leases,
backoff, expiry) and Redis `TIME` (the rate limiter). Each tick sets `esms_clock_skew_seconds`
and a skew beyond `SKEW_WARNING_SECONDS` is logged once, with the fix (run NTP); the daemon
keeps working, because nothing it decides reads the local clock.
"""

from __future__ import annotations

import logging
import time

import redis
from sqlalchemy import Connection, text

from worker import metrics

log = logging.getLogger(__name__)

SKEW_WARNING_SECONDS = 1.0
_GATE_KEY = "esms:tick-gate"

# KEYS[1] gate; ARGV[1] how long it stays shut (ms). Returns {opened (0/1), seconds, micros}.
_OPEN = """
local opened = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) and 1 or 0
local t = redis.call('TIME')
return {opened, t[1], t[2]}
"""

_POSTGRES_NOW = text("SELECT extract(epoch FROM clock_timestamp())")

# Which references this process has warned about, so that each skew is logged once (and its
# end once).
_warned: set[str] = set()


class TickGate:
    """One scheduling tick per half tick interval, however many old ticks wait in the queue."""

    def __init__(self, client: redis.Redis, tick_seconds: float) -> None:
        self._gap_ms = max(1, int(tick_seconds * 1000 / 2))
        self._open = client.register_script(_OPEN)

    def open(self) -> bool:
        """True if this tick runs; also records the skew against Redis's clock."""
        before = time.time()
        opened, seconds, micros = self._open(keys=[_GATE_KEY], args=[self._gap_ms])
        after = time.time()
        observe_skew("redis", int(seconds) + int(micros) / 1e6, before, after)
        return bool(opened)


def postgres_skew(conn: Connection) -> float:
    """Record and return the skew of this host's clock against Postgres's."""
    before = time.time()
    now = float(conn.execute(_POSTGRES_NOW).scalar_one())
    after = time.time()
    return observe_skew("postgres", now, before, after)


def observe_skew(reference: str, their_time: float, before: float, after: float) -> float:
    """Skew = local clock minus `reference`'s, taken as the midpoint of a round trip (so the
    round trip itself cannot be mistaken for skew). Sets the gauge; logs a large skew once."""
    skew = (before + after) / 2 - their_time
    metrics.CLOCK_SKEW_SECONDS.labels(reference).set(skew)
    if abs(skew) > SKEW_WARNING_SECONDS + (after - before) / 2:
        if reference not in _warned:
            _warned.add(reference)
            log.warning(
                "this host's clock is %+.1fs off %s's: run NTP (chrony, systemd-timesyncd). "
                "Polling does not depend on it, but timestamps in logs and metrics do",
                skew, reference,
            )  # fmt: skip
    elif reference in _warned and abs(skew) < SKEW_WARNING_SECONDS / 2:
        _warned.discard(reference)
        log.info("this host's clock agrees with %s's again (%+.2fs)", reference, skew)
    return skew
