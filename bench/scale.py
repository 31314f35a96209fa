"""A year of traffic: what 10M final rows do to the operator's reads, the scheduler and the tables.

    .venv/bin/python bench/scale.py build              # the template database, once (~5 min)
    .venv/bin/python bench/scale.py measure            # clone it, migrate, measure (~5 min)
    .venv/bin/python bench/scale.py measure --no-upgrade   # at 0006: run from a checkout of a
                                                           # release before 0008 (the baseline)
    .venv/bin/python bench/scale.py prune --days 20 --seconds 40   # history pruning alone
    .venv/bin/python bench/scale.py fillfactor 100 90 80   # the hot set's pages, by fillfactor
    .venv/bin/python bench/scale.py merge-cpu          # Postgres CPU of the merge per RefId

`build` makes `esms_scale_tmpl` at revision 0006 (the schema before migration 0008): FINAL_ROWS
final messages spread over 30 days (two accounts, ten OAs, twenty templates; 85 % sent, 8 %
failed, 2 % rejected, 5 % expired) with 2–3 `message_history` rows each, and PENDING pending rows
of account `default`, all due. Rows go in with `INSERT ... SELECT generate_series`, the indexes
are built afterwards, then VACUUM ANALYZE. It is kept as a template between runs.

`measure` clones the template (`esms_scale`, STRATEGY FILE_COPY), times `alembic upgrade head` on
it while a writer updates pending rows every 50 ms and records its slowest write, then times:
`esms-poller status` (the whole command, and its query), the operator views, a claiming tick
(11,600 RefIds) and an idle tick against the same schema on a table holding only the backlog
(`esms_scale_small`, where `esms-poller status` is also timed as a control: the command's own
start-up), and history pruning. Everything it reports is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import PG_SERVER, drop_database  # noqa: E402

from tests.processes import child_env  # noqa: E402

TEMPLATE = "esms_scale_tmpl"
DATABASE = "esms_scale"
SMALL = "esms_scale_small"
FINAL_ROWS = 10_000_000
PENDING = 100_000
BASE_REVISION = "0006"


def _url(name: str) -> str:
    return f"{PG_SERVER}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)


def _alembic(name: str, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), *args],
        cwd=ROOT,
        env=child_env(DATABASE_URL=_url(name)),
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def _create(name: str, template: str | None = None) -> None:
    drop_database(name)
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        if template:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        else:
            admin.execute(f"CREATE DATABASE {name}")


# The final rows of message i (1..n), spread over the 30 days before the build, in created order.
# The state, template and error code are drawn from i so that runs are identical.
_FINAL_MESSAGES = """
    INSERT INTO messages (ref_id, account, oa_id, created_at, state, send_status, send_success,
                          send_failed, total_receiver, total_sent, type_id, telco_id,
                          total_price, request_id, phone_number, partner_ids, error_info,
                          zns_temp_id, error_code, poll_count, last_polled_at, next_poll_at,
                          resolved_at, updated_at)
    SELECT ref_id, account, oa_id, created_at, state,
           CASE WHEN state = 'expired' THEN NULL ELSE 5 END,
           CASE WHEN state = 'sent' THEN 1 WHEN state = 'expired' THEN NULL ELSE 0 END,
           CASE WHEN state = 'sent' THEN 0 WHEN state = 'expired' THEN NULL ELSE 1 END,
           1, CASE WHEN state = 'sent' THEN 1 ELSE 0 END, 24, 1 + i %% 3,
           CASE WHEN state = 'sent' THEN 300.0 WHEN state = 'expired' THEN NULL ELSE 0 END,
           'req-' || i, '849' || lpad((i %% 100000000)::text, 8, '0'), 'order-' || i,
           CASE WHEN state = 'expired' THEN NULL
                ELSE '{"error":' || code || ',"message":"Zalo says ' || code || '"}' END,
           CASE WHEN state = 'expired' THEN NULL ELSE (231001 + (i / 7) %% 20)::text END,
           CASE WHEN state = 'expired' THEN NULL ELSE code END,
           2, resolved_at, NULL, resolved_at, resolved_at
    FROM (
        SELECT i, md5(i::text)::uuid::text || lpad((i %% 100)::text, 2, '0') AS ref_id,
               CASE WHEN i %% 10 = 0 THEN 'shopb' ELSE 'default' END AS account,
               (1090257973118325180 + i %% 10)::text AS oa_id,
               created_at,
               created_at + CASE WHEN s < 95 THEN make_interval(secs => 30 + i %% 600)
                                 ELSE interval '1 day' END AS resolved_at,
               CASE WHEN s < 85 THEN 'sent' WHEN s < 93 THEN 'failed'
                    WHEN s < 95 THEN 'rejected' ELSE 'expired' END AS state,
               CASE WHEN s < 85 THEN 0 ELSE (ARRAY[-118, -124, -108, -139, -141, -201])
                                             [1 + (i / 3) %% 6] END AS code
        FROM (
            SELECT i, (i / 10) %% 100 AS s,
                   now() - interval '31 days' + make_interval(secs => i * 2592000.0 / %(n)s)
                       AS created_at
            FROM generate_series(1, %(n)s) AS i
        ) AS drawn
    ) AS m
