"""Push benchmark: the receiver under load, and what pushes save the poller. Not run by CI.

(a) `latency`: `python -m worker.receiver` on loopback against a database of 200,000 final rows
    and 80,001 pending ones; `wrk` (Debian package `wrk`) sends eSMS-style GET pushes, each URL
    different (status 2, 7 then 5 of each message in turn, ErrorInfo in each documented encoding,
    1 % unknown SMSIDs), paced to `--rate` per second over `--connections` kept-alive
    connections for `--seconds`. Reports wrk's latency percentiles, errors, and the receiver's
    own counters. Then one unpaced run shows the ceiling.

(b) `savings`: the same campaign twice: the emulator (latency 250-600 ms, final status 2-25 s
    after sending) and real `celery worker` and `celery beat` with the default polling settings;
    once with the receiver running, 90 % of messages pushed and PUSH_GRACE_SECONDS set, once
    poll-only (the same messages, the same CallbackUrl, but nothing listening there). Reports
    GetCallback requests and RefIds spent, the time from each final status change at the emulator
    to the row being final (p50/p99), and whether both runs end with identical rows, each equal
    to the emulator's truth.

    .venv/bin/python bench/push.py latency     # (a), about 40 s
    .venv/bin/python bench/push.py savings     # (b), a burst campaign and a steady stream

Every result is printed and written as JSON to bench/results/. All traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import drop_database, fresh_database  # noqa: E402

from tests.integration.test_e2e import COMPARED, expected_row  # noqa: E402
from tests.integration.test_receiver import start_receiver  # noqa: E402
from tests.processes import Children, celery, child_env, free_port, start_emulator  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
# Its own name per run: engineers sharing a Postgres may run it at the same time.
DATABASE = f"esms_bench_push_{os.getpid()}"
TOKEN = "bench-push-token-" + uuid.uuid4().hex[:16]
API_KEY, SECRET_KEY = "bench-push-key", "bench-push-secret"
RESULTS = ROOT / "bench" / "results"

# wrk's script: each thread walks its messages in rounds of 2,000 and pushes status 2 to a round,
# then 7 to it, then 5, so one message's pushes are seconds apart as eSMS sends them (back to
# back, they would wait on each other's row lock): request n of thread t pushes status
# (2, 7, 5)[(n // 2000) % 3] of message base + (2000 * (n // 6000) + n % 2000) * threads + t.
LUA = r"""
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
local encodings = {
  "%7B%22error%22%3A-124%2C%22message%22%3A%22Access%20token%20is%20invalid%22%7D"
    .. "Object%20reference%20not%20set%20to%20an%20instance%20of%20an%20object.",
  "%22%7B%5C%22error%5C%22%3A-108%7D%22",
  "%257B%2522error%2522%253A-114%257D",
  "%7B%22error%22%3A-118%7D____05%2F03%2F2025%2014%3A07%3A31",
  "S%E1%BB%91%20%C4%91i%E1%BB%87n%20tho%E1%BA%A1i%20kh%C3%B4ng%20h%E1%BB%A3p%20l%E1%BB%87",
  "",
}
function init(args)
  n = 0
  nthreads = tonumber(args[1])
  pause = tonumber(args[2])
  token = args[3]
  base = tonumber(args[4])
end
function delay()
  return pause
