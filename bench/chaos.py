"""Chaos run: the whole daemon against a misbehaving provider while its worker, Redis and Postgres
each go down once.

Starts a private Postgres cluster and a private `redis-server` (so stopping them disturbs nothing
else), the emulator with every fault knob on (HTTP 5xx, answers slower than the client timeout,
truncated bodies and HTML pages, `Data_callback` null or missing, Codes 99/105/160, stale and
duplicate items, numbers as strings), a `celery worker` and `celery beat`, and inserts the
messages. While they are being polled it kills the worker with `kill -9` (and starts a new one),
stops Redis for a few seconds and starts it again empty, and stops Postgres for a few seconds and
starts it again. Then it waits until no message is pending and checks:

- every message against the emulator's truth (state, every reported field, error code);
- lost: messages missing from the table or still not final at the end;
- the request log: the most requests per ApiKey in any one-second window (the provider allows 20),
  how many requests came above that, and RefIds in two requests in flight at once.

    .venv/bin/python bench/chaos.py                  # 3,000 messages, about a minute
    .venv/bin/python bench/chaos.py --messages 10000

It prints the figures and writes them as JSON to bench/results/. Only loopback is used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import create_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.audit import (  # noqa: E402
    RATE_LIMIT,
    count_pending,
    daemon_env,
    insert_messages,
    leftover_leases,
    max_requests_per_second,
    new_messages,
    overlapping_requests,
    request_log,
    stored_rows,
    wrong_messages,
)
from tests.processes import (  # noqa: E402
    Children,
    celery,
    start_emulator,
    start_private_postgres,
    start_private_redis,
    wait_for,
)

API_KEY, SECRET_KEY = "chaos-key", "chaos-secret"
OAS = ("1090257973118325189", "2020202020202020202", "3030303030303030303", "4040404040404040404")
TIMEOUT_SECONDS = 2.0
OUTAGE_SECONDS = 5.0
EMULATOR_FLAGS = {
    "--latency-min-ms": "50",
    "--latency-max-ms": "300",
    "--final-after-min-s": "2",
    "--final-after-max-s": "40",
    "--fault-5xx-rate": "0.05",
    "--fault-slow-rate": "0.03",
    "--slow-seconds": "3",
    "--fault-broken-body-rate": "0.06",
    "--fault-code-rate": "0.06",
    "--fault-codes": "99,105,160",
    "--fault-stale-rate": "0.2",
    "--fault-duplicate-rate": "0.2",
    "--numbers-as-strings-rate": "0.3",
}


def note(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)


def over_the_rate(stamps: list[float]) -> int:
    """Requests that arrived when RATE_LIMIT others had already arrived within the last second."""
    stamps = sorted(stamps)
    over, start = 0, 0
    for end, t in enumerate(stamps):
        while t - stamps[start] >= 1.0:
            start += 1
        if end - start + 1 > RATE_LIMIT:
            over += 1
    return over


def provider_faults(log: list[dict]) -> dict[str, int]:
    """What the emulator did wrong, by kind, from its request log."""
    kinds: Counter[str] = Counter()
    for entry in log:
        fault, detail = entry["fault"], entry["fault_detail"] or ""
        if fault == "5xx":
            kinds["HTTP 5xx"] += 1
        elif fault == "slow":
            kinds["answer slower than the timeout"] += 1
        elif fault == "broken_body":
            kinds[f"broken body ({detail})"] += 1
        elif fault == "code":
            kinds[f"Code {detail}"] += 1
        elif fault:
            for part in detail.split(","):
                name, _, count = part.partition("=")
                kinds[f"{name} items"] += int(count)
        if entry["over_limit"]:
            kinds["Code 160 (over the emulator's rate)"] += 1
        if entry["numbers_as_strings"]:
            kinds["numbers as strings (responses)"] += 1
    return dict(sorted(kinds.items()))


def run(messages: int, workdir: Path) -> dict:
    started = time.monotonic()
    children = Children(workdir)
    postgres = start_private_postgres()
    engine = create_engine(postgres.url, pool_pre_ping=True)
    try:
        redis_server = start_private_redis(children)
        flags = [flag for pair in EMULATOR_FLAGS.items() for flag in pair]
        emulator = start_emulator(children, "--account", f"{API_KEY}:{SECRET_KEY}", *flags)
        rows = new_messages(messages, OAS)
        insert_messages(engine, emulator, rows)
        env = daemon_env(
            postgres.url,
            redis_server.url(),
            emulator.url,
            ESMS_API_KEY=API_KEY,
            ESMS_SECRET_KEY=SECRET_KEY,
            ESMS_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS),
            ESMS_BATCH_SIZE="50",
            # The default margin, unlike the tests: this run measures the daemon as shipped.
            ESMS_RATE_SAFETY_MARGIN="0.04",
        )
        worker = celery(children, "worker", env)
        celery(children, "beat", env)
        note(started, f"{messages} messages inserted; worker and beat started")
        injected: Counter[str] = Counter()

        def requests_made() -> int:
            return len(request_log(emulator))

        wait_for(lambda: requests_made() >= 60, timeout=120, message="60 requests")
        worker.stop(signal.SIGKILL)
        injected["worker kill -9 (whole process group)"] += 1
        note(started, f"worker killed with SIGKILL after {requests_made()} requests")
        celery(children, "worker", env)

        mark = requests_made()
        wait_for(lambda: requests_made() >= mark + 100, timeout=120, message="100 more requests")
        redis_server.stop()
        time.sleep(OUTAGE_SECONDS)
        redis_server.start()
        injected["Redis stopped 5 s, restarted empty"] += 1
        note(started, "Redis stopped for 5 s and started again, empty")

        mark = requests_made()
        wait_for(lambda: requests_made() >= mark + 100, timeout=120, message="100 more requests")
        postgres.stop()
        time.sleep(OUTAGE_SECONDS)
        postgres.start()
        injected["Postgres stopped 5 s, restarted"] += 1
        note(started, "Postgres stopped for 5 s and started again")

        try:
            wait_for(lambda: count_pending(engine) == 0, timeout=300, message="no message pending")
            wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease")
        except AssertionError as error:
            note(started, str(error))
        note(started, "done; checking")

        truth = emulator.admin("GET", "/truth")["messages"]
        stored = stored_rows(engine)
        final = {ref for ref, row in stored.items() if row["state"] != "pending"}
        lost = [row["ref_id"] for row in rows if row["ref_id"] not in final]
        wrong = wrong_messages({ref: stored[ref] for ref in final}, truth)
        log = request_log(emulator)
        stamps = [entry["t"] for entry in log]
        return {
            "messages": messages,
            "seconds": round(time.monotonic() - started, 1),
            "checked": len(final),
            "wrong": len(wrong),
            "lost": len(lost),
            "leftover_leases": leftover_leases(engine),
            "requests": len(log),
            "max_requests_in_1s": max(max_requests_per_second(log).values()),
            "requests_over_the_rate": over_the_rate(stamps),
            "refids_in_two_requests_in_flight": len(overlapping_requests(log, TIMEOUT_SECONDS)),
            "faults_injected": dict(injected) | provider_faults(log),
            "worker_tracebacks": sum(
                child.log().count("Traceback")
                for child in children.started
                if child.name.startswith("worker")
            ),
            "examples_wrong": [list(map(str, item[:3])) for item in wrong[:5]],
            "examples_lost": lost[:5],
        }
    finally:
        children.stop_all()
        engine.dispose()
        postgres.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esms-chaos-") as tmp:
        result = run(args.messages, Path(tmp))
    print()
    print(f"chaos run: {result['messages']} messages, {result['seconds']} s")
    print(f"  messages checked           {result['checked']}")
    print(f"  wrong                      {result['wrong']}")
    print(f"  lost                       {result['lost']}")
    print(f"  leases left (batches, rows) {result['leftover_leases']}")
    print(f"  requests                   {result['requests']}")
    print(f"  most in any 1 s (ApiKey)   {result['max_requests_in_1s']} (the provider allows 20)")
    print(f"  requests over the rate     {result['requests_over_the_rate']}")
    print(f"  RefIds in 2 requests at once {result['refids_in_two_requests_in_flight']}")
    print(f"  worker tracebacks          {result['worker_tracebacks']}")
    print("  faults injected:")
    for kind, count in result["faults_injected"].items():
        print(f"    {kind:<40} {count}")
    out = ROOT / "bench" / "results" / f"chaos-{int(time.time())}.json"
    os.makedirs(out.parent, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0 if result["wrong"] == 0 and result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