"""

# 2 or 3 history rows per final message, in the order they were written.
_FINAL_HISTORY = """
    INSERT INTO message_history (ref_id, at, source, old_state, new_state, old_send_status,
                                 new_send_status, error_code)
    SELECT md5(i::text)::uuid::text || lpad((i %% 100)::text, 2, '0'),
           created_at + make_interval(secs => 10 * k),
           CASE WHEN k = 3 THEN 'push' ELSE 'poll' END,
           'pending', CASE WHEN k = 1 THEN 'pending' ELSE 'sent' END,
           CASE WHEN k = 1 THEN NULL ELSE 1 END, CASE WHEN k = 1 THEN 1 ELSE 5 END,
           CASE WHEN k = 1 THEN NULL ELSE 0 END
    FROM (
        SELECT i, now() - interval '31 days' + make_interval(secs => i * 2592000.0 / %(n)s)
                  AS created_at
        FROM generate_series(1, %(n)s) AS i
    ) AS drawn, generate_series(1, 2 + i %% 2) AS k
"""

_PENDING = """
    INSERT INTO messages (ref_id, account, oa_id, created_at, next_poll_at)
    SELECT 'pending-' || md5(g::text), 'default', (1090257973118325180 + g %% 10)::text,
           now() - interval '10 minutes', now() - make_interval(secs => g %% 60)
    FROM generate_series(1, %(n)s) AS g
"""

_DROP_INDEXES = """
    ALTER TABLE messages DROP CONSTRAINT messages_pkey;
    DROP INDEX messages_due_at_idx, messages_new_idx, messages_pending_created_idx,
               message_history_at_idx, message_history_ref_idx;
    ALTER TABLE message_history DROP CONSTRAINT message_history_pkey;
