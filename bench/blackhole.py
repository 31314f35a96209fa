"""Blackhole run: Postgres, then Redis, behind a network path that dies silently for 2 minutes.

Issue 14's "done when": a proxy that blackholes Postgres for 2 minutes, and one that blackholes
Redis: no worker stuck afterwards, 0 wrong, rate held. Each world gets a private Postgres
cluster, a private `redis-server`, the emulator and one `celery worker` and `celery beat` with
the chaos tests' fast settings (tests/chaos/audit.py: LEASE_SECONDS 20, batches of 20) and the
shipped rate margin. The worker and beat reach one server (Postgres in the first world, Redis,
as broker and limiter, in the second) through a `BlackholeProxy` (tests/blackhole.py). After 60
requests the proxy stops forwarding without closing anything, for `--seconds`; then it forwards
new connections again (the old ones stay dead), more messages are inserted, and the run waits
until nothing is pending. Neither process is ever restarted. Per world it reports:

- wrong: messages whose state or data differ from the emulator's truth;
- lost: messages missing from the table or still not final at the end (a stuck daemon);
- the most requests per ApiKey in any one second, and requests above 20;
- seconds from the blackhole's end until the next request, and until the next resolved message;
- whether worker and beat are still alive, and the task failures the worker logged.

If messages are still pending at the end and `py-spy` is installed (it is no dependency:
`.venv/bin/pip install py-spy`), the worker's and beat's stacks are added to the result.

    .venv/bin/python bench/blackhole.py                        # both worlds, about 7 minutes
    .venv/bin/python bench/blackhole.py --only redis --seconds 60

It prints the figures and writes them as JSON to bench/results/blackhole-<time>.json. Only
loopback is used.
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
from collections import Counter
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.chaos import over_the_rate  # noqa: E402
from tests.blackhole import BlackholeProxy  # noqa: E402
from tests.chaos.audit import (  # noqa: E402
    count_pending,
    daemon_env,
    insert_messages,
    leftover_leases,
    max_requests_per_second,
    new_messages,
    overlapping_requests,
    request_log,
    stored_rows,
    task_failures,
    wrong_messages,
)
from tests.processes import (  # noqa: E402
    Child,
    Children,
    celery,
    start_emulator,
    start_private_postgres,
    start_private_redis,
    wait_for,
)

API_KEY, SECRET_KEY = "blackhole-key", "blackhole-secret"
OAS = ("1090257973118325189", "2020202020202020202", "3030303030303030303", "4040404040404040404")
EMULATOR_FLAGS = ("--latency-min-ms", "50", "--latency-max-ms", "200")
EMULATOR_FLAGS += ("--final-after-min-s", "2", "--final-after-max-s", "20")
WORLDS = ("postgres", "redis")


def note(started: float, line: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)


def stacks(child: Child) -> str | None:
    """`py-spy dump` of a child that is still running, if py-spy is installed."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None or child.proc.poll() is not None:
        return None
    done = subprocess.run(
        [spy, "dump", "--pid", str(child.proc.pid)], capture_output=True, text=True, timeout=60
    )
    return done.stdout + done.stderr


def first_resolution_after(engine, moment: float) -> float | None:
    """Seconds from `moment` (epoch) until a message was next resolved, by Postgres's clock."""
    with engine.begin() as conn:
        first = conn.execute(
            text(
                "SELECT extract(epoch FROM min(resolved_at)) FROM messages "
                "WHERE resolved_at > to_timestamp(:moment)"
            ),
            {"moment": moment},
        ).scalar()
    return None if first is None else round(float(first) - moment, 2)


