"""The scheduler: claims due RefIds in Postgres, groups them into requests and queues them.

Beat runs `schedule_tick` every `SCHEDULE_TICK_SECONDS`. One tick, in a short transaction under an
advisory lock (so two beats are harmless): give new rows their first poll time, expire rows past
the maximum age, drop lapsed leases, then for each configured account claim just enough due rows
to keep `SCHEDULE_LOOKAHEAD_SECONDS` of its rate budget in flight. Claiming is one statement per
account (`store.claim_batches`): the due rows are grouped by OAId into batches of at most
`ESMS_BATCH_SIZE` in Postgres (with `POLL_BATCH_FILL_SECONDS`, a short batch of first polls may
wait a little for more) and leased there, so a tick costs the worker next to no CPU; only after
the commit are the batches handed to the queue, one batch of each account in turn. The queue
therefore never holds much more than the limiter can drain in a couple of seconds, and
`next_poll_at` in Postgres, not a Celery ETA, is the schedule.

An account with nothing in flight that wants more than half a second of its rate (a worker that
starts with a due backlog, an idle account that gets busy) is claimed in two rounds: half a
second's worth in the tick's transaction, queued at once, and the rest in a second short
transaction under the same lock. A claim costs Postgres 9–12 ms per batch, so the default
three seconds' worth in one round kept the first request waiting half a second for it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, zip_longest

from sqlalchemy import Connection, Engine

from worker import clocks, metrics, store
from worker.cooloff import CoolOffs, account_scope
from worker.notfound import NotFoundTracker
from worker.settings import Settings
from worker.store import Batch

log = logging.getLogger(__name__)


def interleave_accounts(per_account: Sequence[Sequence[Batch]]) -> list[Batch]:
    """One batch of each account in turn, each account's own order kept.

    Workers take tasks in queue order and wait in them for their account's rate slot: a queue
    holding one account's batches ahead of another's would start every account's polls late but
    the first's, and a worker whose pool is full would wait on the first account's slots while the
    second account's go unused.
    """
    return [batch for batch in chain.from_iterable(zip_longest(*per_account)) if batch is not None]


def batches_wanted(settings: Settings, in_flight: int) -> int:
    """How many more requests one account may have queued or running right now."""
    target = math.ceil(settings.effective_rate_per_second * settings.schedule_lookahead_seconds)
    return max(0, target - in_flight)


# A tick's first round claims at most this much of an account's rate; the rest waits for the
# second round, after the first round's batches are queued.
FIRST_ROUND_SECONDS = 0.5


def first_round(settings: Settings, wanted: int, in_flight: int = 0) -> int:
    """How many of the `wanted` batches an account gets in a tick's first round: all of them
    while it has some in flight (a steady tick tops up half a second's worth anyway), else
    half a second's worth."""
    if in_flight:
        return wanted
    return min(wanted, math.ceil(settings.effective_rate_per_second * FIRST_ROUND_SECONDS))


_UNPOLLABLE_CHECK_SECONDS = 300.0
_last_unpollable_check = -math.inf
_reported_unpollable: set[tuple[str, bool]] = set()


def _unpollable_check_due() -> bool:
    global _last_unpollable_check
    now = time.monotonic()
    if now - _last_unpollable_check < _UNPOLLABLE_CHECK_SECONDS:
        return False
    _last_unpollable_check = now
    return True


def _report_unpollable(found: Iterable[tuple[str, bool, int]]) -> None:
    """One warning per account (and per "no OAId") this process has not reported yet; the gauge
    `esms_unpollable_pending` shows them all, each time they are counted."""
    found = list(found)
    metrics.set_unpollable(found)
    for account, blank_oa, count in found:
        if (account, blank_oa) in _reported_unpollable:
            continue
        _reported_unpollable.add((account, blank_oa))
        why = "have an empty oa_id" if blank_oa else "belong to an account that is not configured"
        log.warning(
            "%d pending messages of account %r %s: never polled, they expire at the maximum age",
            count, account, why,
        )  # fmt: skip


@dataclass
class TickReport:
    initialized: int = 0
    expired: int = 0
    lapsed: int = 0
    batches: list[Batch] = field(default_factory=list)
    skipped: bool = False


def schedule_tick(
    engine: Engine,
    settings: Settings,
    enqueue: Callable[[Sequence[Batch]], None],
    cooloffs: CoolOffs | None = None,
    notfound: NotFoundTracker | None = None,
) -> TickReport:
    """One scheduling round; `enqueue` receives the new batches after they are committed.

    Accounts and OAs in a cool-off (see `worker.cooloff`) are not claimed. With `notfound`,
    RefIds never answered and RefIds answered Code 105 alone are claimed within the account's
    not-found budget (worker.notfound).
    """
    report = TickReport()
    accounts = list(settings.accounts)
    skip_oas: dict[str, list[str]] = {}
    if cooloffs is not None:
        paused = cooloffs.paused([account_scope(name) for name in accounts])
        paused_accounts = {name for name in accounts if account_scope(name) in paused}
        skip_oas = {name: cooloffs.paused_oas(name) for name in accounts}
        metrics.set_cooling_off(accounts, paused_accounts, skip_oas)
        accounts = [name for name in accounts if name not in paused_accounts]
    claim = _Claim(settings, skip_oas, notfound)
    with engine.begin() as conn:
        if not store.try_scheduler_lock(conn):
            report.skipped = True
            metrics.TICKS.labels("skipped").inc()
            return report
        store.heartbeat(conn)
        clocks.postgres_skew(conn)
        # With pushes, a new message waits out the grace first: most never need a poll.
        first_poll = max(settings.poll_interval_seconds, settings.push_grace_seconds)
        report.initialized = store.initialize_new(conn, first_poll)
        report.expired = store.expire_old(
            conn, settings.message_max_age_seconds, list(settings.accounts)
        )
        report.lapsed = store.drop_lapsed_batches(conn)
        if report.expired or _unpollable_check_due():
            _report_unpollable(store.unpollable(conn, list(settings.accounts)))
        first = claim.round(conn, accounts, first=True)
    report.batches = first
    if first:
        enqueue(first)
    more = [name for name in accounts if name in claim.wanting_more]
    if more:
        with engine.begin() as conn:
            # Another tick that took the lock meanwhile claims for itself.
            rest = claim.round(conn, more) if store.try_scheduler_lock(conn) else []
        report.batches = first + rest
        if rest:
            enqueue(rest)
    metrics.TICKS.labels("run").inc()
    metrics.SCHEDULER_LAST_TICK.set_to_current_time()
    if report.expired:
        metrics.RESOLVED.labels("expired").inc(report.expired)
    for batch in report.batches:
        metrics.BATCHES_QUEUED.labels(batch.account).inc()
    metrics.refresh_backlog(engine, settings)
    if report.initialized or report.expired or report.lapsed or report.batches:
        log.info(
            "tick: %d new, %d expired, %d lapsed leases, %d batches queued (%d RefIds)",
            report.initialized,
            report.expired,
            report.lapsed,
            len(report.batches),
            sum(len(batch.ref_ids) for batch in report.batches),
        )
    return report


class _Claim:
    """A tick's claims, one round at a time (see the module docstring): each round claims what
    each account wants now, the first round only `first_round` of it, and remembers in
    `wanting_more` the accounts it left wanting more."""

    def __init__(
        self,
        settings: Settings,
        skip_oas: dict[str, list[str]],
        notfound: NotFoundTracker | None,
    ) -> None:
        self.settings = settings
        self.skip_oas = skip_oas
        self.notfound = notfound
        self.wanting_more: set[str] = set()

    def round(
        self,
        conn: Connection,
        accounts: Sequence[str],
        *,
        first: bool = False,
    ) -> list[Batch]:
        settings = self.settings
        in_flight = store.inflight_batches(conn)
        per_account: list[list[Batch]] = []
        for name in accounts:
            flying = in_flight.get(name, 0)
            wanted = batches_wanted(settings, flying)
            now = first_round(settings, wanted, flying) if first else wanted
            self.wanting_more.discard(name)
            if now == 0:
                continue
            limits = self.notfound.limits(name) if self.notfound is not None else None
            batches = store.claim_batches(
                conn,
                name,
                now,
                settings.esms_batch_size,
                settings.lease_seconds,
                self.skip_oas.get(name, ()),
                settings.poll_batch_fill_seconds,
                limits=limits,
            )
            if now < wanted and len(batches) == now:  # short of `now`: nothing more is due
                self.wanting_more.add(name)
            per_account.append(batches)
        return interleave_accounts(per_account)
