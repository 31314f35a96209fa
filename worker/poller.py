"""One poll: the body of the poll task, as a plain function that tests call directly.

`poll_batch` loads its leased batch, waits for its slot in the account's shared rate budget, calls
GetCallback with no transaction open, and writes the answer in one transaction. A failed request
changes no message's data: the batch's rows are released to be due again after a short delay, and
one log line names the account, OAId, batch size and reason (never a key). Code 160 also cuts
the ApiKey's shared rate (worker.ratelimit), so every worker slows down together. A batch whose
account or OA cools off after a refusal (see `worker.cooloff`) is released unsent until the
cool-off ends. A batch answered Code 105 ("SMSID not found") is searched for the RefIds the
provider does not know, one half at a time, within a budget (worker.notfound), so that they do
not hold back the others.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

from worker import metrics, store
from worker.cooloff import CoolOffs, account_scope, oa_scope
from worker.errors import AccountRejected, OARejected, ProviderError, RateLimited, RefIdsNotFound
from worker.esms_client import EsmsClient
from worker.notfound import NotFoundTracker
from worker.ratelimit import INCREASE_PER_SECOND, RateLimiter, Slot, SlotRefused
from worker.settings import MAX_LIMITER_WAIT_SECONDS, Settings

log = logging.getLogger(__name__)

# A batch answered "too fast" (Code 160) is due again this soon: the rate cut paces it.
RATE_LIMITED_RETRY_SECONDS = 1.0


class Outcome(enum.StrEnum):
    DONE = "done"
    STALE = "stale"  # lease gone or too short: another request may own these RefIds now
    NO_SLOT = "no_slot"  # rate budget busy beyond the wait we accept
    PAUSED = "paused"  # the account or OA cools off after a refusal: not sent
    UNKNOWN_ACCOUNT = "unknown_account"
    FAILED = "failed"


@dataclass(frozen=True)
class PollResult:
    outcome: Outcome
    size: int = 0
    items: int = 0
    changed: int = 0
    reason: str | None = None


def poll_batch(
    batch_id: uuid.UUID,
    *,
    settings: Settings,
    engine: Engine,
    client: EsmsClient,
    limiter: RateLimiter,
    cooloffs: CoolOffs,
    notfound: NotFoundTracker,
    enqueue: Callable[[Sequence[store.Batch]], None] | None = None,
) -> PollResult:
    """Poll one leased batch. `enqueue` queues batches this poll makes (the search of a batch
    the provider answered Code 105); without it such a batch is released instead."""
    search = _Search(engine, settings, notfound, enqueue)
    with store.single_statements(engine) as conn:
        batch = store.load_batch(conn, batch_id, settings.lease_min_remaining_seconds)
    if batch is None:
        metrics.BATCHES.labels(Outcome.STALE).inc()
        log.info(
            "batch %s: lease gone or too short, not sent", batch_id, extra={"batch": str(batch_id)}
        )
        return PollResult(Outcome.STALE)

    account = settings.accounts.get(batch.account)
    size = len(batch.ref_ids)
    if account is None:
        _release(engine, batch, settings.poll_max_interval_seconds)
        search.settle(batch, found=None, delay=settings.poll_max_interval_seconds)
        metrics.BATCHES.labels(Outcome.UNKNOWN_ACCOUNT).inc()
        log.warning(
            "account=%s oa=%s size=%d: account not configured, batch released",
            batch.account, batch.oa_id, size,
            extra=_fields(batch, size, reason="account not configured"),
        )  # fmt: skip
        return PollResult(Outcome.UNKNOWN_ACCOUNT, size, reason="account not configured")

    # The limiter has the last word as the request's first byte is about to leave; it also
    # checks the cool-offs then: batches queued before a sibling batch was refused must not
    # each spend a request the provider will refuse too.
    scopes = (account_scope(batch.account), oa_scope(batch.account, batch.oa_id))
    gate = _SendGate(
        limiter,
        account.limiter_key,
        batch.account,
        cooloffs.keys(*scopes),
        time.monotonic() + MAX_LIMITER_WAIT_SECONDS,
    )
    records = None
    while records is None and gate.take_slot():
        started = time.monotonic()
        try:
            records = client.get_callback(account, batch.oa_id, batch.ref_ids, gate.confirm)
        except SlotRefused as refused:
            if refused.reason == _RETAKE:
                continue
            if refused.reason == NO_SLOT:
                break
            paused_for = refused.blocked_seconds
            why = f"cooling off for {paused_for:.0f}s after a refusal"
            search.settle(batch, found=None, delay=paused_for)
            return _give_back(engine, batch, paused_for, Outcome.PAUSED, "cooling off", why)
        except ProviderError as exc:
            elapsed = time.monotonic() - (gate.sent_at or started)
            return _failed(
                exc, elapsed, gate.sent_at_us, batch, account.limiter_key, settings, engine,
                limiter, cooloffs, search,
            )  # fmt: skip
    if records is None:
        search.settle(batch, found=None, delay=0)
        why = f"no rate slot within {MAX_LIMITER_WAIT_SECONDS:.0f}s"
        return _give_back(engine, batch, 0, Outcome.NO_SLOT, "no rate slot", why)
    elapsed = time.monotonic() - (gate.sent_at or started)
    metrics.count_request(batch.account, None, on_unknown=batch.kind == "lone")
    metrics.REQUEST_SECONDS.labels(batch.account).observe(elapsed)
    with store.single_statements(engine) as conn:
        completed = store.complete_batch(conn, batch, records, settings)
    # After the commit: the answer is safe in Postgres even if Redis is away for this call.
    cooloffs.clear(*scopes)
    notfound.observe(batch.account, known=completed.first_answers)
    search.settle(batch, found=True)
    # Counted after the commit: a write that failed resolved nothing.
    for state, count in completed.resolved.items():
        metrics.RESOLVED.labels(state).inc(count)
    metrics.count_failures(completed.failures)
    metrics.REFIDS_POLLED.labels(batch.account).inc(size)
    metrics.BATCHES.labels(Outcome.DONE).inc()
    log.info(
        "account=%s oa=%s size=%d duration=%.3fs: %d items, %d rows changed",
        batch.account,
        batch.oa_id,
        size,
        elapsed,
        len(records),
        completed.changed,
        extra=_fields(batch, size, elapsed, items=len(records), changed=completed.changed),
    )
    return PollResult(Outcome.DONE, size, len(records), completed.changed)


def _failed(
    exc: ProviderError,
    elapsed: float,
    sent_at_us: int | None,
    batch: store.Batch,
    budget: str,
    settings: Settings,
    engine: Engine,
    limiter: RateLimiter,
    cooloffs: CoolOffs,
    search: _Search,
) -> PollResult:
    """A request that got no usable answer: count it, react to what the provider said (rate
    cut, cool-off, search for unknown RefIds), release the batch, one log line."""
    size = len(batch.ref_ids)
    not_found = isinstance(exc, RefIdsNotFound)
    metrics.count_request(batch.account, exc, on_unknown=not_found or batch.kind == "lone")
    metrics.REQUEST_SECONDS.labels(batch.account).observe(elapsed)
    if isinstance(exc, RateLimited):
        if sent_at_us is not None:
            _slow_down(limiter, budget, batch.account, sent_at_us)
        delay = RATE_LIMITED_RETRY_SECONDS
    elif isinstance(exc, AccountRejected):
        delay = cooloffs.pause(account_scope(batch.account), exc.reason)
    elif isinstance(exc, OARejected):
        delay = cooloffs.pause(oa_scope(batch.account, batch.oa_id), exc.reason)
    else:
        delay = settings.poll_interval_seconds
    then = ""
    if not_found:
        metrics.NOT_FOUND_REQUESTS.labels(batch.account).inc()
        then = search.not_found(batch)
    else:
        search.settle(batch, found=None, delay=delay)
    if not then:
        _release(engine, batch, delay)
    metrics.BATCHES.labels(Outcome.FAILED).inc()
    log.warning(
        "account=%s oa=%s size=%d duration=%.3fs: request failed: %s%s",
        batch.account,
        batch.oa_id,
        size,
        elapsed,
        exc.reason,
        then,
        extra=_fields(batch, size, elapsed, reason=exc.reason),
    )
    return PollResult(Outcome.FAILED, size, reason=exc.reason)


def _give_back(
    engine: Engine, batch: store.Batch, delay: float, outcome: Outcome, reason: str, why: str
) -> PollResult:
    """Release a batch unsent, due again after `delay`, with one log line saying `why`."""
    size = len(batch.ref_ids)
    _release(engine, batch, delay)
    metrics.BATCHES.labels(outcome).inc()
    log.info(
        "account=%s oa=%s size=%d: %s, batch released", batch.account, batch.oa_id, size, why,
        extra=_fields(batch, size, reason=reason),
    )  # fmt: skip
    return PollResult(outcome, size, reason=reason)


# SlotRefused's reason when no slot comes before the poll's limiter deadline.
NO_SLOT = "no_slot"
# ... and when the next slot is further away than a ready connection is held for: the
# connection goes back, and the poll waits for its slot without it.
_RETAKE = "retake"
# A poll wakes this long before its slot to get its request ready (the body, a connection from
# the pool or a new one) and waits the rest out holding the connection, so what happens at the
# slot itself is the limiter's last word and the write. Measured with one busy account on two
# busy cores: the request was ready 3.4 ms after the slot at the median but 48 ms at the 99th
# percentile (other polls' CPU work runs whenever this one yields), against a late tolerance of
# 19.8 ms; the wake-up alone was 1.7 ms and 17 ms late.
PREPARE_SECONDS = 0.05
# A connection is held at most this long for the next slot. An idle connection the server
# closes meanwhile fails the request it carries (HTTP keep-alive timeouts are 5 s in Apache and
# uvicorn); EsmsClient keeps idle connections at most KEEPALIVE_SECONDS, so idle plus held stays
# under that.
_HOLD_SECONDS = 1.0


class _SendGate:
    """A poll's rate slot and the limiter's last word on it, said by `confirm` as the request's
    first byte is about to leave (EsmsClient's `before_send`). `take_slot` returns
    PREPARE_SECONDS before the slot, and `confirm` waits the rest out with the connection ready.
    A slot refused there (woken too late, taken before a rate cut, or the send log full) is
    replaced by the next one, waited for right there, holding the connection that is ready: a
    connection that took longer to make than a slot may be late (a TLS handshake across the
    internet) is used on the next slot, instead of being closed with the refused one and made
    again for the next slot, late again, for ever. A next slot further than _HOLD_SECONDS away
    raises SlotRefused(_RETAKE): the connection goes back and the poll takes its slot without
    it. No slot before `deadline` raises SlotRefused(NO_SLOT); a cool-off raises
    SlotRefused("blocked") at once."""

    def __init__(
        self,
        limiter: RateLimiter,
        budget: str,
        account: str,
        blocked_by: list[str],
        deadline: float,
    ) -> None:
        self.limiter = limiter
        self.budget = budget
        self.account = account
        self.blocked_by = blocked_by
        self.deadline = deadline
        self.waiting_since = time.monotonic()
        self.slot: Slot | None = None
        self.sent_at_us: int | None = None  # Redis's clock, once the send is recorded
        self.sent_at: float | None = None  # the same moment, monotonic

    def take_slot(self, within: float | None = None) -> bool:
        """Wait for the budget's next slot; False when none comes before the deadline (or
        within `within` seconds)."""
        left = self.deadline - time.monotonic()
        wait = left if within is None else min(left, within)
        slot = self.limiter.wait_for_slot(self.budget, wait, PREPARE_SECONDS)
        if slot is None:
            return False
        _count_slot(self.account, slot, time.monotonic() - self.waiting_since)
        self.slot = slot
        return True

    def confirm(self) -> None:
        while True:
            assert self.slot is not None, "take_slot first"
            early = self.slot.due - time.monotonic()
            if early > 0:
                time.sleep(early)
            try:
                self.sent_at_us = self.limiter.confirm(self.slot, self.blocked_by)
                self.sent_at = time.monotonic()
                return
            except SlotRefused as refused:
                if refused.reason == "blocked":
                    raise
                metrics.SENDS_RETIMED.labels(self.account, refused.reason).inc()
            if time.monotonic() >= self.deadline:
                raise SlotRefused(NO_SLOT)
            if not self.take_slot(within=_HOLD_SECONDS):
                raise SlotRefused(_RETAKE)


def _count_slot(account: str, slot: Slot, waited: float) -> None:
    metrics.LIMITER_WAIT_SECONDS.labels(account).observe(waited)
    metrics.RATE_PER_SECOND.labels(account).set(slot.rate)
    if slot.recovered:
        log.info(
            "account=%s: request rate back to %.1f/s", account, slot.rate,
            extra={"account": account, "rate": slot.rate},
        )  # fmt: skip


def _slow_down(limiter: RateLimiter, budget: str, account: str, sent_at_us: int) -> None:
    """Code 160: cut the ApiKey's shared rate, once per congestion event, with one log line."""
    cut = limiter.congestion(budget, sent_at_us)
    if not cut.cut:
        return
    metrics.RATE_CUTS.labels(account).inc()
    metrics.RATE_PER_SECOND.labels(account).set(cut.new_rate)
    log.warning(
        "account=%s: provider answered Code 160 (too fast): request rate cut from %.1f/s to "
        "%.1f/s for every worker, climbing back by %.0f/s each second",
        account, cut.old_rate, cut.new_rate, INCREASE_PER_SECOND,
        extra={"account": account, "rate": cut.new_rate, "previous_rate": cut.old_rate},
    )  # fmt: skip


