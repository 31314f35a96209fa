"""Prometheus metrics of a `celery worker`, served by the worker's own process.

Every poll and scheduler tick of a worker runs in its one process (greenlets of the gevent
pool, worker.green), so the counters live in that process's default registry and `serve`
answers `http://METRICS_HOST:METRICS_PORT/metrics` from a thread of it. `METRICS_PORT=0` turns
the endpoint off.

Labels carry account names, result codes, error kinds and states: never keys or RefIds, and
OAIds only on `esms_final_failures_total`, because a Zalo token that expired (-124) fails every
message of one OA and nothing else shows which (an account has a handful of OAs, and the error
codes are a short documented list, so the series stay few).
The backlog gauges (and the NOTIFY queue's usage) are read from Postgres by the scheduler tick
(`refresh_backlog`) every `BACKLOG_REFRESH_SECONDS`, and the unpollable rows by its periodic
check (`set_unpollable`), so a scrape costs no query.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from sqlalchemy import Engine

from worker import store
from worker.errors import ProviderError
from worker.settings import Settings

log = logging.getLogger(__name__)

BACKLOG_REFRESH_SECONDS = 10.0

REQUESTS = Counter(
    "esms_requests_total",
    "GetCallback requests by account and result: the provider's Code, or the error kind",
    ["account", "result"],
)
REQUEST_SECONDS = Histogram(
    "esms_request_duration_seconds",
    "GetCallback request latency, from sending to the parsed answer",
    ["account"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2.5, 5, 10),
)
LIMITER_WAIT_SECONDS = Histogram(
    "esms_limiter_wait_seconds",
    "Wait for a slot in the account's shared rate budget before a request",
    ["account"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10),
)
RATE_PER_SECOND = Gauge(
    "esms_rate_per_second",
    "Requests per second the ApiKey's shared limiter allows now (lower after Code 160)",
    ["account"],
)
RATE_CUTS = Counter(
    "esms_rate_cuts_total",
    "Times Code 160 cut the ApiKey's shared request rate (one per congestion event)",
    ["account"],
)
SENDS_RETIMED = Counter(
    "esms_sends_retimed_total",
    "Rate slots given up right before sending: late (the process woke late), window_full (the "
    "send log already held the limit) or rate_changed (a cut after the slot was taken)",
    ["account", "reason"],
)
RESOLVED = Counter(
    "esms_resolved_total",
    "RefIds that reached a final state (sent, failed, rejected by polls; expired by age)",
    ["state"],
)
FINAL_FAILURES = Counter(
    "esms_final_failures_total",
    "Messages a poll made failed or rejected, by account, OA, state and error code (the code "
    "of the ErrorInfo, 'none' without one): -124 on one OA is its Zalo token",
    ["account", "oa_id", "state", "error_code"],
)
REFIDS_POLLED = Counter(
    "esms_refids_polled_total",
    "RefIds carried by GetCallback requests that were answered",
    ["account"],
)
SCHEDULER_LAST_TICK = Gauge(
    "esms_scheduler_last_tick_timestamp_seconds",
    "Unix time of the last scheduler tick this worker ran (beat's heartbeat: it stops moving "
    "when beat stops)",
)
COOLING_OFF = Gauge(
    "esms_cooling_off",
    "Cool-offs after the provider refused keys or an OA, as the last tick saw them: "
    "scope=account is 1 while the account is paused, scope=oa counts its paused OAs",
    ["account", "scope"],
)
NOTIFY_QUEUE_USAGE = Gauge(
    "esms_notify_queue_usage",
    "Fraction of Postgres's NOTIFY queue in use (pg_notification_queue_usage): it grows while "
    "a listener of esms_message_final stops reading, and when full every poll's write fails",
)
WEBHOOK_POSTS = Counter(
    "esms_webhook_posts_total",
    "POSTs of final-status events to FINAL_WEBHOOK_URL by result: ok (2xx), http_<status>, "
    "timeout or unreachable",
    ["result"],
)
WEBHOOK_EVENTS = Counter(
    "esms_webhook_events_total", "Final-status events the webhook's receiver accepted"
)
BATCHES = Counter(
    "esms_batches_total",
    "Poll tasks by outcome: done, failed/no_slot/paused/unknown_account (batch released), stale",
    ["outcome"],
)
TICKS = Counter(
    "esms_scheduler_ticks_total",
    "Scheduler ticks: run, skipped because another tick held the lock, or stale (another tick "
    "ran less than half a tick interval ago: this one waited in the queue)",
    ["result"],
)
BATCHES_QUEUED = Counter(
    "esms_batches_queued_total", "Batches the scheduler claimed and queued", ["account"]
)
BACKLOG_PENDING = Gauge(
    "esms_backlog_pending",
    "Pending messages of a configured account",
    ["account"],
)
BACKLOG_OLDEST_AGE = Gauge(
    "esms_backlog_oldest_pending_age_seconds",
    "Age of the account's oldest pending message (0 when none is pending)",
    ["account"],
)
NOT_FOUND_REQUESTS = Counter(
    "esms_not_found_requests_total",
    "GetCallback requests answered Code 105 (SMSID not found) for the whole request",
    ["account"],
)
UNKNOWN_REFIDS_BUDGET_SHARE = Gauge(
    "esms_unknown_refids_budget_share",
    "Share of this worker's GetCallback requests of the last minute spent on RefIds the "
    "provider does not know: answered Code 105, or polls of RefIds answered 105 before "
    "(worker.notfound). Near NOT_FOUND_BUDGET_SHARE: the sender is inserting RefIds eSMS has "
    "no callback data for (sent without CallbackUrl, or mistyped)",
    ["account"],
)
CLOCK_SKEW_SECONDS = Gauge(
    "esms_clock_skew_seconds",
    "This worker's clock minus the shared clock `reference` (postgres: now(), redis: TIME), "
    "measured at each scheduling tick this worker runs",
    ["reference"],
)
UNPOLLABLE_PENDING = Gauge(
    "esms_unpollable_pending",
    "Pending messages no request can carry: their account is configured on no worker "
    "(reason=account_not_configured) or their oa_id is empty (reason=empty_oa_id)",
    ["account", "reason"],
)
# The label pairs this process has set, so that one whose rows are gone is set to 0, not left
# showing its last count.
_unpollable_seen: set[tuple[str, str]] = set()


_SHARE_WINDOW_SECONDS = 60.0
# Per account: (monotonic second, requests, requests on unknown RefIds), oldest first.
_share_seconds: dict[str, deque[list[float]]] = {}


def count_request(account: str, error: ProviderError | None, *, on_unknown: bool) -> None:
    """Count one GetCallback request by result, and in the share of the last minute's requests
    spent on RefIds the provider does not know."""
    REQUESTS.labels(account, request_result(error)).inc()
    now = float(int(time.monotonic()))
    seconds = _share_seconds.setdefault(account, deque())
    if seconds and seconds[-1][0] == now:
        seconds[-1][1] += 1
        seconds[-1][2] += on_unknown
    else:
        seconds.append([now, 1, float(on_unknown)])
    while seconds and seconds[0][0] <= now - _SHARE_WINDOW_SECONDS:
        seconds.popleft()
    total = sum(entry[1] for entry in seconds)
    UNKNOWN_REFIDS_BUDGET_SHARE.labels(account).set(sum(entry[2] for entry in seconds) / total)


def request_result(error: ProviderError | None) -> str:
    """The `result` label: "100" for an answer, the provider's Code, else the error's kind."""
    if error is None:
        return "100"
    if error.code is not None:
        return str(error.code)
    # ProviderUnavailable -> provider_unavailable: transport errors, timeouts, HTTP 5xx.
    name = type(error).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def set_unpollable(found: Iterable[tuple[str, bool, int]]) -> None:
    """Set `esms_unpollable_pending` from `store.unpollable`'s (account, OAId empty?, count)
    rows. The scheduler counts them every few minutes (worker.scheduler), so the gauge is at most
    that old; the account label is the rows' own `account` value, a name, never a key."""
    counts: dict[tuple[str, str], int] = {}
    for account, blank_oa, count in found:
        labels = (account, "empty_oa_id" if blank_oa else "account_not_configured")
        counts[labels] = counts.get(labels, 0) + count
    for labels in _unpollable_seen - counts.keys():
        UNPOLLABLE_PENDING.labels(*labels).set(0)
    for labels, count in counts.items():
        UNPOLLABLE_PENDING.labels(*labels).set(count)
    _unpollable_seen.update(counts)


