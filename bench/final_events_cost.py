"""What writing final-status events costs Postgres: CPU of the merging backend, per RefId.

The throughput benchmark counts the CPU of every Postgres process on the machine, which on a
shared machine includes everyone else's work. This one measures one backend only, from
/proc/<pid>/stat of the connection that runs the merge statement (`store.merge_callbacks`, the
statement a poll's answer and pushes run): a fresh database `BENCH_DATABASE` (default
esms_bench_events) with `--rows` pending messages over 50 OAs, made final 200 at a time (85 %
sent, 10 % failed, 5 % rejected), in transactions committed with synchronous_commit=off as the
worker's are. Run it from a checkout without final-status events for the figure before, and with
`--no-notify` to leave the NOTIFY trigger out of the figure after.

    .venv/bin/python bench/final_events_cost.py --rows 100000 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchdb import drop_database, fresh_database  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from worker import store  # noqa: E402
from worker.records import CallbackRecord  # noqa: E402

DATABASE = os.environ.get("BENCH_DATABASE", "esms_bench_events")
TICKS = os.sysconf("SC_CLK_TCK")
BATCH = 200


def backend_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def record(ref_id: str, n: int) -> CallbackRecord:
    base = CallbackRecord(
        ref_id=ref_id,
        send_status=5,
        send_success=1,
        send_failed=0,
        total_receiver=1,
        total_sent=1,
        type_id=25,
        telco_id=1,
        total_price=Decimal("220.0"),
        phone_number="0909090909",
        callback_url="https://example.invalid/cb",
        partner_ids="p",
        zns_temp_id="228386",
    )
    if n % 20 == 0:
        return dataclasses.replace(base, send_status=4, send_success=None, send_failed=None)
    if n % 10 == 1:
        info = '{"error":-118,"message":"User is not a Zalo user"}'
        return dataclasses.replace(base, send_success=0, send_failed=1, error_info=info)
    return base


def one_round(engine, rows: int, round_no: int) -> tuple[float, float]:
    refs = [f"r{round_no}-{i}" for i in range(rows)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id) "
                "SELECT 'r' || :round || '-' || g, 'oa-' || (g % 50) "
                "FROM generate_series(0, :n - 1) AS g"
            ),
            {"round": round_no, "n": rows},
        )
    conn = engine.connect()
    try:
        conn.exec_driver_sql("SET synchronous_commit = off")
        conn.commit()
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.commit()
        cpu0, wall0 = backend_cpu_seconds(pid), time.monotonic()
        for start in range(0, rows, BATCH):
            chunk = [record(ref, start + i) for i, ref in enumerate(refs[start : start + BATCH])]
            store.merge_callbacks(conn, chunk, source="push")
            conn.commit()
        cpu1, wall1 = backend_cpu_seconds(pid), time.monotonic()
    finally:
        conn.close()
    return (cpu1 - cpu0) / rows * 1e6, (wall1 - wall0) / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-notify", action="store_true", help="disable the NOTIFY trigger")
    args = parser.parse_args()
    url = fresh_database(DATABASE)
    engine = create_engine(url, pool_size=2)
    try:
        with engine.begin() as conn:
            has_events = conn.execute(text("SELECT to_regclass('message_events')")).scalar()
            if has_events and args.no_notify:
                conn.execute(text("ALTER TABLE message_events DISABLE TRIGGER USER"))
        events = "none" if not has_events else ("no NOTIFY" if args.no_notify else "with NOTIFY")
        for round_no in range(args.rounds):
            cpu, wall = one_round(engine, args.rows, round_no)
            print(
                f"events {events}: round {round_no + 1}: backend CPU {cpu:.1f} us/RefId, "
                f"wall {wall:.1f} us/RefId",
                flush=True,
            )
    finally:
        engine.dispose()
        drop_database(DATABASE)


if __name__ == "__main__":
    main()
