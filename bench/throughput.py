"""Throughput benchmark: drain a 100,000-message backlog at the provider's full rate.

Builds a fresh database `esms_bench` holding 1,000,000 final rows and a backlog of pending ones
(all due, every callback already final at the emulator), starts the emulator with 250–600 ms
latency, a bare `celery -A worker worker` and `celery -A worker beat`, and waits until nothing is
pending. Everything it reports comes from the emulator's request log and /proc:

- RefIds resolved per second from the first request to the last, and that as a fraction of the
  physical ceiling (rate limit × batch size = 4,000/s per account);
- the most requests any account made in any one-second window (the provider allows 20);
- CPU seconds and peak resident memory of the worker and beat processes.

    .venv/bin/python bench/throughput.py                 # one account, 100,000 messages
    .venv/bin/python bench/throughput.py --accounts 2    # two accounts, 100,000 messages each

Results are printed and written as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import PG_SERVER, drop_database, fresh_database  # noqa: E402

from tests.integration.test_ratelimit import max_in_window  # noqa: E402
from tests.processes import Children, celery, child_env, start_emulator, wait_for  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
DATABASE = "esms_bench"
RATE_LIMIT = 20
BATCH = 200
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def prepare_database(final_rows: int, backlog: int, accounts: list[str]) -> str:
    url = fresh_database(DATABASE)
    with psycopg.connect(f"{PG_SERVER}/{DATABASE}", autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO messages (ref_id, oa_id, state, send_status, send_success, total_price,
                                  created_at, resolved_at, poll_count)
            SELECT 'final-' || g, 'oa-' || (g %% 50), 'sent', 5, 1, 220.0,
                   now() - interval '2 days', now() - interval '1 day', 3
            FROM generate_series(1, %s) AS g
            """,
            (final_rows,),
        )
        for account in accounts:
            conn.execute(
                """
                INSERT INTO messages (ref_id, account, oa_id, next_poll_at)
                SELECT md5(%s || g::text) || lpad((g %% 100)::text, 2, '0'), %s,
                       'oa-' || %s || '-' || (g %% 5), now()
                FROM generate_series(1, %s) AS g
                """,
                (account, account, account, backlog),
            )
        conn.execute("VACUUM ANALYZE messages")
    return url


def proc_usage(pid: int) -> tuple[float, int, int]:
    """CPU seconds and summed peak RSS (KiB) of a process and its live children (the prefork
    pool), and how many processes that was."""
    pids = [pid] + [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and _parent(int(entry)) == pid
    ]
    cpu, peak = 0.0, 0
    for one in pids:
        with open(f"/proc/{one}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        cpu += sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
        with open(f"/proc/{one}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    peak += int(line.split()[1])
    return cpu, peak, len(pids)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def pending_count(url: str) -> int:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        return conn.execute("SELECT count(*) FROM messages WHERE state = 'pending'").fetchone()[0]


def run(accounts_count: int, backlog: int, final_rows: int, dump_log: str | None = None) -> dict:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    accounts = ["default"] + [f"shop{i}" for i in range(1, accounts_count)]
    keys = {account: (f"bench-key-{account}", f"bench-secret-{account}") for account in accounts}
    print(
        f"preparing {final_rows:,} final rows and {backlog:,} pending per account "
        f"for {accounts_count} account(s)...",
        flush=True,
    )
    url = prepare_database(final_rows, backlog, accounts)

    with tempfile.TemporaryDirectory() as tmp:
        children = Children(Path(tmp))
        try:
            flags = []
            for api_key, secret in keys.values():
                flags += ["--account", f"{api_key}:{secret}"]
            emulator = start_emulator(
                children,
                *flags,
                "--latency-min-ms",
                "250",
                "--latency-max-ms",
                "600",
                "--final-after-min-s",
                "0",
                "--final-after-max-s",
                "0",
                "--rate-limit",
                str(RATE_LIMIT),
            )
            default_key, default_secret = keys["default"]
            others = {
                account: {"api_key": api_key, "secret_key": secret}
                for account, (api_key, secret) in keys.items()
                if account != "default"
            }
            env = child_env(
                DATABASE_URL=url,
                REDIS_URL=REDIS_URL,
                ESMS_BASE_URL=emulator.url,
                ESMS_API_KEY=default_key,
                ESMS_SECRET_KEY=default_secret,
                ESMS_ACCOUNTS=json.dumps(others),
            )
            worker = children.spawn(
                "worker",
                [
                    str(Path(sys.executable).parent / "celery"),
                    "-A",
                    "worker",
                    "worker",
                    "--loglevel=WARNING",
                ],
                env,
            )
            beat = celery(children, "beat", env)
            started = time.monotonic()
            wait_for(
                lambda: pending_count(url) == 0, timeout=900, interval=1, message="backlog drained"
            )
            wall = time.monotonic() - started
            usage = {
                name: proc_usage(child.proc.pid)
                for name, child in (("worker", worker), ("beat", beat))
            }
            log = emulator.admin("GET", "/requests", params={"refids": 0})["requests"]
            if dump_log:
                Path(dump_log).write_text(json.dumps(log))
        finally:
            children.stop_all()

    ok = [entry for entry in log if entry["code"] == 100]
    first, last = min(e["t"] for e in log), max(e["t"] for e in log)
    resolved = backlog * accounts_count
    rate = resolved / (last - first)
    ceiling = RATE_LIMIT * BATCH * accounts_count
    per_account_window = {
        account: max_in_window([e["t"] for e in log if e["api_key"] == api_key])
        for account, (api_key, _) in keys.items()
    }
    result = {
        "accounts": accounts_count,
        "backlog_per_account": backlog,
        "final_rows": final_rows,
        "requests": len(log),
        "requests_ok": len(ok),
        "requests_rejected": {
            str(code): sum(1 for e in log if e["code"] == code)
            for code in sorted({e["code"] for e in log})
            if code != 100
        },
        "mean_batch": round(sum(e["n_read"] for e in ok) / len(ok), 1),
        "first_to_last_request_s": round(last - first, 2),
        "wall_until_drained_s": round(wall, 2),
        "refids_per_second": round(rate, 1),
        "ceiling_per_second": ceiling,
        "fraction_of_ceiling": round(rate / ceiling, 4),
        "max_requests_in_any_1s_window": per_account_window,
        "worker_processes": usage["worker"][2],
        "worker_cpu_s": round(usage["worker"][0], 1),
        "worker_peak_rss_mib": round(usage["worker"][1] / 1024, 1),
        "beat_cpu_s": round(usage["beat"][0], 1),
        "beat_peak_rss_mib": round(usage["beat"][1] / 1024, 1),
    }
    drop_database(DATABASE)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=100_000, help="pending messages per account")
    parser.add_argument("--final-rows", type=int, default=1_000_000)
    parser.add_argument("--dump-log", help="write the emulator's request log (JSON) here")
    args = parser.parse_args()
    result = run(args.accounts, args.backlog, args.final_rows, args.dump_log)
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"throughput-{args.accounts}acct-{int(time.time())}.json").write_text(
        json.dumps(result, indent=2)
    )


if __name__ == "__main__":
    main()
