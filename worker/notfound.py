"""RefIds the provider does not know: bounded cost for Code 105, shared by every worker.

GetCallback may answer Code 105 ("SMSID not found") for a whole request when one RefId in it is
unknown to the provider (a message sent without CallbackUrl, a RefId the sender mistyped, one too
new to be queried). Retrying the batch would fail for ever; splitting it in halves until every
unknown RefId stands alone costs two requests per halving per unknown RefId, and a RefId found
unknown that goes back into a mixed batch starts the search again. Instead, the poller treats
this as group testing (Hwang's generalized binary splitting), with what it learns kept in Redis
so every worker and the scheduler share it:

- Evidence per account: RefIds answered for the first time (the provider knows them) and RefIds
  found unknown. From their shares, `pool_size` is how many RefIds never answered yet go into one
  request: the whole batch while none was ever unknown, about (1 - p) / p when a share p is.
  Batches of RefIds the provider answered for before never carry one that it did not.
- A batch answered 105 is searched one half at a time (store.search_halves): the first half is
  sent, the second parked. If the first half is answered, the unknown RefId is in the parked half,
  which is split in turn without being sent whole; if the first half is answered 105 too, the
  search goes on in it and the parked half goes back to be pooled with the others.
- A batch of one answered 105 (or inferred unknown): the RefId is `lone`
  (messages.not_found_count), polled alone from then on with its own, longer backoff.
- A budget: RefIds the provider may not know take at most NOT_FOUND_BUDGET_SHARE of an account's
  requests per scheduler tick. It is spent where the cost starts: each tick claims at most as
  many pools of new RefIds as the budget pays for with their expected searches (a pool of about
  (1 - p) / p RefIds is answered 105 about half the time, and its search then costs about
  log2 of its size), and at most half the budget in lone RefIds. A search once started runs to
  its end, one request at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from worker.settings import Settings

_EVIDENCE = "esms:notfound:evidence:"
# Evidence is halved when it holds more RefIds than this: the share follows what the sender does
# now (a bad release that sent without CallbackUrl, then a fix), not what it did last month.
_EVIDENCE_HORIZON = 4000

# KEYS[1] evidence hash; ARGV: known, unknown, horizon.
_OBSERVE = """
local known = redis.call('HINCRBYFLOAT', KEYS[1], 'known', ARGV[1])
local unknown = redis.call('HINCRBYFLOAT', KEYS[1], 'unknown', ARGV[2])
if tonumber(known) + tonumber(unknown) > tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'known', tonumber(known) / 2, 'unknown', tonumber(unknown) / 2)
end
redis.call('EXPIRE', KEYS[1], 7 * 86400)
"""


def pool_size(known: float, unknown: float, batch_size: int) -> int:
    """RefIds never answered yet per request, given the evidence: a request holding an unknown
    one is answered 105 for all, so pools are sized to be found clean about half the time."""
    if unknown < 0.5:
        return batch_size
    # The 20 stands for RefIds assumed known before any evidence: one unknown RefId seen first
    # must not make every RefId go alone.
    share = (unknown + 0.5) / (known + unknown + 20)
    return max(1, min(batch_size, math.floor((1 - share) / share)))


def pools_per_tick(budget: int, pool: int) -> int:
    """Pools of `pool` new RefIds a tick may claim when `budget` requests may go to them and to
    their searches: each costs its own request, and half of them a search of about log2(pool)."""
    return max(1, math.floor(budget / (1 + 0.5 * math.log2(max(pool, 1)))))


@dataclass(frozen=True)
class ClaimLimits:
    """How a tick claims an account's RefIds the provider may not know (store.claim_batches)."""

    new_size: int  # RefIds never answered per request
    new_limit: int | None  # pools of those per tick; None: no limit (none was ever unknown)
    lone_limit: int  # RefIds answered 105 alone, polled alone, per tick


class NotFoundTracker:
    """The evidence of every account, in Redis, and the budget it sets for a tick."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._batch_size = settings.esms_batch_size
        per_tick = settings.effective_rate_per_second * settings.schedule_tick_seconds
        self.budget_per_tick = max(1, math.floor(settings.not_found_budget_share * per_tick))
        self._observe = client.register_script(_OBSERVE)

    def pool_size(self, account: str) -> int:
        known, unknown = self._redis.hmget(_EVIDENCE + account, "known", "unknown")
        return pool_size(float(known or 0), float(unknown or 0), self._batch_size)

    def limits(self, account: str) -> ClaimLimits:
        pool = self.pool_size(account)
        new_limit = None if pool >= self._batch_size else pools_per_tick(self.budget_per_tick, pool)
        return ClaimLimits(pool, new_limit, max(1, self.budget_per_tick // 2))

    def observe(self, account: str, *, known: int = 0, unknown: int = 0) -> None:
        """Count RefIds the provider answered for the first time, and RefIds found unknown."""
        if known or unknown:
            self._observe(keys=[_EVIDENCE + account], args=[known, unknown, _EVIDENCE_HORIZON])
