"""A year of traffic: what 10M final rows do to the operator's reads, the scheduler and the tables.

    .venv/bin/python bench/scale.py build              # the template database, once (~10 min)
    .venv/bin/python bench/scale.py measure            # clone it, migrate, measure (~5 min)
    .venv/bin/python bench/scale.py measure --no-upgrade   # the same at the template's revision

`build` makes `esms_scale_tmpl` at revision 0006 (the schema before migration 0008): FINAL_ROWS
final messages spread over 30 days (two accounts, ten OAs, twenty templates; 85 % sent, 8 %
failed, 2 % rejected, 5 % expired) with 2–3 `message_history` rows each, and PENDING pending rows
of account `default`, all due. Rows go in with `INSERT ... SELECT generate_series`, the indexes
are built afterwards, then VACUUM ANALYZE. It is kept as a template between runs.

`measure` clones the template (`esms_scale`, STRATEGY FILE_COPY), times `alembic upgrade head` on
it while a writer updates pending rows every 50 ms and records its slowest write, then times:
`esms-poller status` (the whole command, and its query), the operator views, a claiming tick
(11,600 RefIds) and an idle tick against the same schema on a table holding only the backlog
(`esms_scale_small`), and history pruning. Everything it reports is printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build")
    make.add_argument("--final-rows", type=int, default=FINAL_ROWS)
    make.add_argument("--pending", type=int, default=PENDING)
    args = parser.parse_args()
    if args.command == "build":
        build(args.final_rows, args.pending)


if __name__ == "__main__":
    main()