def run_world(world: str, messages: int, seconds: float, wait: float, workdir: Path) -> dict:
    started = time.monotonic()
    workdir.mkdir(parents=True)
    children = Children(workdir)
    postgres = start_private_postgres()
    engine = create_engine(postgres.url, pool_pre_ping=True)
    proxy = None
    try:
        redis_server = start_private_redis(children)
        emulator = start_emulator(children, "--account", f"{API_KEY}:{SECRET_KEY}", *EMULATOR_FLAGS)
        database_url, redis_url = postgres.url, redis_server.url()
        if world == "postgres":
            direct = make_url(postgres.url)
            proxy = BlackholeProxy(direct.host, direct.port)
            database_url = direct.set(port=proxy.port).render_as_string(hide_password=False)
        else:
            proxy = BlackholeProxy("127.0.0.1", redis_server.port)
            redis_url = f"redis://127.0.0.1:{proxy.port}/0"
        before = new_messages(messages, OAS)
        insert_messages(engine, emulator, before)
        env = daemon_env(
            database_url,
            redis_url,
            emulator.url,
            ESMS_API_KEY=API_KEY,
            ESMS_SECRET_KEY=SECRET_KEY,
            # The shipped margin, unlike the tests: this run measures the daemon as shipped.
            ESMS_RATE_SAFETY_MARGIN="0.04",
        )
        worker = celery(children, "worker", env)
        beat = celery(children, "beat", env)
        note(started, f"[{world}] {messages} messages inserted; worker and beat started")

        wait_for(lambda: len(request_log(emulator)) >= 60, timeout=120, message="60 requests")
        blackholed_at = time.time()
        proxy.blackhole()
        note(started, f"[{world}] blackhole for {seconds:.0f} s")
        time.sleep(seconds)
        proxy.resume()
        resumed_at = time.time()
        after = new_messages(messages // 5, OAS)
        insert_messages(engine, emulator, after)
        note(started, f"[{world}] resumed; {len(after)} more messages inserted")

        try:
            wait_for(lambda: count_pending(engine) == 0, timeout=wait, message="none pending")
            wait_for(lambda: leftover_leases(engine) == (0, 0), timeout=60, message="no lease")
        except AssertionError as error:
            note(started, f"[{world}] {error}")
        note(started, f"[{world}] done; checking")

        rows = before + after
        truth = emulator.admin("GET", "/truth")["messages"]
        stored = stored_rows(engine)
        final = {ref for ref, row in stored.items() if row["state"] != "pending"}
        lost = [row["ref_id"] for row in rows if row["ref_id"] not in final]
        wrong = wrong_messages({ref: stored[ref] for ref in final}, truth)
        log = request_log(emulator)
        resumed = [entry["t"] for entry in log if entry["t"] > resumed_at]
        worker_log = worker.log()
        result = {
            "world": world,
            "blackhole_seconds": seconds,
            "messages": len(rows),
            "seconds": round(time.monotonic() - started, 1),
            "wrong": len(wrong),
            "lost": len(lost),
            "leftover_leases": leftover_leases(engine),
            "requests": len(log),
            "requests_during_blackhole": sum(blackholed_at < e["t"] <= resumed_at for e in log),
            "requests_after_blackhole": len(resumed),
            "max_requests_in_1s": max(max_requests_per_second(log).values()),
            "requests_over_the_rate": over_the_rate([entry["t"] for entry in log]),
            "refids_in_two_requests_in_flight": len(overlapping_requests(log)),
            "polling_resumed_after_seconds": (
                round(min(resumed) - resumed_at, 2) if resumed else None
            ),
            "first_resolution_after_seconds": first_resolution_after(engine, resumed_at),
            "worker_alive": worker.proc.poll() is None,
            "beat_alive": beat.proc.poll() is None,
            "worker_task_failures": dict(Counter(task_failures(worker_log))),
            "worker_time_limits_hit": len(re.findall(r"Hard time limit \(", worker_log)),
            "connections_through_proxy": proxy.connections,
            "examples_wrong": [list(map(str, item[:3])) for item in wrong[:5]],
            "examples_lost": lost[:5],
        }
        if lost:
            result["stacks"] = {"worker": stacks(worker), "beat": stacks(beat)}
        return result
    finally:
        if proxy is not None:
            proxy.close()
        children.stop_all()
        engine.dispose()
        postgres.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=120, help="blackhole length (120)")
    parser.add_argument(
        "--wait", type=float, default=180, help="seconds to wait for no pending message (180)"
    )
    parser.add_argument("--only", choices=WORLDS, help="one world instead of both")
    args = parser.parse_args()
    worlds = [args.only] if args.only else list(WORLDS)
    results = []
    with tempfile.TemporaryDirectory(prefix="esms-blackhole-") as tmp:
        for world in worlds:
            results.append(
                run_world(world, args.messages, args.seconds, args.wait, Path(tmp) / world)
            )
    for result in results:
        print()
        print(f"{result['world']} blackholed {result['blackhole_seconds']:.0f} s: "
              f"{result['messages']} messages, {result['seconds']} s")  # fmt: skip
        for key in (
            "wrong", "lost", "leftover_leases", "requests", "requests_during_blackhole",
            "requests_after_blackhole", "max_requests_in_1s", "requests_over_the_rate",
            "refids_in_two_requests_in_flight", "polling_resumed_after_seconds",
            "first_resolution_after_seconds", "worker_alive", "beat_alive",
            "worker_task_failures", "worker_time_limits_hit",
        ):  # fmt: skip
            print(f"  {key:<34} {result[key]}")
    out = ROOT / "bench" / "results" / f"blackhole-{int(time.time())}.json"
    os.makedirs(out.parent, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(ROOT)}")
    good = all(
        r["wrong"] == 0 and r["lost"] == 0 and r["max_requests_in_1s"] <= 20 for r in results
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
