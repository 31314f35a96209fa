"""What RefIds the provider does not know cost: the same world with and without them.

The emulator answers Code 105 to a whole GetCallback request that names a RefId it has no data
for (`--not-found-code`), and a share of the messages are sent without CallbackUrl
(`--no-callback-rate`): the provider never has data for them. A `celery worker` and `celery
beat` poll until no message is pending; then every message is checked against the emulator's
truth (a message without callback data must end `expired` with no data, every other one with the
provider's final item), and the requests are counted at the emulator. The same world is run
without unknown RefIds, and the ratio of requests is printed.

    .venv/bin/python bench/unknown_refids.py                       # 2,000 messages, 5 %
    .venv/bin/python bench/unknown_refids.py --unknown-share 0.2 --messages 5000

A lower bound for comparison: finding u unknown RefIds among n with yes/no answers needs at
least log2(C(n, u)) requests (about 570 for 100 among 2,000), whatever the algorithm; it is
printed too. Only loopback is used; results go to bench/results/unknown-refids-*.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import redis
from sqlalchemy import create_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import drop_database, fresh_database  # noqa: E402

from tests.chaos.audit import (  # noqa: E402
    count_pending,
    daemon_env,
    insert_messages,
    leftover_leases,
    max_requests_per_second,
    new_messages,
    request_log,
    stored_rows,
    wrong_messages,
)
from tests.processes import Children, celery, start_emulator, wait_for  # noqa: E402

API_KEY, SECRET_KEY = "bench-unknown-key", "bench-unknown-secret"
OAS = ["1090257973118325189", "2020202020202020202"]
DATA_COLUMNS = ("send_status", "send_success", "total_price", "phone_number", "error_info")
REDIS_URL = "redis://127.0.0.1:6379/12"


def run(messages: int, unknown_share: float, max_age: float, workdir: Path) -> dict:
    started = time.monotonic()
    database = fresh_database("esms_bench_unknown")
    redis.Redis.from_url(REDIS_URL).flushdb()
    engine = create_engine(database)
    workdir.mkdir(parents=True, exist_ok=True)
    children = Children(workdir)
    try:
        emulator = start_emulator(
            children,
            "--account", f"{API_KEY}:{SECRET_KEY}",
            "--not-found-code",
            "--no-callback-rate", str(unknown_share),
            "--final-after-min-s", "1",
            "--final-after-max-s", "6",
            "--latency-min-ms", "20",
            "--latency-max-ms", "80",
        )  # fmt: skip
        rows = new_messages(messages, OAS)
        insert_messages(engine, emulator, rows)
        env = daemon_env(
            database,
            REDIS_URL,
            emulator.url,
            ESMS_API_KEY=API_KEY,
            ESMS_SECRET_KEY=SECRET_KEY,
            ESMS_BATCH_SIZE="200",
            ESMS_RATE_SAFETY_MARGIN="0.04",
            MESSAGE_MAX_AGE_SECONDS=str(max_age),
        )
        celery(children, "worker", env)
        celery(children, "beat", env)
        try:
            wait_for(lambda: count_pending(engine) == 0, timeout=max_age + 240, message="final")
            wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease")
        except AssertionError as error:
            print(f"unknown share {unknown_share}: {error}", file=sys.stderr)
        seconds = time.monotonic() - started
        truth = emulator.admin("GET", "/truth")["messages"]
        stored = stored_rows(engine)
        never = {ref for ref, fact in truth.items() if fact["final_state"] == "no_callback"}
        wrong = wrong_messages({r: row for r, row in stored.items() if r not in never}, truth)
        wrong += [
            (ref, stored[ref]["state"], "expired")
            for ref in never
            if stored[ref]["state"] != "expired"
            or any(stored[ref][column] is not None for column in DATA_COLUMNS)
        ]
        log = request_log(emulator)
        codes = Counter(entry["code"] for entry in log)
        return {
            "messages": messages,
            "unknown": len(never),
            "seconds": round(seconds, 1),
            "wrong": len(wrong),
            "not_final": sum(row["state"] == "pending" for row in stored.values()),
            "requests": len(log),
            "requests_by_code": {str(code): count for code, count in sorted(codes.items())},
            "requests_of_one_refid": sum(len(entry["refids"]) == 1 for entry in log),
            "max_requests_in_1s": max(max_requests_per_second(log).values(), default=0),
            "examples_wrong": [list(map(str, item[:3])) for item in wrong[:5]],
        }
    finally:
        children.stop_all()
        engine.dispose()
        drop_database("esms_bench_unknown")


def lower_bound(messages: int, unknown: int) -> int:
    """log2 of the number of ways `unknown` RefIds can hide among `messages`."""
    bits = (
        math.lgamma(messages + 1) - math.lgamma(unknown + 1) - math.lgamma(messages - unknown + 1)
    )
    return math.ceil(bits / math.log(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--unknown-share", type=float, default=0.05)
    parser.add_argument("--max-age", type=float, default=90, help="MESSAGE_MAX_AGE_SECONDS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esms-unknown-") as tmp:
        clean = run(args.messages, 0.0, args.max_age, Path(tmp) / "clean")
        unknown = run(args.messages, args.unknown_share, args.max_age, Path(tmp) / "unknown")
    result = {
        "command": " ".join(sys.argv),
        "clean": clean,
        "with_unknown": unknown,
        "requests_ratio": round(unknown["requests"] / max(clean["requests"], 1), 2),
        "identification_lower_bound": lower_bound(args.messages, unknown["unknown"]),
    }
    for name in ("clean", "with_unknown"):
        world = result[name]
        print(
            f"{name:>12}: {world['messages']} messages ({world['unknown']} unknown to the provider)"
            f" in {world['seconds']} s: {world['requests']} requests {world['requests_by_code']}"
            f" ({world['requests_of_one_refid']} of one RefId),"
            f" most in 1 s {world['max_requests_in_1s']}, wrong {world['wrong']},"
            f" not final {world['not_final']}"
        )
    print(
        f"requests with unknown RefIds / without: {result['requests_ratio']}x "
        f"(finding {unknown['unknown']} unknown among {args.messages} needs at least "
        f"{result['identification_lower_bound']} yes/no answers)"
    )
    out = ROOT / "bench" / "results" / f"unknown-refids-{int(time.time())}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    return 0 if clean["wrong"] == unknown["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
