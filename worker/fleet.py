"""The workers as a fleet: which accounts each one has, and saying so when they differ.

Every worker reads its accounts from its own environment. After an account is added or renamed,
a worker not yet restarted polls with the old list: rows of the new name wait for the workers
that have it, and a batch of an account a worker lacks is released by that worker. Each worker
records its account names (never keys) in Redis at each tick it runs, at most once a minute;
the tick then compares the lists of the workers seen in the last five minutes and logs one
warning per distinct difference (and one line when they agree again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable

import redis

log = logging.getLogger(__name__)

_ACCOUNTS = "esms:fleet:accounts"
RECORD_EVERY_SECONDS = 60.0
FORGET_AFTER_SECONDS = 300.0

_last_recorded = -float("inf")
_last_reported: str | None = None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def check(client: redis.Redis, accounts: Iterable[str], name: str | None = None) -> None:
    """Record this worker's accounts and compare them with the fleet's; cheap to call often."""
    global _last_recorded
    now = time.time()
    if now - _last_recorded < RECORD_EVERY_SECONDS:
        return
    _last_recorded = now
    mine = sorted(accounts)
    client.hset(_ACCOUNTS, name or worker_name(), json.dumps({"accounts": mine, "at": now}))
    fleet: dict[str, list[str]] = {}
    for worker, raw in client.hgetall(_ACCOUNTS).items():
        entry = json.loads(raw)
        if now - entry["at"] > FORGET_AFTER_SECONDS:
            client.hdel(_ACCOUNTS, worker)
            continue
        fleet[worker.decode() if isinstance(worker, bytes) else worker] = entry["accounts"]
    _report(fleet)


def _report(fleet: dict[str, list[str]]) -> None:
    global _last_reported
    lists = {tuple(accounts) for accounts in fleet.values()}
    summary = "; ".join(
        f"{worker}: {', '.join(accounts) or '(none)'}" for worker, accounts in sorted(fleet.items())
    )
    if len(lists) > 1:
        if summary != _last_reported:
            _last_reported = summary
            log.warning(
                "workers are configured with different accounts (restart the ones not yet "
                "updated; rows of an account only some workers have wait for those): %s",
                summary,
            )
    elif _last_reported is not None:
        _last_reported = None
        log.info("every worker is configured with the same accounts again: %s", summary)
