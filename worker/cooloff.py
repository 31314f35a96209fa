"""Cool-offs: the provider refused an account (keys, IP, lock) or an OA; stop asking for a while.

Retrying a refused account every second would only hammer the provider and fill the logs. A
refusal pauses that account (or that account's OA) for a cool-off that doubles with each refusal
in a row, from `COOLOFF_BASE_SECONDS` up to `COOLOFF_MAX_SECONDS`; one error line is logged per
cool-off. The first accepted request clears it. Pauses live in Redis with their expiry as TTL, so
every scheduler and worker on every host sees them, and a Redis restart merely ends them early.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger(__name__)

COOLOFF_BASE_SECONDS = 30.0
COOLOFF_MAX_SECONDS = 900.0
_PAUSE = "esms:pause:"
_STREAK = "esms:pause-streak:"
# The streak outlives the pause so that a refusal right after a pause doubles the next one.
_STREAK_TTL_SECONDS = 2 * 86400


def account_scope(account: str) -> str:
    return f"account:{account}"


def oa_scope(account: str, oa_id: str) -> str:
    return f"oa:{account}:{oa_id}"


class CoolOffs:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def pause(self, scope: str, reason: str) -> float:
        """Start the cool-off of `scope`, or learn the one already running; returns seconds.

        Many batches of one account fail together when its keys are refused: only the first
        starts a cool-off, lengthens the streak and logs.
        """
        streak = int(self._redis.get(_STREAK + scope) or 0)
        seconds = min(COOLOFF_BASE_SECONDS * 2 ** min(streak, 20), COOLOFF_MAX_SECONDS)
        if self._redis.set(_PAUSE + scope, reason, px=int(seconds * 1000), nx=True):
            self._redis.set(_STREAK + scope, streak + 1, ex=_STREAK_TTL_SECONDS)
            log.error("%s refused by the provider (%s): paused for %.0fs", scope, reason, seconds)
            return seconds
        remaining_ms = self._redis.pttl(_PAUSE + scope)
        return max(remaining_ms, 0) / 1000

    def paused_oas(self, account: str) -> list[str]:
        """The OAs of `account` cooling off right now."""
        prefix = _PAUSE + oa_scope(account, "")
        return [key.decode()[len(prefix) :] for key in self._redis.scan_iter(match=prefix + "*")]

    def paused(self, scopes: list[str]) -> set[str]:
        """Which of `scopes` are cooling off right now."""
        if not scopes:
            return set()
        values = self._redis.mget([_PAUSE + scope for scope in scopes])
        return {scope for scope, value in zip(scopes, values, strict=True) if value is not None}

    def keys(self, *scopes: str) -> list[str]:
        """The Redis keys that exist while `scopes` cool off (for a check inside a script)."""
        return [_PAUSE + scope for scope in scopes]

    def clear(self, *scopes: str) -> None:
        """The provider accepted a request: forget the refusals of these scopes."""
        keys = [prefix + scope for scope in scopes for prefix in (_PAUSE, _STREAK)]
        self._redis.delete(*keys)