"""

# As migrations 0001, 0002 and 0005 make them.
_CREATE_INDEXES = [
    "ALTER TABLE messages ADD CONSTRAINT messages_pkey PRIMARY KEY (ref_id)",
    "CREATE INDEX messages_due_at_idx ON messages (account, next_poll_at) "
    "WHERE next_poll_at IS NOT NULL",
    "CREATE INDEX messages_new_idx ON messages (created_at) "
    "WHERE state = 'pending' AND next_poll_at IS NULL",
    "CREATE INDEX messages_pending_created_idx ON messages (created_at) WHERE state = 'pending'",
    "ALTER TABLE message_history ADD CONSTRAINT message_history_pkey PRIMARY KEY (id)",
    "CREATE INDEX message_history_at_idx ON message_history (at)",
    "CREATE INDEX message_history_ref_idx ON message_history (ref_id, at)",
]


def build(final_rows: int, pending: int) -> None:
    """The template: schema at BASE_REVISION, the rows, the indexes, VACUUM ANALYZE."""
    started = time.perf_counter()
    _create(TEMPLATE)
    _alembic(TEMPLATE, "upgrade", BASE_REVISION)
    with psycopg.connect(f"{PG_SERVER}/{TEMPLATE}", autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute(_DROP_INDEXES)
        for label, sql, n in (
            ("final messages", _FINAL_MESSAGES, final_rows),
            ("history", _FINAL_HISTORY, final_rows),
            ("pending", _PENDING, pending),
        ):
            step = time.perf_counter()
            rows = conn.execute(sql, {"n": n}).rowcount
            print(f"{label}: {rows:,} rows in {time.perf_counter() - step:.0f} s", flush=True)
        for statement in _CREATE_INDEXES:
            step = time.perf_counter()
            conn.execute(statement)
            print(f"{statement[:60]}... {time.perf_counter() - step:.0f} s", flush=True)
        conn.execute(
            "INSERT INTO scheduler_heartbeat (id, last_tick_at, ticks) VALUES (1, now(), 1)"
        )
        step = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) messages")
        conn.execute("VACUUM (ANALYZE) message_history")
        print(f"vacuum analyze: {time.perf_counter() - step:.0f} s", flush=True)
        size = conn.execute(
            "SELECT pg_size_pretty(pg_database_size(current_database()))"
        ).fetchone()[0]
    print(f"{TEMPLATE}: {size}, built in {time.perf_counter() - started:.0f} s")


# --- measuring ---------------------------------------------------------------------------------


def _settings(name: str, **extra: object):
    from worker.settings import Settings

    return Settings(
        database_url=_url(name), esms_api_key="bench-key", esms_secret_key="bench-secret", **extra
    )


class Writer(threading.Thread):
    """Updates one pending row every 50 ms, as the poller would, and keeps the slowest write."""

    def __init__(self, name: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(f"{PG_SERVER}/{name}", autocommit=True)
        self.ref_ids = [
            ref for (ref,) in self.conn.execute(
                "SELECT ref_id FROM messages WHERE state = 'pending' LIMIT 1000"
            )
        ]  # fmt: skip
        self.stop = threading.Event()
        self.slowest = 0.0
        self.writes = 0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            started = time.perf_counter()
            self.conn.execute(
                "UPDATE messages SET updated_at = now() WHERE ref_id = %s",
                (self.ref_ids[self.writes % len(self.ref_ids)],),
            )
            self.slowest = max(self.slowest, time.perf_counter() - started)
            self.writes += 1


def _timed(runs: int, work) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return times


def _say(label: str, times: list[float]) -> None:
    shown = ", ".join(f"{t * 1000:.0f}" for t in times)
    print(
        f"{label}: median {statistics.median(times) * 1000:.0f} ms  (runs: {shown} ms)", flush=True
    )


_HOURLY_24H = (
    "SELECT hour, account, oa_id, zns_temp_id, state, messages, total_price FROM resolved_hourly "
    "WHERE hour >= now() - interval '24 hours' "
    "ORDER BY hour DESC, account, oa_id, zns_temp_id, state"
)


def measure_reads(name: str, runs: int) -> None:
    """`esms-poller status` as a whole command and as its query, and the operator views."""
    from sqlalchemy import create_engine

    from worker import store

    env = child_env(DATABASE_URL=_url(name), ESMS_API_KEY="bench-key", ESMS_SECRET_KEY="s")
    command = [str(Path(sys.executable).parent / "esms-poller"), "status"]
    _say(
        "esms-poller status (whole command)",
        _timed(runs, lambda: subprocess.run(command, env=env, check=True, capture_output=True)),
    )
    engine = store.make_engine(_settings(name))
    with engine.connect() as conn:
        _say("store.status query", _timed(runs, lambda: store.status(conn, 300)))
    engine.dispose()
    # The views as an operator's psql reads them: a plain connection.
    engine = create_engine(_url(name))
    with engine.connect() as conn:
        for label, sql in (
            ("SELECT * FROM message_counts", "SELECT * FROM message_counts"),
            ("SELECT * FROM failures_by_error", "SELECT * FROM failures_by_error"),
            ("resolved_hourly, last 24 h (docs/sql.md)", _HOURLY_24H),
        ):
            _say(label, _timed(runs, lambda sql=sql: conn.exec_driver_sql(sql).all()))
    engine.dispose()


_RESET_CLAIMS = [
    "UPDATE messages SET lease_id = NULL, next_poll_at = now() - interval '1 minute' "
    "WHERE lease_id IS NOT NULL",
    "DELETE FROM poll_batches",
]


def measure_ticks(name: str, runs: int) -> None:
    """A claiming tick (every pending row due) and an idle tick (none due), in-process, on the
    daemon's own engine."""
    from worker import scheduler, store

    settings = _settings(name)
    engine = store.make_engine(settings)
    admin = psycopg.connect(f"{PG_SERVER}/{name}", autocommit=True)
    claimed: list[int] = []

    def claim() -> None:
        report = scheduler.schedule_tick(engine, settings, lambda batches: None)
        claimed.append(sum(len(batch.ref_ids) for batch in report.batches))

    def claiming() -> None:
        for statement in _RESET_CLAIMS:
            admin.execute(statement)
        started = time.perf_counter()
        claim()
        times.append(time.perf_counter() - started)

    times: list[float] = []
    for _ in range(runs):
        claiming()
    _say(f"claiming tick ({statistics.median(claimed):.0f} RefIds)", times)
    for statement in _RESET_CLAIMS:
        admin.execute(statement)
    admin.execute(
        "UPDATE messages SET next_poll_at = now() + interval '1 hour' "
        "WHERE next_poll_at IS NOT NULL"
    )
    claimed.clear()
    _say("idle tick", _timed(runs * 4, claim))
    assert not any(claimed), "the idle tick claimed rows"
    admin.execute(
        "UPDATE messages SET next_poll_at = now() - interval '1 minute' "
        "WHERE next_poll_at IS NOT NULL"
    )
    admin.close()
    engine.dispose()


