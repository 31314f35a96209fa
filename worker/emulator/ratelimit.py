"""The provider's "20TPS" limit, as an exact sliding window per ApiKey, and its audit.

A request arriving at time t is admitted when fewer than `limit` admitted requests of the same
ApiKey arrived in (t - window, t]. By default refused requests are not added to the window: the
limiter bounds what the provider accepts, so a client that sends too fast loses only its excess
requests, and the audit can check that admitted requests never exceed the limit in any window.
With `count_refused` (a stricter provider, as eSMS's contract allows) every request counts, so a
client that keeps sending too fast keeps the window full and is refused until it slows down.

`max_in_window` counts the same way over logged arrival times; because the limiter and the request
log share one timestamp per request, the audit of admitted requests agrees with the limiter to the
last float.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence


class SlidingWindowLimiter:
    """Exact per-key sliding-window limiter keeping every admitted timestamp of the window."""

    def __init__(self) -> None:
        self._admitted: defaultdict[str, deque[float]] = defaultdict(deque)

    def admit(
        self, key: str, t: float, limit: int, window_s: float, count_refused: bool = False
    ) -> bool:
        """Admit (and record) a request of `key` at `t` unless the window is full; with
        `count_refused` a refused request is recorded too.

        Callers pass non-decreasing `t`: the emulator timestamps and admits a request in one step
        on the event loop, so arrival order and timestamp order are the same.
        """
        times = self._admitted[key]
        horizon = t - window_s
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) >= limit:
            if count_refused:
                times.append(t)
            return False
        times.append(t)
        return True

    def clear(self) -> None:
        self._admitted.clear()


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """Largest number of `times` (sorted ascending) that fall in any (t - window_s, t]."""
    best = 0
    start = 0
    for end, t in enumerate(times):
        horizon = t - window_s
        while times[start] <= horizon:
            start += 1
        best = max(best, end - start + 1)
    return best
