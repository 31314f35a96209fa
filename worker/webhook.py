"""The outbound webhook: POST every final-status event to FINAL_WEBHOOK_URL, at least once.

Beat queues `esms.webhook` every second on a queue of its own (worker.celery); each run is
`deliver`: it reads the feed (worker.events) after the cursor kept in Postgres under the name
`webhook`, POSTs up to FINAL_WEBHOOK_BATCH_SIZE events as one JSON body, and moves the cursor
only after a 2xx answer. So an event is posted until it is accepted (at least once; a POST whose
answer was lost is posted again, with the same events and `cursor`s, for the receiver to drop),
and in feed order. A failed POST (an error status, a timeout, a refused connection) starts a
backoff kept in Redis: 1 s, doubling at each failure in a row up to
FINAL_WEBHOOK_MAX_BACKOFF_SECONDS; runs during it do nothing. One run at a time (a Redis lock);
no transaction is open while a POST waits.

The body is `{"events": [...]}`, each event as `esms-poller events` prints it. The headers
`X-Esms-Timestamp` (Unix seconds) and `X-Esms-Signature: sha256=<hex>` sign it: HMAC-SHA256 with
FINAL_WEBHOOK_SECRET of `<timestamp>.<body>`. The secret is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

import httpx
import orjson
import redis
from sqlalchemy import Engine

from worker import events, metrics, store
from worker.settings import Settings

log = logging.getLogger(__name__)

CURSOR_NAME = "webhook"
SIGNATURE_HEADER = "X-Esms-Signature"
TIMESTAMP_HEADER = "X-Esms-Timestamp"
FIRST_BACKOFF_SECONDS = 1.0
# One run posts for at most this long, then leaves the rest to the next run.
RUN_SECONDS = 20.0
_LOCK = "esms:webhook:lock"
_BACKOFF = "esms:webhook:backoff"
_FAILURES = "esms:webhook:failures"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Esms-Signature value of `body` sent at `timestamp`."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass(frozen=True)
class Delivery:
    """What one run did: events accepted by the receiver, POSTs made, and why it stopped."""

    delivered: int
    posts: int
    stopped: str  # caught_up | failed | backing_off | busy | time_up | disabled


def deliver(
    engine: Engine, client: httpx.Client, redis_client: redis.Redis, settings: Settings
) -> Delivery:
    """Post the events after the webhook's cursor until caught up, a POST fails or RUN_SECONDS
    pass (see the module's docstring)."""
    if not settings.final_webhook_url or settings.final_webhook_secret is None:
        return Delivery(0, 0, "disabled")
    if redis_client.exists(_BACKOFF):
        return Delivery(0, 0, "backing_off")
    lock = redis_client.lock(
        _LOCK, timeout=RUN_SECONDS + 2 * settings.final_webhook_timeout_seconds
    )
    if not lock.acquire(blocking=False):
        return Delivery(0, 0, "busy")
    try:
        return _run(engine, client, redis_client, settings)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # it expired: the run took longer than its lock, the cursor check kept it safe


def _run(
    engine: Engine, client: httpx.Client, redis_client: redis.Redis, settings: Settings
) -> Delivery:
    secret = settings.final_webhook_secret.get_secret_value().encode()
    delivered = posts = 0
    ends_at = time.monotonic() + RUN_SECONDS
    while time.monotonic() < ends_at:
        with store.single_statements(engine) as conn:
            old = store.cursor_of(conn, CURSOR_NAME)
        batch = events.read(engine, events.Cursor(*old), settings.final_webhook_batch_size)
        if not batch:
            return Delivery(delivered, posts, "caught_up")
        body = orjson.dumps({"events": [event.as_json() for event in batch]})
        posts += 1
        result = _post(client, settings, secret, body)
        metrics.WEBHOOK_POSTS.labels(result).inc()
        if result != "ok":
            _back_off(redis_client, settings, result, len(batch))
            return Delivery(delivered, posts, "failed")
        redis_client.delete(_FAILURES)
        new = (batch[-1].cursor.xid, batch[-1].cursor.id)
        with store.single_statements(engine) as conn:
            if not store.move_cursor(conn, CURSOR_NAME, old, new):
                # Another run moved it (this one outlived its lock): it carries on from there.
                return Delivery(delivered, posts, "busy")
        delivered += len(batch)
        metrics.WEBHOOK_EVENTS.inc(len(batch))
    return Delivery(delivered, posts, "time_up")


def _post(client: httpx.Client, settings: Settings, secret: bytes, body: bytes) -> str:
    """POST one body; "ok" for a 2xx answer, else what went wrong (the metric's `result`)."""
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }
    try:
        response = client.post(
            settings.final_webhook_url,
            content=body,
            headers=headers,
            timeout=settings.final_webhook_timeout_seconds,
        )
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "unreachable"
    if 200 <= response.status_code < 300:
        return "ok"
    return f"http_{response.status_code}"


def _back_off(redis_client: redis.Redis, settings: Settings, result: str, size: int) -> None:
    failures = int(redis_client.incr(_FAILURES))
    redis_client.expire(_FAILURES, 86400)
    seconds = min(
        FIRST_BACKOFF_SECONDS * 2 ** min(failures - 1, 20),
        settings.final_webhook_max_backoff_seconds,
    )
    redis_client.set(_BACKOFF, result, px=int(seconds * 1000))
    # The URL's host only: a URL may carry a token in its path or query.
    host = httpx.URL(settings.final_webhook_url).host
    log.warning(
        "webhook: POST of %d events to %s failed (%s, %d in a row): next try in %.0fs",
        size, host, result, failures, seconds,
        extra={"reason": result, "size": size},
    )  # fmt: skip