def measure_pruning(name: str, days: int, seconds: float) -> None:
    """Upkeep runs (fold + history pruning) for `seconds`, with HISTORY_RETENTION_DAYS=`days`."""
    from sqlalchemy import create_engine

    from worker import upkeep

    settings = _settings(name, history_retention_days=days)
    engine = create_engine(_url(name))
    pruned, started = 0, time.perf_counter()
    window, window_rows = started, 0
    while time.perf_counter() - started < seconds:
        report = upkeep.run(engine, settings)
        pruned += report.history_pruned
        window_rows += report.history_pruned
        now = time.perf_counter()
        if now - window >= 5:  # a line per 5 s, with the clock, to line up with other runs
            at = time.strftime("%H:%M:%S", time.gmtime())
            print(f"  {at} UTC: {window_rows / (now - window):,.0f} rows/s", flush=True)
            window, window_rows = now, 0
        if report.history_pruned < upkeep.PRUNE_BATCH:
            break
    elapsed = time.perf_counter() - started
    print(
        f"history pruning: {pruned:,} rows in {elapsed:.1f} s = {pruned / elapsed:,.0f} rows/s "
        f"(batches of {upkeep.PRUNE_BATCH:,})",
        flush=True,
    )
    engine.dispose()


def fillfactors(values: list[int], rounds: int) -> None:
    """For each fillfactor: a fresh clone, upgraded, with that fillfactor on `messages`; `rounds`
    claiming ticks (each after making every pending row due again, as `measure_ticks` does); then
    how many pages hold the pending rows and what the backlog gauge's query costs."""
    from worker import scheduler, store

    for value in values:
        _create(DATABASE, TEMPLATE)
        _alembic(DATABASE, "upgrade", "head")
        settings = _settings(DATABASE)
        engine = store.make_engine(settings)
        with psycopg.connect(f"{PG_SERVER}/{DATABASE}", autocommit=True) as admin:
            admin.execute(f"ALTER TABLE messages SET (fillfactor = {value})")
            ticks = []
            for _ in range(rounds):
                for statement in _RESET_CLAIMS:
                    admin.execute(statement)
                started = time.perf_counter()
                scheduler.schedule_tick(engine, settings, lambda batches: None)
                ticks.append(time.perf_counter() - started)
            pages = admin.execute(
                "SELECT count(DISTINCT (ctid::text::point)[0]) FROM messages "
                "WHERE state = 'pending'"
            ).fetchone()[0]
        with engine.connect() as conn:
            backlog = _timed(3, lambda conn=conn: store.pending_backlog(conn, ["default"]))
        engine.dispose()
        print(f"fillfactor {value}: {PENDING:,} pending rows on {pages:,} pages", flush=True)
        _say(f"fillfactor {value}: claiming ticks", ticks)
        _say(f"fillfactor {value}: pending_backlog query", backlog)


MERGE_DATABASE = "esms_scale_merge"