end
request = function()
  local round = math.floor(n / 6000)
  local message = base + (2000 * round + n % 2000) * nthreads + id
  local status = ({2, 7, 5})[math.floor(n / 2000) % 3 + 1]
  n = n + 1
  local smsid = "push-" .. message
  if message % 100 == 99 then smsid = "nobody-" .. message end
  local failed = (status == 5 and message % 4 == 0) and 1 or 0
  local success = (status == 5 and failed == 0) and 1 or 0
  local info = ""
  if status == 5 and failed == 1 then info = encodings[message % #encodings + 1] end
  local path = "/esms/callback/" .. token .. "?SMSID=" .. smsid
    .. "&SendFailed=" .. failed .. "&SendStatus=" .. status .. "&SendSuccess=" .. success
    .. "&TotalPrice=" .. (success == 1 and "385.5" or "0.0")
    .. "&TotalReceiver=1&TotalSent=" .. (status == 2 and 0 or 1)
    .. "&RequestId=req-" .. message .. "&TypeId=25&telcoid=" .. (message % 7 + 1)
    .. "&phonenumber=09" .. string.format("%08d", message)
    .. "&partnerids=" .. (status == 2 and "" or string.format("%020x", message))
    .. "&error_info=" .. info .. "&oaid=1090257973118325189&tempid=254871"
  return wrk.format("GET", path)
end
function done(summary, latency, requests)
  io.write(string.format(
    "RESULT %d %d %d %d %d %d %d %d %.1f %.1f %.1f %.1f %.1f %.1f\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# --- (a) latency under load -------------------------------------------------------------------


def wrk(url: str, threads: int, connections: int, seconds: int, pause_ms: float, base: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA)
    try:
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
             "-s", script.name, url, "--", str(threads), str(pause_ms), TOKEN, str(base)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    fields = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    requests, duration_us, connect, read, write, status, timeout, _ = map(int, fields[:8])
    p50, p90, p99, p999, worst, mean = (float(value) / 1000 for value in fields[8:])
    return {
        "requests": requests,
        "seconds": round(duration_us / 1e6, 2),
        "requests_per_second": round(requests / (duration_us / 1e6), 1),
        "errors": {"connect": connect, "read": read, "write": write, "timeout": timeout},
        "non_2xx": status,
        "latency_ms": {
            "p50": round(p50, 2),
            "p90": round(p90, 2),
            "p99": round(p99, 2),
            "p99.9": round(p999, 2),
            "max": round(worst, 2),
            "mean": round(mean, 2),
        },
    }


# Pending rows `push-0` ... : the paced run pushes to the first half, the ceiling run the second.
_PENDING = 80_000


def run_latency(rate: int, seconds: int, connections: int) -> dict:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: sudo apt-get install wrk")
    url = fresh_database(DATABASE)
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO messages (ref_id, oa_id, state, send_status, send_success, total_price,
                                  created_at, resolved_at, poll_count)
            SELECT 'final-' || g, '1090257973118325189', 'sent', 5, 1, 220.0,
                   now() - interval '2 days', now() - interval '1 day', 1
            FROM generate_series(1, 200000) AS g
            """
        )
        conn.execute(
            "INSERT INTO messages (ref_id, oa_id) SELECT 'push-' || g, '1090257973118325189' "
            "FROM generate_series(0, %s) AS g",
            (_PENDING,),
        )
        conn.execute("VACUUM ANALYZE messages")
    with tempfile.TemporaryDirectory() as tmp:
        children = Children(Path(tmp))
        try:
            receiver = start_receiver(children, url, TOKEN)
            threads = 2
            # wrk paces each connection by a pause after each answer, so the rate is
            # connections / (pause + latency): a short run measures the latency to subtract.
            pause_ms = connections * 1000 / rate
            print(f"(a) calibrating the pause for {rate}/s...", flush=True)
            trial = wrk(receiver.url, threads, connections, 5, pause_ms, base=_PENDING // 4)
            pause_ms = max(pause_ms - trial["latency_ms"]["mean"], 0)
            print(f"    {rate}/s for {seconds}s over {connections} connections...", flush=True)
            load_before = os.getloadavg()
            paced = wrk(receiver.url, threads, connections, seconds, pause_ms, base=0)
            stats_paced = receiver.stats()
            metrics_paced = _write_metrics(receiver.metrics())
            print("    ceiling: unpaced, 32 connections, 10 s...", flush=True)
            ceiling = wrk(receiver.url, threads, 32, 10, 0, base=_PENDING // 2)
            processes = _receiver_processes(receiver.child.proc.pid)
            stats_all = receiver.stats()
            log = receiver.child.log()
        finally:
            children.stop_all()
    drop_database(DATABASE)
    return {
        "receiver_processes": processes,
        "target_rate": rate,
        "connections": connections,
        "pause_ms_per_connection": round(pause_ms, 2),
        "load_average_before": [round(value, 2) for value in load_before],
        "paced": paced,
        "receiver_counters_after_paced": stats_paced,
        "receiver_writes_after_paced": metrics_paced,
        "ceiling_unpaced_32_connections": ceiling,
        "receiver_counters_at_end": stats_all,
        "token_in_receiver_log": TOKEN in log,
    }


def _write_metrics(exposition: str) -> dict[str, float]:
    """From the receiver's /metrics: its transactions, their mean size and mean duration."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if not sample.labels
    }
    transactions = values.get("esms_receiver_write_duration_seconds_count", 0)
    return {
        "transactions": transactions,
        "mean_pushes_per_transaction": round(
            values.get("esms_receiver_batch_pushes_sum", 0) / max(transactions, 1), 2
        ),
        "mean_transaction_ms": round(
            1000 * values.get("esms_receiver_write_duration_seconds_sum", 0) / max(transactions, 1),
            2,
        ),
    }


def _receiver_processes(pid: int) -> dict[str, int]:
    """The supervisor and the workers uvicorn spawned for it (not its resource tracker)."""
    workers = 0
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        for child in handle.read().split():
            try:
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    workers += b"spawn_main" in cmdline.read()
            except OSError:
                pass
    return {"supervisor": 1, "workers": workers}


# --- (b) GetCallback requests saved ----------------------------------------------------------

_DATED = re.compile(r"____\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}")


def wait(predicate, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def scalar(url: str, sql: str) -> Any:
    with psycopg.connect(libpq(url)) as conn:
        return conn.execute(sql).fetchone()[0]


def run_campaign(
    *,
    pushes: bool,
    messages: int,
    per_second: int,
    oas: int,
    push_port: int,
    grace: float,
    poll_interval: float,
    fill: float,
) -> dict:
    """One run: send `messages` at `per_second`, wait until none is pending, collect."""
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    url = fresh_database(DATABASE)
    push_url = f"http://127.0.0.1:{push_port}/esms/callback/{TOKEN}"
    ref_ids = [f"{uuid.UUID(int=i * 7919 + 17).hex}{i % 100:02d}" for i in range(messages)]
    oa_ids = [f"10902579731183251{n:02d}" for n in range(oas)]
    rows = [(ref, oa_ids[i % oas]) for i, ref in enumerate(ref_ids)]
    with tempfile.TemporaryDirectory() as tmp:
        children = Children(Path(tmp))
        try:
            receiver = None
            if pushes:
                receiver = start_receiver(children, url, TOKEN, port=push_port)
            emulator = start_emulator(
                children,
                "--account", f"{API_KEY}:{SECRET_KEY}",
                "--seed", "7",
                "--latency-min-ms", "250",
                "--latency-max-ms", "600",
                "--final-after-min-s", "2",
                "--final-after-max-s", "25",
                "--push-url", push_url,
                "--push-rate", "0.9",
            )  # fmt: skip
            env = child_env(
                DATABASE_URL=url,
                REDIS_URL=REDIS_URL,
                ESMS_BASE_URL=emulator.url,
                ESMS_API_KEY=API_KEY,
                ESMS_SECRET_KEY=SECRET_KEY,
                PUSH_GRACE_SECONDS=str(grace if pushes else 0),
                POLL_INTERVAL_SECONDS=str(poll_interval),
                # The same in both runs: the comparison is pushes or not, nothing else.
                POLL_BATCH_FILL_SECONDS=str(fill),
            )
            celery(children, "worker", env, "--loglevel=WARNING")
            celery(children, "beat", env, "--loglevel=WARNING")
            wait(
                lambda: (
                    (scalar(url, "SELECT coalesce(max(ticks), 0) FROM scheduler_heartbeat")) >= 2
                ),
                60,
                "worker and beat",
            )
            print(f"    sending {messages:,} messages at {per_second:,}/s...", flush=True)
            started = time.time()
            chunk = max(1, per_second // 10)
            with psycopg.connect(libpq(url), autocommit=True) as conn:
                for first in range(0, messages, chunk):
                    due = started + first / per_second
                    time.sleep(max(0.0, due - time.time()))
                    part = rows[first : first + chunk]
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO messages (ref_id, oa_id) VALUES (%s, %s)", part
                        )
                    emulator.admin(
                        "POST",
                        "/messages",
                        json={"messages": [{"ref_id": r, "oa_id": o} for r, o in part]},
                    )
            sent_in = time.time() - started
            wait(
                lambda: scalar(url, "SELECT count(*) FROM messages WHERE state = 'pending'") == 0,
                600,
                "every message final",
                interval=1,
            )
            drained_in = time.time() - started
            truth = emulator.admin("GET", "/truth")["messages"]
            log = emulator.admin("GET", "/requests", params={"refids": 0})["requests"]
            emulator_pushes = emulator.admin("GET", "/stats").get("pushes")
            receiver_stats = receiver.stats() if receiver else None
            with psycopg.connect(libpq(url)) as conn:
                cur = conn.execute(
                    "SELECT ref_id, state, error_code, extract(epoch FROM resolved_at), "
                    + ", ".join(COMPARED)
                    + " FROM messages"
                )
                stored = {
                    row[0]: {
                        "state": row[1],
                        "error_code": row[2],
                        "resolved_at": float(row[3]),
                        **dict(zip(COMPARED, row[4:], strict=True)),
                    }
                    for row in cur
                }
                sources = dict(
                    conn.execute(
                        "SELECT source, count(*) FROM message_history "
                        "WHERE old_state = 'pending' AND new_state <> 'pending' GROUP BY 1"
                    ).fetchall()
                )
        finally:
            children.stop_all()
    drop_database(DATABASE)

    wrong = 0
    for ref_id in ref_ids:
        fact, row = truth[ref_id], stored[ref_id]
        if (
            row["state"] != fact["state"]
            or {c: row[c] for c in COMPARED} != expected_row(fact)
            or row["error_code"] != fact["error_code"]
        ):
            wrong += 1
    latency = sorted(stored[r]["resolved_at"] - truth[r]["final_at"] for r in ref_ids)
    pushed = [r for r in ref_ids if truth[r]["pushed"]]
    latency_pushed = sorted(stored[r]["resolved_at"] - truth[r]["final_at"] for r in pushed)
    ok = [entry for entry in log if entry["code"] == 100]
    return {
        "pushes": pushes,
        "messages": messages,
        "sent_over_s": round(sent_in, 1),
        "all_final_after_s": round(drained_in, 1),
        "getcallback_requests": len(log),
        "getcallback_requests_ok": len(ok),
        "refids_read": sum(entry["n_read"] for entry in log),
        "final_by": sources,
        "status_change_to_final_s": percentiles(latency),
        "status_change_to_final_s_pushed_messages": percentiles(latency_pushed),
        "rows_not_equal_to_truth": wrong,
        "emulator_pushes": emulator_pushes,
        "receiver_counters": receiver_stats,
        # Text columns holding '' or blanks where NULL is meant: 0 since records.to_text.
        "rows_with_blank_text": sum(
            any(isinstance(v, str) and not v.strip() for v in row.values())
            for row in stored.values()
        ),
        # NULL stays NULL in the comparison: only the date inside a dated ErrorInfo is masked.
        "_rows": {
            ref: {
                **row,
                "error_info": None
                if row["error_info"] is None
                else _DATED.sub("____<date>", row["error_info"]),
            }
            for ref, row in stored.items()
        },
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(values[-1], 3)}


def compare_rows(one: dict, other: dict) -> int:
    keys = ("state", "error_code", *COMPARED)
    return sum(
        1
        for ref, row in one.items()
        if {k: row[k] for k in keys} != {k: other[ref][k] for k in keys}
    )


def run_savings(
    scenarios: list[tuple[str, int, int, int]], grace: float, poll_interval: float, fill: float
) -> dict:
    results: dict[str, Any] = {
        "push_grace_seconds": grace,
        "poll_interval_seconds": poll_interval,
        "poll_batch_fill_seconds": fill,
        "scenarios": {},
    }
    for name, messages, per_second, oas in scenarios:
        port = free_port()
        runs = {}
        for pushes in (True, False):
            label = "push" if pushes else "poll_only"
            print(f"(b) {name}: {label}...", flush=True)
            runs[label] = run_campaign(
                pushes=pushes,
                messages=messages,
                per_second=per_second,
                oas=oas,
                push_port=port,
                grace=grace,
                poll_interval=poll_interval,
                fill=fill,
            )
        differing = compare_rows(runs["push"].pop("_rows"), runs["poll_only"].pop("_rows"))
        saved = 1 - runs["push"]["getcallback_requests"] / runs["poll_only"]["getcallback_requests"]
        refids_saved = 1 - runs["push"]["refids_read"] / runs["poll_only"]["refids_read"]
        results["scenarios"][name] = {
            "messages": messages,
            "sent_per_second": per_second,
            "oas": oas,
            "requests_fewer_fraction": round(saved, 4),
            "refids_fewer_fraction": round(refids_saved, 4),
            "rows_differing_between_runs": differing,
            **runs,
        }
        print(json.dumps(results["scenarios"][name], indent=2), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    latency = sub.add_parser("latency", help="(a) the receiver under load, with wrk")
    latency.add_argument("--rate", type=int, default=1000)
    latency.add_argument("--seconds", type=int, default=20)
    latency.add_argument("--connections", type=int, default=50)
    savings = sub.add_parser("savings", help="(b) push vs poll-only")
    savings.add_argument("--messages", type=int, default=10_000)
    savings.add_argument("--grace", type=float, default=40, help="PUSH_GRACE_SECONDS")
    savings.add_argument("--poll-interval", type=float, default=30, help="POLL_INTERVAL_SECONDS")
    savings.add_argument(
        "--fill", type=float, default=30, help="POLL_BATCH_FILL_SECONDS (both runs)"
    )
    savings.add_argument("--only", choices=["campaign", "steady"], help="run one scenario")
    args = parser.parse_args()
    if args.what == "latency":
        result = run_latency(args.rate, args.seconds, args.connections)
    else:
        scenarios = [
            # A campaign: every message handed to eSMS within a few seconds.
            ("campaign", args.messages, 2_000, 2),
            # A steady stream: the same number over 40 s.
            ("steady", args.messages, max(1, args.messages // 40), 2),
        ]
        chosen = [one for one in scenarios if args.only in (None, one[0])]
        result = run_savings(chosen, args.grace, args.poll_interval, args.fill)
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"push-{args.what}-{int(time.time())}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