class _Search:
    """What a poll does about RefIds the provider does not know (worker.notfound): one place for
    the answers to a searched half and for batches answered Code 105."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        tracker: NotFoundTracker,
        enqueue: Callable[[Sequence[store.Batch]], None] | None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.tracker = tracker
        self.enqueue = enqueue

    def not_found(self, batch: store.Batch) -> str:
        """Code 105 for the whole request. A RefId asked alone is unknown for now: polled alone
        from now on. A larger batch is searched one half at a time (the tick's claim keeps the
        searches within the account's budget); a batch of RefIds never answered that is much
        larger than the account's pool size now goes back to be pooled. Returns what was done,
        for the log line, or "" when the batch is to be released as after any failure."""
        self.settle(batch, found=False)
        size = len(batch.ref_ids)
        if size == 1:
            with store.single_statements(self.engine) as conn:
                newly = store.mark_not_found(conn, batch, self.settings, polled=True)
            self.tracker.observe(batch.account, unknown=newly)
            return "; polled alone from now on"
        pool = self.tracker.pool_size(batch.account)
        if batch.kind == "new" and size > 2 * pool:
            _release(self.engine, batch, 0)
            return f"; back to be pooled {pool} to a request"
        if self.enqueue is None:
            return ""
        with self.engine.begin() as conn:
            first = store.search_halves(conn, batch, self.settings.lease_seconds)
        if first is None:
            return ""
        self.enqueue([first])
        return f"; searched: {len(first.ref_ids)} RefIds sent, {size - len(first.ref_ids)} parked"

    def settle(self, batch: store.Batch, *, found: bool | None, delay: float = 0) -> None:
        """Decide the parked half of a searched batch from the answer to its sibling: `found`
        (the sibling was answered) means the RefId the provider does not know is in the parked
        half, which is searched next without being sent whole; False (105 again: the search goes
        on in the sibling) or None (no answer) sends it back to be polled after `delay`."""
        if batch.kind != "half":
            return
        with store.single_statements(self.engine) as conn:
            parked = store.parked_batch(conn, batch.id)
            if parked is None:
                return
            if found and len(parked.ref_ids) == 1:
                newly = store.mark_not_found(conn, parked, self.settings, polled=False)
                self.tracker.observe(parked.account, unknown=newly)
                return
            if not found or self.enqueue is None:
                store.release_batch(conn, parked, delay if found is None else 0)
                return
        with self.engine.begin() as conn:
            first = store.search_halves(conn, parked, self.settings.lease_seconds)
        if first is not None:
            self.enqueue([first])


def _fields(batch: store.Batch, size: int, duration: float | None = None, **more) -> dict:
    """The structured fields of a batch's log line (`LOG_FORMAT=json` prints them as keys)."""
    fields = {"account": batch.account, "oa": batch.oa_id, "size": size, "batch": str(batch.id)}
    if duration is not None:
        fields["duration"] = round(duration, 3)
    return fields | more


def _release(engine: Engine, batch: store.Batch, delay_seconds: float) -> None:
    with store.single_statements(engine) as conn:
        store.release_batch(conn, batch, delay_seconds)