def serve(settings: Settings) -> None:
    """Answer /metrics from this process. A port already taken is logged, not fatal: the
    worker's job is polling, and the metrics are only a view of it."""
    if settings.metrics_port == 0:
        return
    try:
        _start_http_server(settings.metrics_port, addr=settings.metrics_host)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d (%s); set METRICS_PORT to a free port, or 0",
            settings.metrics_host, settings.metrics_port, exc.strerror or exc,
        )  # fmt: skip
        return
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)


def refresh_backlog(engine: Engine, settings: Settings) -> None:
    """After a scheduler tick: set the backlog gauges every `BACKLOG_REFRESH_SECONDS`.

    Which tick refreshes is decided by the shared tick counter in Postgres, not by this process:
    ticks land on any worker, so a per-process timer would not spread them.
    A failure only costs a stale gauge; the tick itself is already committed.
    """
    accounts = list(settings.accounts)
    every = max(1, round(BACKLOG_REFRESH_SECONDS / settings.schedule_tick_seconds))
    try:
        with engine.connect() as conn:
            beat = store.heartbeat_age(conn)
            if beat is None or beat.ticks % every != 1 % every:
                return
            backlog = store.pending_backlog(conn, accounts)
            queue_usage = store.notification_queue_usage(conn)
    except Exception as exc:  # noqa: BLE001 - a gauge must never fail the scheduler
        log.warning("metrics: backlog not refreshed: %s", type(exc).__name__)
        return
    NOTIFY_QUEUE_USAGE.set(queue_usage)
    for account in accounts:
        pending, oldest = backlog.get(account, (0, 0.0))
        BACKLOG_PENDING.labels(account).set(pending)
        BACKLOG_OLDEST_AGE.labels(account).set(max(0.0, oldest))


def count_failures(failures: dict[store.Failure, int]) -> None:
    """Count the messages a write made failed or rejected (store.Completed.failures)."""
    for failure, count in failures.items():
        code = "none" if failure.error_code is None else str(failure.error_code)
        FINAL_FAILURES.labels(failure.account, failure.oa_id, failure.state, code).inc(count)


def set_cooling_off(accounts: Iterable[str], paused: set[str], paused_oas: dict[str, list]) -> None:
    """Set `esms_cooling_off` from one tick's view of the cool-offs (worker.cooloff)."""
    for account in accounts:
        COOLING_OFF.labels(account, "account").set(1 if account in paused else 0)
        COOLING_OFF.labels(account, "oa").set(len(paused_oas.get(account, ())))