def merge_cpu(rows: int, drop_final_indexes: bool) -> None:
    """Postgres CPU of the merge alone: `rows` pending rows made final (9 in 10 sent, 1 failed) in
    200-row `store.merge_callbacks` calls on one connection; the CPU time of the backend that ran
    them, from /proc. `drop_final_indexes` drops migration 0008's two indexes on final rows first,
    to tell their share."""
    import uuid
    from decimal import Decimal

    from sqlalchemy import text

    from worker import store
    from worker.records import CallbackRecord

    _create(MERGE_DATABASE)
    _alembic(MERGE_DATABASE, "upgrade", "head")
    with psycopg.connect(f"{PG_SERVER}/{MERGE_DATABASE}", autocommit=True) as admin:
        if drop_final_indexes:
            admin.execute("DROP INDEX messages_resolved_at_idx, messages_failures_idx")
        admin.execute(
            "INSERT INTO messages (ref_id, oa_id, next_poll_at) "
            "SELECT 'r' || g, 'oa' || g %% 5, now() FROM generate_series(1, %s) AS g",
            (rows,),
        )
        admin.execute("VACUUM ANALYZE messages")
    engine = store.make_engine(_settings(MERGE_DATABASE), for_polling=True)

    def record(n: int) -> CallbackRecord:
        failed = n % 10 == 0
        return CallbackRecord(
            f"r{n}", send_status=5, send_success=0 if failed else 1, send_failed=int(failed),
            total_price=Decimal("300"), zns_temp_id=f"2310{n % 3}",
            error_info='{"error":-118}' if failed else '{"error":0}',
        )  # fmt: skip

    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.commit()
        before = _cpu_seconds(pid)
        for start in range(1, rows + 1, 200):
            batch = [record(n) for n in range(start, min(start + 200, rows + 1))]
            store.merge_callbacks(conn, batch, batch_id=uuid.uuid4())
            conn.commit()
        used = _cpu_seconds(pid) - before
    engine.dispose()
    drop_database(MERGE_DATABASE)
    which = "without the final-row indexes" if drop_final_indexes else "as migrated"
    print(f"merge, {which}: {used / rows * 1e6:.1f} µs of Postgres CPU per RefId made final")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(upgrade: bool, runs: int, prune_seconds: float) -> None:
    step = time.perf_counter()
    _create(DATABASE, TEMPLATE)
    print(f"cloned {TEMPLATE} in {time.perf_counter() - step:.0f} s", flush=True)
    if upgrade:
        writer = Writer(DATABASE)
        writer.start()
        took = _alembic(DATABASE, "upgrade", "head")
        writer.stop.set()
        writer.join()
        print(
            f"alembic upgrade head: {took:.1f} s; slowest of {writer.writes} writes meanwhile "
            f"{writer.slowest * 1000:.0f} ms",
            flush=True,
        )
    measure_reads(DATABASE, runs)
    print(f"-- ticks on {DATABASE} ({FINAL_ROWS:,} final + {PENDING:,} pending)", flush=True)
    measure_ticks(DATABASE, runs)
    _create(SMALL)
    _alembic(SMALL, "upgrade", "head" if upgrade else BASE_REVISION)
    with psycopg.connect(f"{PG_SERVER}/{SMALL}", autocommit=True) as conn:
        conn.execute(_PENDING, {"n": PENDING})
        conn.execute("VACUUM (ANALYZE) messages")
    print(f"-- ticks on {SMALL} (only the {PENDING:,} pending)", flush=True)
    measure_ticks(SMALL, runs)
    env = child_env(DATABASE_URL=_url(SMALL), ESMS_API_KEY="bench-key", ESMS_SECRET_KEY="s")
    command = [str(Path(sys.executable).parent / "esms-poller"), "status"]
    _say(
        f"control: esms-poller status (whole command) on {SMALL}",
        _timed(runs, lambda: subprocess.run(command, env=env, check=True, capture_output=True)),
    )
    drop_database(SMALL)
    if upgrade and prune_seconds:
        measure_pruning(DATABASE, 30, prune_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build")
    make.add_argument("--final-rows", type=int, default=FINAL_ROWS)
    make.add_argument("--pending", type=int, default=PENDING)
    check = sub.add_parser("measure")
    check.add_argument(
        "--no-upgrade", action="store_true", help="measure at the template's revision"
    )
    check.add_argument("--runs", type=int, default=5)
    check.add_argument("--prune-seconds", type=float, default=30)
    prune = sub.add_parser("prune", help=f"prune history of {DATABASE} (left by measure)")
    prune.add_argument("--days", type=int, default=20, help="HISTORY_RETENTION_DAYS")
    prune.add_argument("--seconds", type=float, default=40)
    factors = sub.add_parser("fillfactor", help="pending rows' pages after claims, by fillfactor")
    factors.add_argument("values", type=int, nargs="+")
    factors.add_argument("--rounds", type=int, default=5)
    cpu = sub.add_parser("merge-cpu", help="Postgres CPU of the merge alone, per RefId")
    cpu.add_argument("--rows", type=int, default=100_000)
    cpu.add_argument("--drop-final-indexes", action="store_true")
    args = parser.parse_args()
    if args.command == "merge-cpu":
        merge_cpu(args.rows, args.drop_final_indexes)
    elif args.command == "fillfactor":
        fillfactors(args.values, args.rounds)
    elif args.command == "build":
        build(args.final_rows, args.pending)
    elif args.command == "prune":
        measure_pruning(DATABASE, args.days, args.seconds)
    else:
        measure(not args.no_upgrade, args.runs, args.prune_seconds)


if __name__ == "__main__":
    main()
