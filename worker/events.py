"""The final-status feed: every message made final (sent, failed, rejected, expired), in order,
from a cursor; and the channel that announces each one as its transaction commits.

Each statement that makes messages final (a poll's answer, pushes, the expiry sweep; all in
worker.store) inserts one `message_events` row per message in the same statement, and a trigger
(migration 0009) sends `NOTIFY esms_message_final` with the event as JSON for each row: a listener
hears it when the transaction commits, or never if nobody listens then. The table is what makes
the feed durable: a consumer reads it from a cursor and resumes from the last cursor it kept.

Why the order is the writing transaction's id, not the row's identity: identity values are taken
when a row is inserted, and transactions commit in any order, so a reader that delivered every
`id > cursor` could pass id 8 (committed) while id 7 was still uncommitted, and never see 7.
Each event also holds its transaction's id (`pg_current_xact_id()`), and the feed delivers
events in (xid, id) order only below a horizon: the smallest id of a transaction of this database
still running when the reader's statement took its snapshot (store._FEED_HORIZON). Every
transaction with a smaller id has ended by then, and every transaction that has not yet written
gets a larger id, so no event can ever appear behind an event already delivered. The cost is one
column default per event and nothing on the writers' side: no lock they share (a per-commit
lock would make every poll's write wait for the others) and no sequencing step (a second write
of every event, and one more process). The price is on the reader's side: a long transaction in
this database that holds a transaction id holds the feed back until it ends (the NOTIFY channel
is not held back).

A cursor is "XID-ID" (the last event delivered); "0-0" is the start of the feed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import psycopg
from sqlalchemy import Engine

from worker import store

CHANNEL = "esms_message_final"
START = "0-0"
_CURSOR = re.compile(r"(\d+)-(\d+)")
# A follower waits this long for a NOTIFY before it reads again anyway.
IDLE_SECONDS = 1.0
# After a NOTIFY whose event could not be delivered yet (an older transaction still runs):
# read again this soon.
HELD_BACK_SECONDS = 0.05


class BadCursor(ValueError):
    """A cursor that is not XID-ID."""


@dataclass(frozen=True)
class Cursor:
    xid: int
    id: int

    @classmethod
    def parse(cls, text: str) -> Cursor:
        match = _CURSOR.fullmatch(text.strip())
        if match is None:
            raise BadCursor(f"a cursor is XID-ID (as printed in each event), not {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.xid}-{self.id}"


@dataclass(frozen=True)
class Event:
    """One message made final, as the feed delivers it."""

    cursor: Cursor
    at: datetime
    ref_id: str
    account: str
    oa_id: str
    source: str  # poll, push, expiry
    state: str
    send_status: int | None
    error_code: int | None
    total_price: str | None  # digit for digit, as Postgres holds it

    def as_json(self) -> dict:
        return {
            "cursor": str(self.cursor),
            "ref_id": self.ref_id,
            "account": self.account,
            "oa_id": self.oa_id,
            "state": self.state,
            "send_status": self.send_status,
            "error_code": self.error_code,
            "total_price": self.total_price,
            "source": self.source,
            "at": self.at.isoformat(),
        }


def read(engine: Engine, after: Cursor, limit: int = 1000) -> list[Event]:
    """The next events after `after` that can be delivered now, at most `limit`."""
    with store.single_statements(engine) as conn:
        rows = store.events_after(conn, after.xid, after.id, limit)
    return [Event(Cursor(int(xid), event_id), *rest) for xid, event_id, *rest in rows]


def until_now(engine: Engine, after: Cursor, limit: int = 1000) -> Iterator[Event]:
    """Every event after `after` that can be delivered now, read `limit` at a time."""
    while batch := read(engine, after, limit):
        yield from batch
        after = batch[-1].cursor


def end(engine: Engine) -> Cursor:
    """The cursor after the last event that can be delivered now."""
    with store.single_statements(engine) as conn:
        return Cursor(*store.feed_end(conn))


def follow(engine: Engine, after: Cursor, limit: int = 1000) -> Iterator[Event]:
    """Every event after `after`, then each new one as it comes, for ever. Wakes on the
    channel's NOTIFY, and at least every IDLE_SECONDS (an event is delivered only once every
    older transaction has ended, which may be after its NOTIFY)."""
    raw = engine.raw_connection()
    try:
        listener: psycopg.Connection = raw.driver_connection
        listener.autocommit = True
        listener.execute(f"LISTEN {CHANNEL}")
        owed_until = 0.0  # a NOTIFY was heard whose event may not be deliverable yet
        while True:
            batch = read(engine, after, limit)
            yield from batch
            if batch:
                after = batch[-1].cursor
                owed_until = 0.0
            if len(batch) == limit:
                continue
            now = time.monotonic()
            if _wait_for_notice(listener, HELD_BACK_SECONDS if now < owed_until else IDLE_SECONDS):
                owed_until = time.monotonic() + 2 * IDLE_SECONDS
    finally:
        raw.close()


def _wait_for_notice(listener: psycopg.Connection, timeout: float) -> bool:
    """Wait up to `timeout` for a notification, then take every one already there."""
    heard = any(True for _ in listener.notifies(timeout=timeout, stop_after=1))
    if heard:
        for _ in listener.notifies(timeout=0):
            pass
    return heard
