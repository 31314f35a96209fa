"""The messages store: the one module that talks to Postgres. Every query of the daemon is here.

Work is leased, not locked across I/O: the scheduler claims due pending rows with
`FOR UPDATE SKIP LOCKED`, writes one `poll_batches` row per request it will make and points the rows
at it (`lease_id`), pushing their `next_poll_at` to the lease's expiry, and commits. A worker then
calls the provider with no transaction open and finishes the batch in one short transaction:
bookkeeping and backoff for the batch's rows, then the merge. If the worker dies, nothing is to
undo: the rows fall due again when the lease runs out.

`merge_callbacks` is the single place provider data enters `messages`; its rules come from
`worker.merge`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import TYPE_CHECKING

import orjson
from sqlalchemy import Connection, Engine, create_engine, text

from worker.merge import (
    FINAL_STATES,
    State,
    derive_state,
    most_advanced,
    record_rank,
    sql_status_rank,
)
from worker.records import CallbackRecord
from worker.settings import Settings

if TYPE_CHECKING:  # only annotations: importing it would bring Redis into every store user
    from worker.notfound import ClaimLimits


def single_statements(engine: Engine) -> Connection:
    """A connection for work that is one statement at a time, each atomic by itself: autocommit
    spares the BEGIN and COMMIT round trips of a transaction."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


# TCP keepalives: a connection whose peer went away without a word (a host that died, a
# failover that moved the address) is given up after 10 s idle + 3 probes 5 s apart instead of
# the kernel's two hours; tcp_user_timeout (25 s) does the same for data sent and never
# acknowledged. (Configured, not measured here: the blackhole tests' proxy acknowledges
# everything, docs/reliability.md.)
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,
}


def make_engine(
    settings: Settings,
    *,
    pool_size: int = 5,
    max_overflow: int = 2,
    for_polling: bool = False,
    application_name: str = "esms-poller",
) -> Engine:
    """The engine of a program, with deadlines on everything that can wait: connecting
    (DATABASE_CONNECT_TIMEOUT_SECONDS), each statement (DATABASE_STATEMENT_TIMEOUT_SECONDS, on
    the server), each lock (DATABASE_LOCK_TIMEOUT_SECONDS), a transaction left open (twice the
    statement timeout), TCP keepalives. A server that stops answering while the connection looks
    open (a dropped network path) is not caught by the server-side timeouts: the worker's Celery
    time limits end such a task, and SQLAlchemy then discards the connection (worker.tasks).

    `for_polling` is the worker's: its writes are polls and claims, which a lost commit cannot
    make wrong (a batch whose write is lost keeps its lease and is polled again when the lease
    ends), so they commit without waiting for the WAL flush (`synchronous_commit=off`); and it
    does not ping each connection before use: a connection that died with its server fails one
    statement, the pool drops every connection it holds, and the batch is polled again.

    `application_name` names the program's sessions in `pg_stat_activity` (esms-worker,
    esms-receiver, esms-poller for the CLI), so an operator sees who holds a connection."""
    statement_ms = int(settings.database_statement_timeout_seconds * 1000)
    server = {
        "statement_timeout": statement_ms,
        "lock_timeout": int(settings.database_lock_timeout_seconds * 1000),
        "idle_in_transaction_session_timeout": 2 * statement_ms,
        # Every statement here is short, but beside millions of final rows the planner's cost
        # estimates pass jit_above_cost and the tick's statements were compiled first: 7.5 ms of
        # JIT for an index scan of 0.02 ms (docs/scale.md).
        "jit": "off",
    }
    if for_polling:
        server["synchronous_commit"] = "off"
    options = " ".join(f"-c {name}={value}" for name, value in server.items())
    return create_engine(
        settings.sqlalchemy_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=not for_polling,
        pool_recycle=1800,
        # A checkout waits for a free connection at most this long, then fails its task.
        pool_timeout=settings.database_connect_timeout_seconds * 2,
        hide_parameters=True,
        connect_args={
            "connect_timeout": settings.database_connect_timeout_seconds,
            "application_name": application_name,
            "options": options,
            **_KEEPALIVES,
        },
    )


@dataclass(frozen=True)
class Batch:
    """One GetCallback request to make: one account, one OAId, at most the batch size of RefIds."""

    id: uuid.UUID
    account: str
    oa_id: str
    ref_ids: tuple[str, ...]
    # known | new | lone | half: see _CLAIM_BATCHES and worker.notfound.
    kind: str = "known"


# --- counts of final rows (migration 0008) ----------------------------------------------------

# The operator's views and `status` do not count final rows: every statement here that makes a
# row final (merge, expiry), revives an expired one (repoll) or deletes one (retention) also
# inserts what it changed into `message_count_deltas`, +n or -n per (UTC hour of resolved_at,
# account, OA, template, state, error code), in the same transaction. Inserts only, so no two
# writers wait for one another; `fold_counts` (beat) adds the deltas to `message_totals` and
# `resolved_hourly_counts`, and the views read both plus the deltas not yet folded.


def _count_deltas(rows: str) -> str:
    """The INSERT of the deltas of `rows`, a query with the columns account, oa_id, zns_temp_id,
    state, error_code, resolved_at, total_price and n (+1 for a row counted, -1 for one no longer
    counted as it was)."""
    return f"""
        INSERT INTO message_count_deltas (hour, account, oa_id, zns_temp_id, state, error_code,
                                          messages, total_price)
        SELECT date_trunc('hour', resolved_at, 'UTC'), account, oa_id, zns_temp_id, state,
               error_code, sum(n), COALESCE(sum(n * total_price), 0)
        FROM ({rows}) AS d
        GROUP BY 1, 2, 3, 4, 5, 6"""


# In the merge (`changed`): a row made final counts in its new key; an expired row that took a
# final report leaves its old one.
_COUNT_MERGED = _count_deltas(
    """
            SELECT account, oa_id, zns_temp_id, new_state AS state, error_code, resolved_at,
                   total_price, 1 AS n
            FROM changed WHERE apply AND new_state <> 'pending'
            UNION ALL
            SELECT account, oa_id, old_zns_temp_id, old_state, old_error_code, old_resolved_at,
                   old_total_price, -1
            FROM changed WHERE apply AND old_state <> 'pending'"""
)
# In `repoll` (`changed`): an expired row back to pending leaves the counts of final rows.
_COUNT_REVIVED = _count_deltas(
    """
            SELECT account, oa_id, zns_temp_id, old_state AS state, error_code, resolved_at,
                   total_price, -1 AS n
            FROM changed WHERE old_state = 'expired'"""
)


# --- scheduling -------------------------------------------------------------------------------

_SCHEDULER_LOCK = 0x65736D73  # "esms": one scheduler tick at a time, however many beats run.

_TRY_SCHEDULER_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")

