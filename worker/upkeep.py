"""Beat's upkeep, every `UPKEEP_SECONDS`: count tables up to date, old rows pruned.

One run, on whichever worker takes the task, under a session advisory lock (a second run at the
same time returns at once): fold the count deltas the writers left into the count tables
(`store.fold_counts`, docs/scale.md), then delete `message_history` rows older than
`HISTORY_RETENTION_DAYS`, final-status events (`message_events`) older than
`EVENT_RETENTION_DAYS` and, when `MESSAGE_RETENTION_DAYS` is set, final messages resolved
before that, oldest first, `PRUNE_BATCH` rows per statement, each statement its own transaction,
until nothing is left to prune or `PRUNE_BUDGET_SECONDS` have passed. Small statements keep the
locks and the WAL of each short, so the poller's writes never queue behind the pruning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from worker import store
from worker.settings import Settings

log = logging.getLogger(__name__)

UPKEEP_SECONDS = 5.0
PRUNE_BATCH = 5_000
PRUNE_BUDGET_SECONDS = 3.0


@dataclass
class UpkeepReport:
    skipped: bool = False
    folded: int = 0
    history_pruned: int = 0
    messages_pruned: int = 0
    events_pruned: int = 0


def _prune(
    conn: Connection, prune: Callable[[Connection], int], batch: int, deadline: float
) -> int:
    """Run `prune` (one statement deleting at most `batch` rows), each time in its own
    transaction, until it deletes fewer than `batch` or the deadline passes; the rows deleted."""
    total = 0
    while True:
        with conn.begin():
            deleted = prune(conn)
        total += deleted
        if deleted < batch or time.monotonic() >= deadline:
            return total


def run(
    engine: Engine,
    settings: Settings,
    *,
    batch: int = PRUNE_BATCH,
    budget_seconds: float = PRUNE_BUDGET_SECONDS,
) -> UpkeepReport:
    """One upkeep run (see the module's docstring), on one connection of the pool: the polls
    share that pool."""
    report = UpkeepReport()
    with engine.connect() as conn:
        with conn.begin():
            locked = store.try_upkeep_lock(conn)
        if not locked:
            report.skipped = True
            return report
        try:
            with conn.begin():
                report.folded = store.fold_counts(conn) or 0
            deadline = time.monotonic() + budget_seconds
            if settings.message_retention_days is not None:
                days = settings.message_retention_days
                report.messages_pruned = _prune(
                    conn, lambda c: store.prune_messages(c, days, batch), batch, deadline
                )
            days = settings.history_retention_days
            report.history_pruned = _prune(
                conn, lambda c: store.prune_history(c, days, batch), batch, deadline
            )
            days = settings.event_retention_days
            report.events_pruned = _prune(
                conn, lambda c: store.prune_events(c, days, batch), batch, deadline
            )
        finally:
            with conn.begin():
                store.upkeep_unlock(conn)
    if report.history_pruned or report.messages_pruned or report.events_pruned:
        log.info(
            "upkeep: pruned %d history rows, %d final messages and %d events past retention",
            report.history_pruned,
            report.messages_pruned,
            report.events_pruned,
        )
    return report
