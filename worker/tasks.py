"""Celery tasks: thin wrappers that hand plain functions their per-process resources.

`esms.schedule` (run by beat every tick) claims and queues due batches; `esms.poll_batch` polls one
batch; `esms.upkeep` (beat, every few seconds) folds the count deltas and prunes old rows
(worker.upkeep); `esms.webhook` (run by beat every second when FINAL_WEBHOOK_URL is set) posts the
final-status events that are due (worker.webhook).
Task arguments name the batch, account, OAId and size — never credentials — so Flower and
the broker show what is being polled and nothing secret.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Sequence

from celery.signals import worker_ready

from worker import fleet, metrics, poller, runtime, scheduler, upkeep, webhook
from worker.celery import app
from worker.settings import get_settings
from worker.store import Batch


def _enqueue(batches: Sequence[Batch]) -> None:
    for batch in batches:
        poll_batch.apply_async(
            kwargs={
                "batch_id": str(batch.id),
                "account": batch.account,
                "oa_id": batch.oa_id,
                "size": len(batch.ref_ids),
                "kind": batch.kind,
            }
        )


@worker_ready.connect
def _warm_up(**_kwargs) -> None:
    """Open the worker's connections before its first task, not inside it: the first poll would
    otherwise leave late and leave a gap in the rate. Then queue one scheduling tick: a worker
    that starts (or restarts) with a due backlog polls within a second, without waiting for
    beat's next tick. A tick is harmless at any time (the scheduler lock)."""
    runtime.warm_up()
    # Everything imported and connected so far lives as long as the worker: out of the cyclic
    # collector's sight, a full collection no longer walks it and stalls every poll in flight
    # for tens of milliseconds (a poll woken that late gives its rate slot up). No collection
    # first: it would take 64 ms from the first poll to free some 70 objects.
    gc.freeze()
    schedule.apply_async()


# Hard time limits (under the gevent pool a gevent.Timeout raised in the task's greenlet):
# whatever a task waits on that has no deadline of its own (a Postgres whose network path died
# with the connection still open answers nothing, and the server-side statement timeout never
# starts) ends with the task; SQLAlchemy discards a connection interrupted that way instead of
# returning it to the pool. A poll cannot outlive its lease usefully: its write is refused once
# the lease is gone. A tick is one short transaction; twice the statement timeout is plenty.
_POLL_TIME_LIMIT = get_settings().lease_seconds
_TICK_TIME_LIMIT = 2 * get_settings().database_statement_timeout_seconds


@app.task(name="esms.schedule", ignore_result=True, time_limit=_TICK_TIME_LIMIT)
def schedule() -> dict:
    if not runtime.tick_gate().open():
        # Another tick ran less than half a tick ago: this one waited in the queue (workers
        # away, or a second beat) and would only repeat it.
        metrics.TICKS.labels("stale").inc()
        return {"skipped": True}
    fleet.check(runtime.redis_client(), get_settings().accounts)
    report = scheduler.schedule_tick(
        runtime.engine(), get_settings(), _enqueue, runtime.cooloffs(), runtime.notfound()
    )
    return {
        "skipped": report.skipped,
        "initialized": report.initialized,
        "expired": report.expired,
        "batches": len(report.batches),
    }


@app.task(name="esms.poll_batch", ignore_result=True, time_limit=_POLL_TIME_LIMIT)
def poll_batch(batch_id: str, account: str, oa_id: str, size: int, kind: str = "known") -> dict:
    # account, oa_id, size and kind are for people reading Flower; the batch row is the truth.
    result = poller.poll_batch(
        uuid.UUID(batch_id),
        settings=get_settings(),
        engine=runtime.engine(),
        client=runtime.esms_client(),
        limiter=runtime.rate_limiter(),
        cooloffs=runtime.cooloffs(),
        notfound=runtime.notfound(),
        enqueue=_enqueue,
    )
    return {"outcome": result.outcome.value, "size": result.size, "changed": result.changed}


@app.task(name="esms.upkeep", ignore_result=True, time_limit=_TICK_TIME_LIMIT)
def upkeep_task() -> dict:
    report = upkeep.run(runtime.engine(), get_settings())
    return {
        "skipped": report.skipped,
        "folded": report.folded,
        "history_pruned": report.history_pruned,
        "messages_pruned": report.messages_pruned,
        "events_pruned": report.events_pruned,
    }


# A run posts for at most RUN_SECONDS, each POST within its timeout.
_WEBHOOK_TIME_LIMIT = webhook.RUN_SECONDS + 3 * get_settings().final_webhook_timeout_seconds


@app.task(name="esms.webhook", ignore_result=True, time_limit=_WEBHOOK_TIME_LIMIT)
def post_final_events() -> dict:
    done = webhook.deliver(
        runtime.engine(), runtime.webhook_client(), runtime.redis_client(), get_settings()
    )
    return {"delivered": done.delivered, "posts": done.posts, "stopped": done.stopped}