_INITIALIZE_NEW = text(
    """
    UPDATE messages SET next_poll_at = created_at + make_interval(secs => :interval)
    WHERE ref_id IN (
        SELECT ref_id FROM messages
        WHERE state = 'pending' AND next_poll_at IS NULL
        LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)

# A pending row expires once it is past its maximum age (from created_at, or from repolled_at
# for a row an operator revived) AND has been polled since then: its backoff never schedules a
# poll after that point (_next_poll_sql), so a row the poller could reach gets one last look
# first, and an outage longer than the maximum age expires nothing unpolled. A row a request
# holds (a lease not yet run out) is left to that request. Rows no request can carry (no OAId,
# an account not configured) expire at the age alone.
_EXPIRE_OLD = text(
    f"""
    WITH expired AS (
        UPDATE messages
        SET state = 'expired', resolved_at = now(), updated_at = now(), next_poll_at = NULL,
            lease_id = NULL
        WHERE ref_id IN (
            SELECT ref_id FROM messages
            WHERE state = 'pending' AND created_at <= now() - make_interval(secs => :max_age)
              AND (repolled_at IS NULL OR repolled_at <= now() - make_interval(secs => :max_age))
              AND (lease_id IS NULL OR next_poll_at <= now())
              AND (last_polled_at >= COALESCE(repolled_at, created_at)
                                     + make_interval(secs => :max_age)
                   OR oa_id = '' OR NOT (account = ANY(:accounts)))
            LIMIT :limit FOR UPDATE SKIP LOCKED)
        RETURNING ref_id, send_status, account, oa_id, zns_temp_id, error_code, total_price,
                  resolved_at
    ), counted AS ({
        _count_deltas(
            "SELECT account, oa_id, zns_temp_id, 'expired' AS state, error_code, resolved_at, "
            "total_price, 1 AS n FROM expired"
        )
    }), events AS (
        INSERT INTO message_events (ref_id, account, oa_id, source, state, send_status,
                                    error_code, total_price)
        SELECT ref_id, account, oa_id, 'expiry', 'expired', send_status, error_code, total_price
        FROM expired
    )
    INSERT INTO message_history (ref_id, source, old_state, new_state, old_send_status,
                                 new_send_status)
    SELECT ref_id, 'expiry', 'pending', 'expired', send_status, send_status FROM expired
    """
)

_DROP_LAPSED_BATCHES = text("DELETE FROM poll_batches WHERE lease_expires_at <= now()")

_INFLIGHT = text(
    "SELECT account, count(*) FROM poll_batches WHERE lease_expires_at > now() GROUP BY account"
)

_INSERT_BATCHES = text(
    """
    INSERT INTO poll_batches (id, account, oa_id, ref_ids, lease_expires_at, kind, parked_for)
    SELECT id, :account, oa_id, string_to_array(ref_ids, chr(31)),
           now() + make_interval(secs => :lease), kind, parked_for
    FROM unnest(CAST(:ids AS uuid[]), CAST(:oa_ids AS text[]), CAST(:ref_ids AS text[]),
                CAST(:kinds AS text[]), CAST(:parked_for AS uuid[]))
         AS b(id, oa_id, ref_ids, kind, parked_for)
    """
)

# The rows are named by the batches just inserted: only the batch ids travel. Locked in key
# order first, as every writer of several rows here does, so two writers cannot deadlock.
_LEASE_ROWS = text(
    """
    WITH locked AS (
        SELECT m.ref_id, b.id AS batch_id
        FROM poll_batches AS b, unnest(b.ref_ids) AS r(ref_id), messages AS m
        WHERE b.id = ANY(CAST(:ids AS uuid[])) AND m.ref_id = r.ref_id
          AND (CAST(:from_batch AS uuid) IS NULL OR m.lease_id = CAST(:from_batch AS uuid))
        ORDER BY m.ref_id
        FOR UPDATE OF m
    )
    UPDATE messages AS m
    SET lease_id = l.batch_id, next_poll_at = now() + make_interval(secs => :lease)
    FROM locked AS l
    WHERE m.ref_id = l.ref_id
    """
)


# A tick's claim for one account, in one statement: the oldest due rows, grouped per OAId and
# kind into batches in due order, the oldest :wanted batches chosen, their rows locked (SKIP
# LOCKED: a row another transaction holds waits for the next tick), leased, and the batches
# recorded with the rows actually leased. Kinds keep RefIds the provider may not know away from
# those it answered for (worker.notfound): `known` rows go :batch_size to a batch, `new` rows
# (never answered, no push either) :new_size when that is smaller (else they count as known:
# an account whose RefIds are all found pays nothing for the distinction), `lone` rows
# (answered Code 105 alone) one to a batch; at most :new_limit batches of new rows and
# :lone_limit of lone ones per tick.
# Candidates are the rows with a next poll time
# (only pending rows have one; the lock re-checks the state, and migration 0005 says why the
# query does not), read unlocked, up to twice the rows wanted, so that an OA whose due rows
# straddle the cut still fills its batches; when even that many are due, a short batch may be
# short only because the cut left its OA's other rows out, so short batches then come after
# every full one (a big backlog goes out in full requests; a small OA's few rows go as soon as
# the backlog is below twice a tick's worth). A short batch made only of rows that may wait for
# more (POLL_BATCH_FILL_SECONDS) is not taken.
_CLAIM_BATCHES = text(
    """
    WITH candidates AS (
        SELECT ref_id, oa_id, next_poll_at,
               CASE WHEN not_found_count > 0 THEN 'lone'
                    WHEN poll_count = 0 AND send_status IS NULL AND :new_size < :batch_size
                        THEN 'new'
                    ELSE 'known' END AS kind,
               poll_count = 0 AND next_poll_at > now() - make_interval(secs => :fill) AS may_wait
        FROM messages
        WHERE account = :account AND next_poll_at <= now()
          AND oa_id <> '' AND NOT (oa_id = ANY(:skip_oas))
        ORDER BY next_poll_at
        LIMIT :candidates
    ), sized AS (
        SELECT *, CASE kind WHEN 'known' THEN :batch_size WHEN 'new' THEN :new_size ELSE 1 END
                      AS full_size
        FROM candidates
    ), chunks AS (
        SELECT ref_id, oa_id, kind, full_size, next_poll_at, may_wait,
               (row_number() OVER (PARTITION BY oa_id, kind ORDER BY next_poll_at, ref_id) - 1)
                   / full_size AS chunk,
               count(*) OVER () = :candidates AS truncated
        FROM sized
    ), batches AS (
        SELECT oa_id, kind, chunk, min(next_poll_at) AS oldest, count(*) AS size,
               min(full_size) AS full_size, bool_and(may_wait) AS may_wait,
               bool_or(truncated) AS truncated, array_agg(ref_id) AS ref_ids,
               row_number() OVER (PARTITION BY kind ORDER BY min(next_poll_at)) AS nth_of_kind
        FROM chunks
        GROUP BY oa_id, kind, chunk
    ), chosen AS MATERIALIZED (
        SELECT gen_random_uuid() AS id, oa_id, kind, ref_ids, oldest, chunk,
               truncated AND size < full_size AS maybe_cut
        FROM batches
        WHERE (size >= full_size OR NOT may_wait)
          AND (kind <> 'lone' OR nth_of_kind <= :lone_limit)
          AND (kind <> 'new' OR nth_of_kind <= :new_limit)
        ORDER BY maybe_cut, oldest, oa_id, kind, chunk
        LIMIT :wanted
    ), members AS MATERIALIZED (
        -- Two narrow columns: FOR UPDATE below carries each joined row whole, and a row of
        -- `chosen` holds its batch's whole RefId array.
        SELECT r.ref_id, c.id AS batch_id
        FROM chosen AS c CROSS JOIN unnest(c.ref_ids) AS r(ref_id)
    ), locked AS (
        SELECT m.ref_id, w.batch_id
        FROM members AS w
        JOIN messages AS m ON m.ref_id = w.ref_id
        WHERE m.state = 'pending' AND m.next_poll_at <= now()
        FOR UPDATE OF m SKIP LOCKED
    ), leased AS (
        UPDATE messages AS m
        SET lease_id = l.batch_id, next_poll_at = now() + make_interval(secs => :lease)
        FROM locked AS l
        WHERE m.ref_id = l.ref_id
        RETURNING m.ref_id, l.batch_id
    ), recorded AS (
        INSERT INTO poll_batches (id, account, oa_id, ref_ids, lease_expires_at, kind)
        SELECT c.id, :account, c.oa_id, array_agg(l.ref_id ORDER BY l.ref_id),
               now() + make_interval(secs => :lease), c.kind
        FROM leased AS l JOIN chosen AS c ON c.id = l.batch_id
        GROUP BY c.id, c.oa_id, c.kind
        RETURNING id, oa_id, ref_ids, kind
    )
    SELECT r.id, r.oa_id, r.ref_ids, r.kind
    FROM recorded AS r JOIN chosen AS c ON c.id = r.id
    ORDER BY c.maybe_cut, c.oldest, c.oa_id, c.kind, c.chunk
    """
)


def claim_batches(
    conn: Connection,
    account: str,
    wanted: int,
    batch_size: int,
    lease_seconds: float,
    skip_oas: Sequence[str] = (),
    fill_seconds: float = 0,
    *,
    limits: ClaimLimits | None = None,
) -> list[Batch]:
    """Claim and lease up to `wanted` batches of the account's due rows, oldest first: one OAId
    and one kind each (see _CLAIM_BATCHES), at most `batch_size` RefIds, skipping the OAs in
    `skip_oas`; `fill_seconds` is the batch-fill wait. `limits` (worker.notfound) sizes and
    counts the batches of RefIds the provider may not know; without them every RefId counts as
    known. The batches come in the order they should be sent."""
    if wanted <= 0:
        return []
    new_size = min(limits.new_size, batch_size) if limits else batch_size
    params = {
        "account": account,
        "wanted": wanted,
        "batch_size": batch_size,
        "new_size": max(1, new_size),
        "new_limit": limits.new_limit if limits and limits.new_limit is not None else wanted,
        "lone_limit": limits.lone_limit if limits else wanted,
        "candidates": 2 * wanted * batch_size,
        "lease": lease_seconds,
        "skip_oas": list(skip_oas),
        "fill": fill_seconds,
    }
    return [
        Batch(batch_id, account, oa_id, tuple(ref_ids), kind)
        for batch_id, oa_id, ref_ids, kind in conn.execute(_CLAIM_BATCHES, params)
    ]


_UNPOLLABLE = text(
    """
    SELECT account, oa_id = '' AS blank_oa, count(*) FROM messages
    WHERE state = 'pending' AND (oa_id = '' OR NOT (account = ANY(:accounts)))
    GROUP BY 1, 2
    """
)


def unpollable(conn: Connection, accounts: Sequence[str]) -> list[tuple[str, bool, int]]:
    """Pending rows no request can carry: (account, OAId empty?, count) for accounts that are not
    configured or rows without an OAId. They wait, untouched, until they expire."""
    return [tuple(row) for row in conn.execute(_UNPOLLABLE, {"accounts": list(accounts)})]


_HEARTBEAT = text(
    """
    INSERT INTO scheduler_heartbeat (id, last_tick_at, ticks) VALUES (1, now(), 1)
    ON CONFLICT (id) DO UPDATE SET last_tick_at = now(), ticks = scheduler_heartbeat.ticks + 1
    """
)


def heartbeat(conn: Connection) -> None:
    """Record that a scheduler tick ran now."""
    conn.execute(_HEARTBEAT)


def try_scheduler_lock(conn: Connection) -> bool:
    """Take the transaction-scoped scheduler lock, or learn another tick holds it."""
    return bool(conn.execute(_TRY_SCHEDULER_LOCK, {"key": _SCHEDULER_LOCK}).scalar())


def initialize_new(conn: Connection, first_poll_seconds: float, limit: int = 50_000) -> int:
    """Give rows the sender just inserted their first poll time: created_at + `first_poll_seconds`
    (the poll interval, or the push grace when that is longer)."""
    result = conn.execute(_INITIALIZE_NEW, {"interval": first_poll_seconds, "limit": limit})
    return result.rowcount


def expire_old(
    conn: Connection, max_age_seconds: float, accounts: Sequence[str], limit: int = 50_000
) -> int:
    """Give up on pending rows past the maximum age that were polled once more at that age (or
    that no request can carry: see _EXPIRE_OLD): state `expired`, not polled again, though a
    final report that arrives later (poll or push) still replaces it.

    The age counts from `created_at`, or from `repolled_at` for a message an operator revived."""
    params = {"max_age": max_age_seconds, "accounts": list(accounts), "limit": limit}
    return conn.execute(_EXPIRE_OLD, params).rowcount


def drop_lapsed_batches(conn: Connection) -> int:
    return conn.execute(_DROP_LAPSED_BATCHES).rowcount


def inflight_batches(conn: Connection) -> dict[str, int]:
    return {account: count for account, count in conn.execute(_INFLIGHT)}


def _insert_batches(
    conn: Connection,
    account: str,
    batches: Sequence[Batch],
    lease_seconds: float,
    parked_for: Sequence[uuid.UUID | None] | None = None,
) -> None:
    conn.execute(
        _INSERT_BATCHES,
        {
            "account": account,
            "lease": lease_seconds,
            "ids": [batch.id for batch in batches],
            "oa_ids": [batch.oa_id for batch in batches],
            # RefIds travel as one unit-separator-joined string per batch: Postgres has no
            # ragged arrays, and chr(31) cannot occur in an SMSID we would send.
            "ref_ids": ["\x1f".join(batch.ref_ids) for batch in batches],
            "kinds": [batch.kind for batch in batches],
            "parked_for": list(parked_for) if parked_for else [None] * len(batches),
        },
    )


def lease_batches(
    conn: Connection,
    account: str,
    batches: Sequence[Batch],
    lease_seconds: float,
    from_batch: uuid.UUID | None = None,
    parked_for: Sequence[uuid.UUID | None] | None = None,
) -> None:
    """Record `batches` (known RefIds) and point their rows at them until the lease runs out;
    with `from_batch`, only rows that batch still holds; `parked_for` (one per batch, or None)
    marks a batch leased but not sent, waiting for the answer to that batch."""
    if not batches:
        return
    _insert_batches(conn, account, batches, lease_seconds, parked_for)
    conn.execute(
        _LEASE_ROWS,
        {"ids": [batch.id for batch in batches], "lease": lease_seconds, "from_batch": from_batch},
    )


def _next_poll_sql(
    row: str,
    base: str,
    max_interval: str,
    max_age: str,
    count: str = "poll_count",
    growth: int = 2,
) -> str:
    """When a polled row is due again: its backoff (`base` times `growth` per poll counted in
    `count`, at most `max_interval`), but never after the end of its maximum age, so that the
    expiry sweep finds every row looked at once more at that age (an outage does not expire rows
    unpolled)."""
    steps = 30 if growth == 2 else 15
    backoff = (
        f"now() + make_interval(secs => LEAST("
        f"{base} * power({growth}, LEAST({row}.{count}, {steps})), {max_interval}))"
    )
    deadline = f"COALESCE({row}.repolled_at, {row}.created_at) + make_interval(secs => {max_age})"
    return f"CASE WHEN {deadline} > now() THEN LEAST({backoff}, {deadline}) ELSE {backoff} END"


# --- one batch's life in a worker -------------------------------------------------------------

_LOAD_BATCH = text(
    """
    SELECT account, oa_id, ref_ids, kind,
           lease_expires_at > now() + make_interval(secs => :min_remaining) AS long_enough
    FROM poll_batches
    WHERE id = :id AND lease_expires_at > now()
    """
)

# The pending rows a batch (:id, its RefIds :ref_ids as a JSON array) still holds, locked in
# key order as every writer of several rows here locks them, so two writers cannot deadlock.
_LOCK_LEASED_ROWS = """
        SELECT ref_id, not_found_count FROM messages
        WHERE ref_id IN (SELECT jsonb_array_elements_text(CAST(:ref_ids AS jsonb)))
          AND lease_id = :id AND state = 'pending'
        ORDER BY ref_id
        FOR UPDATE
    """

# One statement, so that it is atomic without a transaction around it.
_RELEASE_BATCH = text(
    f"""
    WITH locked AS ({_LOCK_LEASED_ROWS}), released AS (
        UPDATE messages AS m
        SET lease_id = NULL, next_poll_at = now() + make_interval(secs => :delay)
        FROM locked AS l
        WHERE m.ref_id = l.ref_id
    )
    DELETE FROM poll_batches WHERE id = :id
    """
)


def load_batch(conn: Connection, batch_id: uuid.UUID, min_remaining_seconds: float) -> Batch | None:
    """The batch, if its lease still has `min_remaining_seconds` to run; else None.

    A batch that started too late to finish within its lease is released on the spot, its rows
    due now, instead of leaving them claimed until the lease runs out."""
    row = conn.execute(
        _LOAD_BATCH, {"id": batch_id, "min_remaining": min_remaining_seconds}
    ).first()
    if row is None:
        return None
    account, oa_id, ref_ids, kind, long_enough = row
    batch = Batch(batch_id, account, oa_id, tuple(ref_ids), kind)
    if not long_enough:
        release_batch(conn, batch, 0)
        return None
    return batch


@dataclass(frozen=True)
class Failure:
    """Messages made failed or rejected, counted per account, OA, state and error code (the
    `esms_final_failures_total` metric: a spike of -124 on one OA is its expired Zalo token)."""

    account: str
    oa_id: str
    state: str
    error_code: int | None


@dataclass(frozen=True)
class Completed:
    """What finishing a batch did: rows whose data changed, rows made final by state, rows of
    the lease the provider answered for the first time (evidence that it knows its RefIds), and
    the rows made failed or rejected by account, OA and error code."""

    changed: int
    resolved: dict[str, int]
    first_answers: int = 0
    failures: dict[Failure, int] = field(default_factory=dict)


def complete_batch(
    conn: Connection, batch: Batch, records: Sequence[CallbackRecord], settings: Settings
) -> Completed:
    """After a successful answer, in one statement: back off the batch's rows, merge what came
    (one history row per changed row), end the lease.

    Items for RefIds this batch did not ask for are ignored.
    """
    answered = {row["ref_id"]: row for row in _merge_rows(records)}
    rows = [answered.get(ref_id) or {"ref_id": ref_id} for ref_id in batch.ref_ids]
    return _apply_reports(
        conn, rows, source="poll", lease=batch.id, batch_id=batch.id, settings=settings
    )


_TAKE_BATCH = text(
    "DELETE FROM poll_batches WHERE id = :id AND lease_expires_at > now() RETURNING id"
)


def search_halves(conn: Connection, batch: Batch, lease_seconds: float) -> Batch | None:
    """Replace a leased batch the provider answered Code 105 by its two halves, each with a new
    lease: the first to be sent (returned), the second parked: leased but not sent, for the
    first's answer to decide (`parked_batch`). None if the batch's lease is gone (its rows may
    belong to another request by now, so they are not touched)."""
    if conn.execute(_TAKE_BATCH, {"id": batch.id}).first() is None:
        return None
    middle = len(batch.ref_ids) // 2
    first, parked = (
        Batch(uuid.uuid4(), batch.account, batch.oa_id, part, "half")
        for part in (batch.ref_ids[:middle], batch.ref_ids[middle:])
    )
    lease_batches(conn, batch.account, [first, parked], lease_seconds, batch.id, [None, first.id])
    return first


_PARKED_BATCH = text(
    """
    SELECT id, account, oa_id, ref_ids, kind FROM poll_batches
    WHERE parked_for = :sibling AND lease_expires_at > now()
    """
)


def parked_batch(conn: Connection, sibling_id: uuid.UUID) -> Batch | None:
    """The half parked until the answer to batch `sibling_id`, if its lease still runs."""
    row = conn.execute(_PARKED_BATCH, {"sibling": sibling_id}).first()
    if row is None:
        return None
    batch_id, account, oa_id, ref_ids, kind = row
    return Batch(batch_id, account, oa_id, tuple(ref_ids), kind)


_MARK_NOT_FOUND = text(
    f"""
    WITH locked AS ({_LOCK_LEASED_ROWS}), marked AS (
        UPDATE messages AS m
        SET not_found_count = m.not_found_count + 1, lease_id = NULL,
            last_polled_at = CASE WHEN :polled THEN now() ELSE m.last_polled_at END,
            next_poll_at = {
        _next_poll_sql("m", ":base", ":lone_max_interval", ":max_age", "not_found_count", 4)
    }
        FROM locked AS l
        WHERE m.ref_id = l.ref_id
        RETURNING l.not_found_count AS before
    ), lease AS (
        DELETE FROM poll_batches WHERE id = :id
    )
    SELECT count(*) FILTER (WHERE before = 0) FROM marked
    """
)


def mark_not_found(conn: Connection, batch: Batch, settings: Settings, *, polled: bool) -> int:
    """End the lease of a batch whose RefIds the provider does not know (one RefId answered
    Code 105 alone, or inferred by a search): each is polled alone from now on, on its own
    backoff (`POLL_INTERVAL_SECONDS`, then 4 times longer at each 105, up to
    `NOT_FOUND_MAX_INTERVAL_SECONDS`, never after its maximum age); `polled` (it was sent, not
    inferred) counts it as polled without data. Returns how many were not marked before."""
    params = {
        "polled": polled,
        "id": batch.id,
        "ref_ids": _json(batch.ref_ids),
        "base": settings.poll_interval_seconds,
        "lone_max_interval": settings.not_found_max_interval_seconds,
        "max_age": settings.message_max_age_seconds,
    }
    return conn.execute(_MARK_NOT_FOUND, params).scalar_one()


def release_batch(conn: Connection, batch: Batch, delay_seconds: float) -> None:
    """End the lease without data: the rows fall due again after `delay_seconds`."""
    conn.execute(
        _RELEASE_BATCH, {"id": batch.id, "ref_ids": _json(batch.ref_ids), "delay": delay_seconds}
    )


# --- the merge --------------------------------------------------------------------------------

# Column name -> SQL type in the JSON recordset.
_MERGED_COLUMNS: dict[str, str] = {
    "send_status": "int",
    "send_success": "int",
    "send_failed": "int",
    "total_receiver": "int",
    "total_sent": "int",
    "type_id": "int",
    "telco_id": "int",
    "total_price": "numeric",
    "request_id": "text",
    "phone_number": "text",
    "callback_url": "text",
    "partner_ids": "text",
    "error_info": "text",
    "zns_temp_id": "text",
    "error_code": "int",
    "state": "text",
}
# The batch travels as one JSON array of objects: psycopg dumps a text array element by element
# through regular expressions, which cost more CPU than the whole rest of a poll; one JSON string
# costs almost nothing. Prices go as strings, so numeric receives them digit for digit.
_RECORDSET_COLUMNS = ", ".join(
    ["ref_id text", "rank int"] + [f"{name} {kind}" for name, kind in _MERGED_COLUMNS.items()]
)
_RECORD_FIELDS = {field.name for field in fields(CallbackRecord)}
_RECORD_COLUMNS = [name for name in _MERGED_COLUMNS if name in _RECORD_FIELDS]
_FINAL_LIST = ", ".join(f"'{state}'" for state in sorted(FINAL_STATES - {State.EXPIRED}))
_POLL_FINAL_STATES = tuple(sorted(FINAL_STATES - {State.EXPIRED}))


def _kept(name: str) -> str:
    """The value a report leaves in column `name` (v: the report, o: the row): a field the report
    lacks never erases what is known; the error code goes with the ErrorInfo it was read from;
    the state is the report's (merge.derive_state)."""
    if name == "state":
        return "v.state"
    if name == "error_code":
        return "CASE WHEN v.error_info IS NULL THEN o.error_code ELSE v.error_code END"
    return f"COALESCE(v.{name}, o.{name})"


_OLD_DATA = ", ".join(f"o.{name}" for name in _MERGED_COLUMNS)
_KEPT_DATA = ", ".join(_kept(name) for name in _MERGED_COLUMNS)
_IS_FINAL = f"x.state IN ({_FINAL_LIST})"

# Provider data in one statement, one new version of each row: a poll's answer (with `:lease`,
# the batch whose lease it ends) or pushes (`:lease` NULL). One JSON recordset holds every RefId
# of the batch, with the answer's data where it has some (`rank` NULL where not), so the plan
# walks it once (a LEFT JOIN of the answer to the batch's RefIds was planned as a nested loop
# that rescanned the answer for every row). `x` locks the rows (in key order, as every writer
# here does, so two writers cannot deadlock) and decides per row whether this batch leased it
# (`mine`: poll bookkeeping and backoff) and whether the report moves its data forward (`apply`,
# the rules of worker.merge): a pending row takes a report ranked at least as far along as what
# it holds; an expired row (our own verdict, not the provider's) takes a final report; the other
# final rows take nothing. Locking first means `apply` is judged on the row as it is when locked,
# even if a push changed it since this statement's snapshot. A polled row's next poll never
# falls after the end of its maximum age, so every row is looked at once more before it expires
# (`expire_old`).
_APPLY_REPORTS = text(
    f"""
    WITH x AS (
        SELECT v.ref_id, COALESCE(o.lease_id = CAST(:lease AS uuid), false) AS mine,
               o.poll_count = 0 AND o.send_status IS NULL AS never_answered,
               o.state AS old_state, o.send_status AS old_send_status,
               o.zns_temp_id AS old_zns_temp_id, o.error_code AS old_error_code,
               o.total_price AS old_total_price, o.resolved_at AS old_resolved_at,
               (v.rank IS NOT NULL AND v.rank >= {sql_status_rank("o.send_status")}
                AND (o.state = 'pending' OR v.state IN ({_FINAL_LIST}))
                AND ({_OLD_DATA}) IS DISTINCT FROM ({_KEPT_DATA})) AS apply,
               {", ".join(f"{_kept(name)} AS {name}" for name in _MERGED_COLUMNS)}
        FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v({_RECORDSET_COLUMNS})
        JOIN messages AS o ON o.ref_id = v.ref_id
        WHERE o.state IN ('pending', 'expired')
        ORDER BY v.ref_id
        FOR UPDATE OF o
    ), changed AS (
        UPDATE messages AS m
        SET {
        ", ".join(
            f"{name} = CASE WHEN x.apply THEN x.{name} ELSE m.{name} END"
            for name in _MERGED_COLUMNS
        )
    },
            poll_count = m.poll_count + CASE WHEN x.mine THEN 1 ELSE 0 END,
            not_found_count = CASE WHEN x.mine THEN 0 ELSE m.not_found_count END,
            last_polled_at = CASE WHEN x.mine THEN now() ELSE m.last_polled_at END,
            resolved_at = CASE WHEN x.apply AND {_IS_FINAL} THEN now() ELSE m.resolved_at END,
            next_poll_at = CASE
                WHEN x.apply AND {_IS_FINAL} THEN NULL
                WHEN x.mine THEN {_next_poll_sql("m", ":base", ":max_interval", ":max_age")}
                ELSE m.next_poll_at END,
            lease_id = CASE WHEN x.mine OR (x.apply AND {_IS_FINAL}) THEN NULL
                            ELSE m.lease_id END,
            updated_at = CASE WHEN x.apply THEN now() ELSE m.updated_at END
        FROM x
        WHERE m.ref_id = x.ref_id AND (x.mine OR x.apply)
        RETURNING x.ref_id, x.apply, x.mine, x.never_answered, x.old_state, m.state AS new_state,
                  x.old_send_status, m.send_status AS new_send_status, m.error_code,
                  m.account, m.oa_id, m.zns_temp_id, m.total_price, m.resolved_at,
                  x.old_zns_temp_id, x.old_error_code, x.old_total_price, x.old_resolved_at
    ), counted AS ({_COUNT_MERGED}
    ), events AS (
        -- The final-status feed (worker.events): one row per message this statement made final.
        INSERT INTO message_events (ref_id, account, oa_id, source, state, send_status,
                                    error_code, total_price)
        SELECT ref_id, account, oa_id, :source, new_state, new_send_status, error_code,
               total_price
        FROM changed
        WHERE apply AND new_state IN ({_FINAL_LIST}) AND new_state <> old_state
    ), history AS (
        INSERT INTO message_history (ref_id, source, batch_id, old_state, new_state,
                                     old_send_status, new_send_status, error_code)
        SELECT ref_id, :source, CAST(:batch_id AS uuid), old_state, new_state,
               old_send_status, new_send_status, error_code
        FROM changed WHERE apply
    ), lease AS (
        DELETE FROM poll_batches WHERE id = CAST(:lease AS uuid)
    )
    SELECT count(*) FILTER (WHERE mine AND never_answered),
           count(*) FILTER (WHERE apply),
           {
        ", ".join(
            f"count(*) FILTER (WHERE apply AND new_state = '{state}')"
            for state in _POLL_FINAL_STATES
        )
    },
           (SELECT json_agg(json_build_array(account, oa_id, new_state, error_code, n))
            FROM (SELECT account, oa_id, new_state, error_code, count(*) AS n FROM changed
                  WHERE apply AND new_state IN ('failed', 'rejected') AND new_state <> old_state
                  GROUP BY 1, 2, 3, 4) AS f)
    FROM changed
    """
)


def _apply_reports(
    conn: Connection,
    rows: list[dict],
    *,
    source: str,
    lease: uuid.UUID | None,
    batch_id: uuid.UUID | None,
    settings: Settings | None,
) -> Completed:
    params = {
        "rows": _json(rows),
        "source": source,
        "lease": lease,
        "batch_id": batch_id,
        # Only a lease's own rows are rescheduled; pushes leave next_poll_at as it is.
        "base": settings.poll_interval_seconds if settings else 0,
        "max_interval": settings.poll_max_interval_seconds if settings else 0,
        "max_age": settings.message_max_age_seconds if settings else 0,
    }
    first_answers, changed, *by_state, failures = conn.execute(_APPLY_REPORTS, params).one()
    resolved = {
        state: count for state, count in zip(_POLL_FINAL_STATES, by_state, strict=True) if count
    }
    failed = {
        Failure(account, oa_id, state, error_code): count
        for account, oa_id, state, error_code, count in failures or ()
    }
    return Completed(changed, resolved, first_answers, failed)


def merge_callbacks(
    conn: Connection,
    records: Sequence[CallbackRecord],
    *,
    source: str = "poll",
    batch_id: uuid.UUID | None = None,
) -> Completed:
    """Move rows forward with provider data (pushes, or a poll's answer outside a lease): the
    rules of `complete_batch`, without its poll bookkeeping.

    Every row that changes gets one `message_history` row in the same statement, naming the
    `source` of the data ("poll", "push") and the poll batch it came from. Returns the rows whose
    data changed and those made final, by state.
    """
    rows = _merge_rows(records)
    if not rows:
        return Completed(0, {})
    return _apply_reports(conn, rows, source=source, lease=None, batch_id=batch_id, settings=None)


def _merge_rows(records: Iterable[CallbackRecord]) -> list[dict]:
    """The most advanced record of each SMSID as a row of the merge's JSON recordset."""
    rows = []
    for record in most_advanced(records):
        row = {name: getattr(record, name) for name in _RECORD_COLUMNS}
        if record.total_price is not None:
            row["total_price"] = str(record.total_price)
        row.update(
            ref_id=record.ref_id,
            rank=record_rank(record),
            error_code=record.error_code,
            state=derive_state(record).value,
        )
        rows.append(row)
    return rows


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


# --- the push receiver ------------------------------------------------------------------------

_KNOWN_REF_IDS = text("SELECT ref_id FROM messages WHERE ref_id = ANY(:ref_ids)")


def known_ref_ids(conn: Connection, ref_ids: Sequence[str]) -> set[str]:
    """Which of `ref_ids` have a row: a push for any other SMSID has nowhere to go."""
    if not ref_ids:
        return set()
    return {ref_id for (ref_id,) in conn.execute(_KNOWN_REF_IDS, {"ref_ids": list(ref_ids)})}


# --- the final-status feed (worker.events) ----------------------------------------------------

# The feed's horizon: every event whose transaction id is below it is committed (or rolled back)
# and no transaction can still write one below it. That is the smallest transaction id still
# running in this database as the statement's snapshot sees it (its xip list), or the snapshot's
# xmax (every later transaction gets a larger id). Transactions running in other databases of the
# cluster cannot write here: those that pg_stat_activity names are left out (it shows every
# session's database and backend_xid to every role), so a long transaction elsewhere does not
# hold the feed back. One that ended after the snapshot is not named, and is waited for: a
# horizon that is too low is never wrong, only later.
_FEED_HORIZON = """
    SELECT COALESCE(
        (SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) AS x
         WHERE NOT EXISTS (SELECT FROM pg_stat_activity AS a
                           WHERE a.backend_xid = x::xid
                             AND a.datname IS DISTINCT FROM current_database())),
        pg_snapshot_xmax(pg_current_snapshot()))
"""

# Events after the cursor (:xid, :id) in (xid, id) order, below the horizon. worker.events says
# why this order and not the identity's.
_EVENTS_AFTER = text(
    f"""
    SELECT xid::text, id, at, ref_id, account, oa_id, source, state, send_status, error_code,
           total_price::text
    FROM message_events
    WHERE (xid, id) > (CAST(:xid AS xid8), :id) AND xid < ({_FEED_HORIZON})
    ORDER BY xid, id
    LIMIT :limit
    """
)


def events_after(conn: Connection, xid: int, event_id: int, limit: int) -> list[tuple]:
    """Up to `limit` rows of `message_events` after the cursor (xid, id) that no running
    transaction can precede any more, in feed order: (xid as text, id, at, ref_id, account,
    oa_id, source, state, send_status, error_code, total_price as text)."""
    params = {"xid": str(xid), "id": event_id, "limit": limit}
    return [tuple(row) for row in conn.execute(_EVENTS_AFTER, params)]


_FEED_END = text(
    f"""
    SELECT xid::text, id FROM message_events
    WHERE xid < ({_FEED_HORIZON})
    ORDER BY xid DESC, id DESC LIMIT 1
    """
)


def feed_end(conn: Connection) -> tuple[int, int]:
    """The cursor after the last event deliverable now, (0, 0) when there is none."""
    row = conn.execute(_FEED_END).first()
    return (int(row[0]), row[1]) if row else (0, 0)


_CURSOR_OF = text("SELECT xid::text, id FROM feed_cursors WHERE name = :name")

# Moves the cursor only from where the caller read it: a second deliverer that read the same
# cursor finds it moved and learns it lost (False), instead of moving it back.
_MOVE_CURSOR = text(
    """
    INSERT INTO feed_cursors AS c (name, xid, id) VALUES (:name, CAST(:xid AS xid8), :id)
    ON CONFLICT (name) DO UPDATE SET xid = excluded.xid, id = excluded.id, updated_at = now()
    WHERE (c.xid, c.id) = (CAST(:old_xid AS xid8), :old_id)
    """
)


def cursor_of(conn: Connection, name: str) -> tuple[int, int]:
    """Where the reader `name` stands in the feed; (0, 0), the start, if it never read."""
    row = conn.execute(_CURSOR_OF, {"name": name}).first()
    return (int(row[0]), row[1]) if row else (0, 0)


def move_cursor(conn: Connection, name: str, old: tuple[int, int], new: tuple[int, int]) -> bool:
    """Move the reader `name` from `old` to `new`; False if it was not at `old` any more."""
    params = {
        "name": name,
        "xid": str(new[0]),
        "id": new[1],
        "old_xid": str(old[0]),
        "old_id": old[1],
    }
    return conn.execute(_MOVE_CURSOR, params).rowcount == 1


# --- operator tools (worker.cli) --------------------------------------------------------------


@dataclass(frozen=True)
class NewMessage:
    """A RefId to poll, as an operator registers it."""

    ref_id: str
    oa_id: str
    account: str


_TRACK = text(
    """
    INSERT INTO messages (ref_id, oa_id, account)
    SELECT ref_id, oa_id, account
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(ref_id text, oa_id text, account text)
    ON CONFLICT (ref_id) DO NOTHING
    """
)
_TRACK_CHUNK = 10_000


def track(conn: Connection, messages: Sequence[NewMessage]) -> int:
    """Insert messages for polling exactly as a sender would; a RefId already present is left as
    it is, whatever its state. Returns how many were new."""
    inserted = 0
    for start in range(0, len(messages), _TRACK_CHUNK):
        chunk = messages[start : start + _TRACK_CHUNK]
        rows = [{"ref_id": m.ref_id, "oa_id": m.oa_id, "account": m.account} for m in chunk]
        inserted += conn.execute(_TRACK, {"rows": _json(rows)}).rowcount
    return inserted


@dataclass(frozen=True)
class OaStatus:
    """One account/OA pair as `esms-poller status` shows it."""

    account: str
    oa_id: str
    pending: int
    overdue: int
    in_flight: int
    oldest_pending_age: timedelta | None
    sent: int
    failed: int
    rejected: int
    expired: int
    resolved_recently: int


# Pending rows counted live on their partial index; final ones from the count tables (see
# "counts of final rows"); those resolved in the window on messages_resolved_at_idx.
_STATUS = text(
    """
    SELECT account, oa_id,
           CAST(sum(pending) AS bigint), CAST(sum(overdue) AS bigint),
           CAST(sum(in_flight) AS bigint), max(oldest_age),
           CAST(COALESCE(sum(messages) FILTER (WHERE state = 'sent'), 0) AS bigint),
           CAST(COALESCE(sum(messages) FILTER (WHERE state = 'failed'), 0) AS bigint),
           CAST(COALESCE(sum(messages) FILTER (WHERE state = 'rejected'), 0) AS bigint),
           CAST(COALESCE(sum(messages) FILTER (WHERE state = 'expired'), 0) AS bigint),
           CAST(sum(recent) AS bigint)
    FROM (
        SELECT account, oa_id, NULL AS state, 0 AS messages, count(*) AS pending,
               count(*) FILTER (WHERE next_poll_at < now()) AS overdue,
               count(*) FILTER (WHERE lease_id IS NOT NULL) AS in_flight,
               now() - min(created_at) AS oldest_age, 0 AS recent
        FROM messages WHERE state = 'pending'
        GROUP BY account, oa_id
        UNION ALL
        SELECT account, oa_id, state, messages, 0, 0, 0, NULL, 0 FROM message_totals
        UNION ALL
        SELECT account, oa_id, state, messages, 0, 0, 0, NULL, 0 FROM message_count_deltas
        UNION ALL
        SELECT account, oa_id, NULL, 0, 0, 0, 0, NULL, count(*)
        FROM messages WHERE resolved_at >= now() - make_interval(secs => :window)
        GROUP BY account, oa_id
    ) AS c
    GROUP BY account, oa_id
    HAVING sum(pending) + sum(messages) + sum(recent) > 0
    ORDER BY account, oa_id
    """
)


def status(conn: Connection, recent_seconds: float) -> list[OaStatus]:
    """Backlog and state counts per account and OA; `resolved_recently` counts rows that became
    final within the last `recent_seconds`."""
    return [OaStatus(*row) for row in conn.execute(_STATUS, {"window": recent_seconds})]


@dataclass(frozen=True)
class Heartbeat:
    age: timedelta
    ticks: int


_HEARTBEAT_AGE = text("SELECT now() - last_tick_at, ticks FROM scheduler_heartbeat WHERE id = 1")


def heartbeat_age(conn: Connection) -> Heartbeat | None:
    """How long ago the scheduler last ran a tick; None if it never has."""
    row = conn.execute(_HEARTBEAT_AGE).first()
    return Heartbeat(*row) if row else None


_MESSAGE = text("SELECT * FROM messages WHERE ref_id = :ref_id")
_HISTORY = text(
    """
    SELECT at, source, batch_id, old_state, new_state, old_send_status, new_send_status,
           error_code
    FROM message_history WHERE ref_id = :ref_id ORDER BY at, id
    """
)


def message(conn: Connection, ref_id: str) -> dict | None:
    """Every column of one message, in table order; None if the RefId is unknown."""
    row = conn.execute(_MESSAGE, {"ref_id": ref_id}).mappings().first()
    return dict(row) if row else None


def history(conn: Connection, ref_id: str) -> list[dict]:
    """Every change the message went through, oldest first."""
    return [dict(row) for row in conn.execute(_HISTORY, {"ref_id": ref_id}).mappings()]


@dataclass(frozen=True)
class RepollResult:
    made_due: int  # pending rows whose next poll is now
    revived: int  # expired rows back to pending (and due now), with a new maximum age from now
    in_flight: int  # matching rows a request holds right now: left alone


# Filters of `repoll`, each used only when its parameter is given, so the planner sees plain
# conditions (and the partial index of pending rows when only pending rows are wanted).
_REPOLL_FILTERS = {
    "account": "m.account = :account",
    "oa_id": "m.oa_id = :oa_id",
    "older_than": "m.created_at <= now() - make_interval(secs => :older_than)",
    "ref_ids": "m.ref_id = ANY(CAST(:ref_ids AS text[]))",
}


def repoll(
    conn: Connection,
    *,
    include_expired: bool,
    account: str | None = None,
    oa_id: str | None = None,
    older_than_seconds: float | None = None,
    ref_ids: Sequence[str] | None = None,
) -> RepollResult:
    """Make the selected pending messages due now; with `include_expired`, also put the selected
    expired ones back to pending (one history row each, source 'repoll') with `repolled_at` set,
    so their maximum age counts from now. Rows a request holds are left to that request."""
    given = {
        "account": account,
        "oa_id": oa_id,
        "older_than": older_than_seconds,
        "ref_ids": list(ref_ids) if ref_ids else None,
    }
    params = {name: value for name, value in given.items() if value is not None}
    where = " ".join(f"AND {_REPOLL_FILTERS[name]}" for name in params)
    states = "m.state IN ('pending', 'expired')" if include_expired else "m.state = 'pending'"
    statement = text(
        f"""
        WITH changed AS (
            UPDATE messages AS m
            SET state = 'pending', next_poll_at = now(), resolved_at = NULL,
                updated_at = CASE WHEN m.state = 'expired' THEN now() ELSE m.updated_at END,
                repolled_at = CASE WHEN m.state = 'expired' THEN now() ELSE m.repolled_at END
            FROM messages AS old
            WHERE old.ref_id = m.ref_id AND {states} AND m.lease_id IS NULL {where}
            RETURNING m.ref_id, old.state AS old_state, m.send_status, old.account, old.oa_id,
                      old.zns_temp_id, old.error_code, old.total_price, old.resolved_at
        ), counted AS ({_COUNT_REVIVED}
        ), revived AS (
            INSERT INTO message_history (ref_id, source, old_state, new_state, old_send_status,
                                         new_send_status)
            SELECT ref_id, 'repoll', 'expired', 'pending', send_status, send_status
            FROM changed WHERE old_state = 'expired'
        )
        SELECT count(*) FILTER (WHERE old_state = 'pending'),
               count(*) FILTER (WHERE old_state = 'expired'),
               (SELECT count(*) FROM messages AS m
                WHERE m.state = 'pending' AND m.lease_id IS NOT NULL {where})
        FROM changed
        """
    )
    row = conn.execute(statement, params).one()
    return RepollResult(*row)


_AN_OA_OF = text(
    """
    SELECT oa_id FROM messages
    WHERE state = 'pending' AND account = :account AND oa_id <> '' LIMIT 1
    """
)


def an_oa_of(conn: Connection, account: str) -> str | None:
    """Some OAId the account has pending messages for (cheap: the partial index), or None."""
    return conn.execute(_AN_OA_OF, {"account": account}).scalar()


# --- metrics (worker.metrics) -----------------------------------------------------------------

_PENDING_BACKLOG = text(
    """
    SELECT account, count(*), extract(epoch FROM now() - min(created_at))::float8
    FROM messages
    WHERE state = 'pending' AND account = ANY(:accounts)
    GROUP BY account
    """
)


def notification_queue_usage(conn: Connection) -> float:
    """The fraction of Postgres's NOTIFY queue in use (0 to 1). A listener that stops reading
    holds every notification after it in the queue; a full queue fails every transaction that
    notifies, every poll's write among them."""
    return conn.execute(text("SELECT pg_notification_queue_usage()")).scalar_one()


def pending_backlog(conn: Connection, accounts: Sequence[str]) -> dict[str, tuple[int, float]]:
    """Per account: pending rows and the age in seconds of the oldest. One aggregate over the
    pending rows (about 0.15 s at a million of them), so callers run it every few seconds."""
    rows = conn.execute(_PENDING_BACKLOG, {"accounts": list(accounts)})
    return {account: (count, age) for account, count, age in rows}


# --- beat's upkeep: counts and retention (worker.upkeep) ---------------------------------------

_UPKEEP_LOCK = 0x65736D75  # one fold or recount at a time, however many workers run upkeep.

_UPKEEP_RUN_LOCK = 0x65736D76  # one upkeep run at a time (worker.upkeep), a session lock.

_TRY_UPKEEP_LOCK = text("SELECT pg_try_advisory_xact_lock(:key)")
_TRY_RUN_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_RUN_UNLOCK = text("SELECT pg_advisory_unlock(:key)")
_UPKEEP_LOCK_WAIT = text("SELECT pg_advisory_xact_lock(:key)")

# The deltas committed so far into the two count tables, in one statement: a delta committed
# while it runs is not seen by its DELETE and waits for the next fold. Keys in sorted order.
_FOLD_COUNTS = text(
    """
    WITH folded AS (
        DELETE FROM message_count_deltas
        RETURNING hour, account, oa_id, zns_temp_id, state, error_code, messages, total_price
    ), hourly AS (
        INSERT INTO resolved_hourly_counts AS r (hour, account, oa_id, zns_temp_id, state,
                                                 messages, total_price)
        SELECT hour, account, oa_id, zns_temp_id, state, sum(messages), sum(total_price)
        FROM folded WHERE hour IS NOT NULL
        GROUP BY 1, 2, 3, 4, 5
        ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (hour, account, oa_id, zns_temp_id, state) DO UPDATE
        SET messages = r.messages + excluded.messages,
            total_price = r.total_price + excluded.total_price
    ), totals AS (
        INSERT INTO message_totals AS t (account, oa_id, state, error_code, messages,
                                         total_price)
        SELECT account, oa_id, state, error_code, sum(messages), sum(total_price)
        FROM folded
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        ON CONFLICT (account, oa_id, state, error_code) DO UPDATE
        SET messages = t.messages + excluded.messages,
            total_price = t.total_price + excluded.total_price
    )
    SELECT count(*) FROM folded
    """
)


def try_upkeep_lock(conn: Connection) -> bool:
    """Take the session lock of an upkeep run, or learn another run has it."""
    return bool(conn.execute(_TRY_RUN_LOCK, {"key": _UPKEEP_RUN_LOCK}).scalar())


def upkeep_unlock(conn: Connection) -> None:
    conn.execute(_RUN_UNLOCK, {"key": _UPKEEP_RUN_LOCK})


def fold_counts(conn: Connection) -> int | None:
    """Add the deltas written so far to the count tables; how many delta rows that took, or None
    if another fold holds the lock."""
    if not conn.execute(_TRY_UPKEEP_LOCK, {"key": _UPKEEP_LOCK}).scalar():
        return None
    return conn.execute(_FOLD_COUNTS).scalar_one()


_RECOUNT = [
    # One pass over every final row: longer than a statement of the daemon may take, and its
    # groups are counted in memory.
    text("SET LOCAL statement_timeout = 0"),
    text("SET LOCAL work_mem = '256MB'"),
    text("DELETE FROM message_count_deltas"),
    text("DELETE FROM message_totals"),
    text("DELETE FROM resolved_hourly_counts"),
    text(
        """
        WITH fine AS MATERIALIZED (
            SELECT date_trunc('hour', resolved_at, 'UTC') AS hour, account, oa_id, zns_temp_id,
                   state, error_code, count(*) AS messages,
                   COALESCE(sum(total_price), 0) AS total_price
            FROM messages WHERE state <> 'pending'
            GROUP BY 1, 2, 3, 4, 5, 6
        ), hourly AS (
            INSERT INTO resolved_hourly_counts (hour, account, oa_id, zns_temp_id, state,
                                                messages, total_price)
            SELECT hour, account, oa_id, zns_temp_id, state, sum(messages), sum(total_price)
            FROM fine WHERE hour IS NOT NULL
            GROUP BY 1, 2, 3, 4, 5
        )
        INSERT INTO message_totals (account, oa_id, state, error_code, messages, total_price)
        SELECT account, oa_id, state, error_code, sum(messages), sum(total_price)
        FROM fine
        GROUP BY 1, 2, 3, 4
        """
    ),
]


def recount(engine: Engine) -> None:
    """Count the final rows afresh (after rows were changed by hand, or made final by a worker
    older than migration 0008). One REPEATABLE READ transaction: the deltas it drops and the
    rows it counts are of one snapshot, so a write committed meanwhile keeps its delta."""
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            conn.execute(_UPKEEP_LOCK_WAIT, {"key": _UPKEEP_LOCK})
            for statement in _RECOUNT:
                conn.execute(statement)


# Oldest first, on message_history_at_idx.
_PRUNE_HISTORY = text(
    """
    DELETE FROM message_history WHERE id IN (
        SELECT id FROM message_history
        WHERE at < now() - make_interval(days => :days)
        ORDER BY at LIMIT :limit)
    """
)


def prune_history(conn: Connection, days: int, limit: int) -> int:
    """Delete up to `limit` of the oldest `message_history` rows older than `days`."""
    return conn.execute(_PRUNE_HISTORY, {"days": days, "limit": limit}).rowcount


# The final-status feed past its retention, on the BRIN index of `at`: no ORDER BY (a BRIN index
# cannot give one), every row past the cut goes in some batch anyway. A consumer or the webhook
# further behind than the retention misses what was pruned (docs/integration.md).
_PRUNE_EVENTS = text(
    """
    DELETE FROM message_events WHERE (xid, id) IN (
        SELECT xid, id FROM message_events
        WHERE at < now() - make_interval(days => :days)
        LIMIT :limit)
    """
)


def prune_events(conn: Connection, days: int, limit: int) -> int:
    """Delete up to `limit` `message_events` rows older than `days`."""
    return conn.execute(_PRUNE_EVENTS, {"days": days, "limit": limit}).rowcount


# Final rows resolved before the cut, oldest first on messages_resolved_at_idx, leaving the
# counts of final rows with them. A row some statement holds is left for the next batch.
_PRUNE_MESSAGES = text(
    f"""
    WITH gone AS (
        DELETE FROM messages WHERE ref_id IN (
            SELECT ref_id FROM messages
            WHERE resolved_at < now() - make_interval(days => :days)
            ORDER BY resolved_at LIMIT :limit
            FOR UPDATE SKIP LOCKED)
          AND state <> 'pending'
        RETURNING account, oa_id, zns_temp_id, state, error_code, resolved_at, total_price
    ), counted AS ({
        _count_deltas(
            "SELECT account, oa_id, zns_temp_id, state, error_code, resolved_at, total_price, "
            "-1 AS n FROM gone"
        )
    })
    SELECT count(*) FROM gone
    """
)


def prune_messages(conn: Connection, days: int, limit: int) -> int:
    """Delete up to `limit` of the oldest final messages resolved more than `days` ago (their
    history goes with HISTORY_RETENTION_DAYS)."""
    return conn.execute(_PRUNE_MESSAGES, {"days": days, "limit": limit}).scalar_one()
