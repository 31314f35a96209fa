"""Prometheus metrics: what the pool processes count, served by the worker's main process.

A `celery worker` is one main process and a prefork pool; the polls run in the pool. So the
metrics use prometheus-client's multiprocess mode: at worker start (`prepare`, before the pool
forks) the main process makes a private directory for the pool's counter files, removing those of
workers that died without cleaning up; `serve` then answers
`http://METRICS_HOST:METRICS_PORT/metrics` with the sum over all of them, `process_exited` does
the bookkeeping for a pool process that ends, and `cleanup` removes the directory at shutdown.
`METRICS_PORT=0` turns all of it off; the counters then stay in each process's memory.

Labels carry account names, result codes, error kinds and states: never keys, OAIds or RefIds.
The backlog gauges are read from Postgres by the scheduler tick (`refresh_backlog`) every
`BACKLOG_REFRESH_SECONDS`, so a scrape costs no query.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client import start_http_server as _start_http_server
from sqlalchemy import Engine

from worker import store
from worker.errors import ProviderError
from worker.settings import Settings

log = logging.getLogger(__name__)

BACKLOG_REFRESH_SECONDS = 10.0
_DIR_PREFIX = "esms-metrics-"

# Every metric has labels on purpose: a labelled metric creates its storage at `.labels()`, in
# the pool process, after `prepare` switched prometheus-client to files. (It picks its storage
# class when first imported, which Celery does before any worker signal.)
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
    multiprocess_mode="mostrecent",
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
BATCHES = Counter(
    "esms_batches_total",
    "Poll tasks by outcome: done, failed/no_slot/paused/unknown_account (batch released), stale",
    ["outcome"],
)
TICKS = Counter(
    "esms_scheduler_ticks_total",
    "Scheduler ticks: run, or skipped because another tick held the lock",
    ["result"],
)
BATCHES_QUEUED = Counter(
    "esms_batches_queued_total", "Batches the scheduler claimed and queued", ["account"]
)
# `mostrecent`: the value of whichever pool process refreshed last, not a sum over processes.
BACKLOG_PENDING = Gauge(
    "esms_backlog_pending",
    "Pending messages of a configured account",
    ["account"],
    multiprocess_mode="mostrecent",
)
BACKLOG_OLDEST_AGE = Gauge(
    "esms_backlog_oldest_pending_age_seconds",
    "Age of the account's oldest pending message (0 when none is pending)",
    ["account"],
    multiprocess_mode="mostrecent",
)

_state: dict[str, str] = {}


def request_result(error: ProviderError | None) -> str:
    """The `result` label: "100" for an answer, the provider's Code, else the error's kind."""
    if error is None:
        return "100"
    if error.code is not None:
        return str(error.code)
    # ProviderUnavailable -> provider_unavailable: transport errors, timeouts, HTTP 5xx.
    name = type(error).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def prepare(settings: Settings) -> str | None:
    """In the worker's main process, before the pool forks: count into files from now on."""
    if settings.metrics_port == 0:
        return None
    _remove_orphans()
    path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    # The pool inherits the environment at fork; prometheus-client looks the directory up there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue()
    _state["path"] = path
    return path


def _remove_orphans() -> None:
    """Remove the directories of workers that died without their shutdown (SIGKILL, OOM)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_DIR_PREFIX}*-*")):
        pid = os.path.basename(path)[len(_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def serve(settings: Settings) -> None:
    """Answer /metrics from the main process. A port already taken is logged, not fatal: the
    worker's job is polling, and the metrics are only a view of it."""
    path = _state.get("path")
    if path is None:
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    try:
        _start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d (%s); set METRICS_PORT to a free port, or 0",
            settings.metrics_host, settings.metrics_port, exc.strerror or exc,
        )  # fmt: skip
        return
    log.info(
        "metrics on http://%s:%d/metrics (files in %s)",
        settings.metrics_host, settings.metrics_port, path,
    )  # fmt: skip


def process_exited(pid: int) -> None:
    """A pool process ends: its counters stay (they are totals), its live gauges go."""
    path = _state.get("path")
    if path is not None:
        multiprocess.mark_process_dead(pid, path)


def cleanup() -> None:
    """At worker shutdown, after the pool stopped: the files die with the worker."""
    path = _state.pop("path", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def refresh_backlog(engine: Engine, settings: Settings) -> None:
    """After a scheduler tick: set the backlog gauges every `BACKLOG_REFRESH_SECONDS`.

    Which tick refreshes is decided by the shared tick counter in Postgres, not by this process:
    ticks land on any pool process of any worker, so a per-process timer would not spread them.
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
    except Exception as exc:  # noqa: BLE001 - a gauge must never fail the scheduler
        log.warning("metrics: backlog not refreshed: %s", type(exc).__name__)
        return
    for account in accounts:
        pending, oldest = backlog.get(account, (0, 0.0))
        BACKLOG_PENDING.labels(account).set(pending)
        BACKLOG_OLDEST_AGE.labels(account).set(max(0.0, oldest))
