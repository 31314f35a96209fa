"""Migration 0007 on a big table while writers run: how long, in how many batches, and how long
the writers waited. Not run by CI.

A database at revision 0006 gets `--rows` messages (default 1,000,000), two in three holding `''`
or blanks in some of the six text columns the migration cleans (as pushes stored them before),
then `alembic upgrade 0007` runs while a writer thread updates a random row every 5 ms, as the
poller and the receiver do, timing each write. Reports the migration's time and rate, its batches
(from its log line), the longest and the 99th-percentile write, and that no blank is left.

    .venv/bin/python bench/blank_migration.py               # about a minute on 2 cores
    .venv/bin/python bench/blank_migration.py --rows 10000000

Writes its JSON to bench/results/ as well.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
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

DATABASE = f"esms_bench_blank_{os.getpid()}"
RESULTS = ROOT / "bench" / "results"
COLUMNS = ("request_id", "phone_number", "callback_url", "partner_ids", "error_info", "zns_temp_id")


def alembic(url: str, *args: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), *args],
        cwd=ROOT,
        env=child_env(DATABASE_URL=url),
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    drop_database(DATABASE)
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {DATABASE}")
    url = f"{PG_SERVER}/{DATABASE}".replace("postgresql://", "postgresql+psycopg://", 1)
    libpq = f"{PG_SERVER}/{DATABASE}"
    try:
        alembic(url, "upgrade", "0006")
        print(f"filling {args.rows:,} rows...", flush=True)
        # Row g: a blank in column c when (g + c) % 3 == 0 and g % 3 != 2; two rows in three.
        values = ", ".join(
            f"CASE WHEN g %% 3 <> 2 AND (g + {c}) %% 3 = 0 THEN (ARRAY['', ' ', '\t'])[g %% 3 + 1] "
            f"ELSE 'text-' || g END"
            for c in range(len(COLUMNS))
        )
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO messages (ref_id, oa_id, state, {', '.join(COLUMNS)}) "
                f"SELECT md5(g::text) || g, 'oa', 'sent', {values} "
                "FROM generate_series(1, %s) AS g",
                (args.rows,),
            )
            conn.execute("VACUUM ANALYZE messages")
            blank_where = " OR ".join(f"{c} ~ '^[[:space:]]*$'" for c in COLUMNS)
            blank_before = conn.execute(
                f"SELECT count(*) FROM messages WHERE {blank_where}"
            ).fetchone()[0]
            ref_ids = [
                r for (r,) in conn.execute("SELECT ref_id FROM messages TABLESAMPLE SYSTEM (1)")
            ]
        waits: list[float] = []
        done = threading.Event()

        def write() -> None:
            with psycopg.connect(libpq, autocommit=True) as conn:
                while not done.is_set():
                    started = time.monotonic()
                    conn.execute(
                        "UPDATE messages SET poll_count = poll_count + 1 WHERE ref_id = %s",
                        (random.choice(ref_ids),),
                    )
                    waits.append(time.monotonic() - started)
                    time.sleep(0.005)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        print(f"{blank_before:,} rows with a blank; alembic upgrade 0007...", flush=True)
        started = time.monotonic()
        try:
            log = alembic(url, "upgrade", "0007")
        finally:
            elapsed = time.monotonic() - started
            done.set()
            writer.join(10)
        with psycopg.connect(libpq) as conn:
            blank_after = conn.execute(
                f"SELECT count(*) FROM messages WHERE {blank_where}"
            ).fetchone()[0]
        found = re.search(r"(\d+) rows changed in (\d+) batches", log)
        waits.sort()
        result = {
            "rows": args.rows,
            "rows_with_a_blank_before": blank_before,
            "rows_with_a_blank_after": blank_after,
            "migration_seconds": round(elapsed, 1),
            "rows_per_second": round(args.rows / elapsed),
            "rows_changed": int(found.group(1)) if found else None,
            "batches": int(found.group(2)) if found else None,
            "writes_meanwhile": len(waits),
            "write_ms_p99": round(1000 * waits[int(0.99 * len(waits))], 1) if waits else None,
            "write_ms_max": round(1000 * waits[-1], 1) if waits else None,
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        }
    finally:
        drop_database(DATABASE)
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"blank-migration-{int(time.time())}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
