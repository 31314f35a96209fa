"""Throughput benchmark: drain a backlog at the provider's full rate, counted where it counts.

Builds a fresh database `esms_bench` holding final rows and a backlog of pending ones per busy
account (all due, every callback already final at the emulator), starts the emulator with
250–600 ms latency, one or more bare `celery -A worker worker` and a `celery -A worker beat`, and
waits until nothing is pending. Everything it reports comes from outside the worker: the
emulator's request log (arrival times, Codes) and /proc:

- RefIds resolved per second from the first request to the last, as a fraction of the physical
  ceiling (provider limit × 200 RefIds per busy account);
- the most requests of any ApiKey that arrived in any 1 s window (every request, refused or not),
  and the Code 160 answers; with `tcpdump` installed also the most POSTs (all keys together)
  that crossed the loopback interface in any 1 s window, from the kernel's timestamps;
- seconds from starting the worker(s) to the first request at the emulator;
- the peak PSS of the worker process tree(s), sampled every 0.5 s;
- worker and Postgres CPU per final RefId, from /proc between the first request and the drain
  (Postgres: every `postgres` process plus the children it reaped meanwhile), and Postgres's
  split by process: each session by its program (`application_name`), the WAL writer, the
  checkpointer...;
- after the drain, every backlog row compared with the emulator's truth (state, every reported
  field, error code): the wrong rows.

Worlds (`--scenario`, or `all`):

    one         1 busy account
    idle2       1 busy account, 2 idle accounts configured
    two-workers 1 busy account, 2 idle accounts, two workers on this host
    hog         1 busy account, two busy loops hogging both cores for the whole run
    two         2 busy accounts
    four        4 busy accounts
    strict      1 busy account against a provider that allows 18 per second and counts
                refused requests too (`--rate-limit 18 --count-refused`)
    idle-memory 4 accounts configured, nothing to poll: PSS of an idle worker after 20 s
    tls         1 busy account, 2 idle accounts, the provider over HTTPS whose handshake takes
                60 ms (a 30 ms round trip: bench/slowtls.py in front of the emulator), so a new
                connection is slower than a rate slot may be late

    .venv/bin/python bench/throughput.py --scenario one
    .venv/bin/python bench/throughput.py --scenario all      # every world, ~10 minutes
    .venv/bin/python bench/throughput.py --scenario one --webhook   # with FINAL_WEBHOOK_URL set

BENCH_DATABASE (default esms_bench) and BENCH_REDIS_URL name the databases it uses.

Results are printed and written as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdb import PG_SERVER, drop_database, fresh_database  # noqa: E402

from tests.chaos.audit import wrong_messages  # noqa: E402
from tests.processes import (  # noqa: E402
    Children,
    celery,
    child_env,
    free_port,
    start_emulator,
    wait_for,
)
from worker.emulator.ratelimit import max_in_window  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
# Two people benchmarking on one server give each run its own database and Redis database.
DATABASE = os.environ.get("BENCH_DATABASE", "esms_bench")
RATE_LIMIT = 20
BATCH = 200
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    busy: int = 1
    idle: int = 0
    workers: int = 1
    hog: bool = False
    provider_limit: int = RATE_LIMIT
    count_refused: bool = False
    idle_memory: bool = False
    # The provider behind TLS whose handshake takes this long (bench/slowtls.py); 0: plain HTTP.
    tls_handshake_ms: float = 0


SCENARIOS = {
    "one": Scenario(),
    "idle2": Scenario(idle=2),
    "two-workers": Scenario(idle=2, workers=2),
    "hog": Scenario(hog=True),
    "two": Scenario(busy=2),
    "four": Scenario(busy=4),
    "strict": Scenario(provider_limit=18, count_refused=True),
    "idle-memory": Scenario(busy=0, idle=4, idle_memory=True),
    "tls": Scenario(idle=2, tls_handshake_ms=60),
}


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


def check_rows(url: str, emulator) -> tuple[int, list[tuple]]:
    """Every backlog row against the emulator's truth (state, every reported field, error
    code), after the drain: (rows checked, the wrong ones)."""
    truth = emulator.admin("GET", "/truth")["messages"]
    with psycopg.connect(url.replace("+psycopg", ""), row_factory=dict_row) as conn:
        rows = conn.execute("SELECT * FROM messages WHERE ref_id NOT LIKE 'final-%'").fetchall()
    stored = {row["ref_id"]: row for row in rows}
    return len(stored), wrong_messages(stored, truth)


# --- /proc -------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                parents[int(entry)] = int(fields[1])
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent]
        found += children
        frontier += children
    return found


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of `pids` (user + system)."""
    return sum(_cpu(pid, reaped=False) or 0.0 for pid in pids)


def _cpu(pid: int, reaped: bool) -> float | None:
    """CPU seconds of `pid`; with `reaped`, also of the children it waited for. None if gone."""
    fields = _stat(pid)
    if not fields:
        return None
    return sum(int(value) for value in fields[11 : 15 if reaped else 13]) / CLOCK_TICKS


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def postgres_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _comm(int(e)) == "postgres"]


def postgres_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each `postgres` process; the postmaster's also counts the sessions it
    reaped (a connection that ended)."""
    found = {pid: _cpu(pid, reaped=True) for pid in pids}
    return {pid: seconds for pid, seconds in found.items() if seconds is not None}


def postgres_roles(conn: psycopg.Connection) -> dict[int, str]:
    """What each Postgres process is for: its backend type, and for a client session the
    program (`application_name`: esms-worker, this bench...) and whether it works on another
    database than the bench's."""
    roles: dict[int, str] = {}
    for pid, kind, program, database in conn.execute(
        "SELECT pid, backend_type, application_name, datname FROM pg_stat_activity"
    ):
        if kind != "client backend":
            roles[pid] = kind
        elif database != DATABASE:
            roles[pid] = "sessions on other databases"
        else:
            roles[pid] = f"session: {program or 'unnamed'}"
    return roles


class Sampler(threading.Thread):
    """Every 0.5 s: wall time, CPU of the workers' trees and of Postgres, PSS of the workers; and
    each Postgres process's CPU with what it is for (the breakdown)."""

    def __init__(self, worker_pids: list[int], url: str) -> None:
        super().__init__(daemon=True)
        self.worker_pids = worker_pids
        # One session for the whole run: a connection per sample would cost Postgres a fork each.
        self.conn = psycopg.connect(
            url.replace("+psycopg", ""), application_name="bench", autocommit=True
        )
        self.samples: list[tuple[float, float, float, int]] = []
        self.postgres: list[dict[int, float]] = []
        self.roles: dict[int, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def take(self) -> None:
        workers = [pid for root in self.worker_pids for pid in _tree(root)]
        per_process = postgres_cpu(postgres_pids())
        try:
            with self.lock:
                self.roles.update(postgres_roles(self.conn))
        except psycopg.Error:
            pass
        self.postgres.append(per_process)
        self.samples.append(
            (time.time(), cpu_seconds(workers), sum(per_process.values()), pss_kib(workers))
        )

    def run(self) -> None:
        while not self.stop.is_set():
            self.take()
            self.stop.wait(0.5)

    def drained(self) -> bool:
        """No pending row left, on the sampler's session: one index probe (counting the pending
        rows every 0.5 s cost Postgres 13 µs per RefId, which the figures would have held)."""
        with self.lock:
            query = "SELECT NOT EXISTS (SELECT FROM messages WHERE state = 'pending')"
            return self.conn.execute(query).fetchone()[0]

    def _index(self, t: float) -> int:
        before = [i for i, s in enumerate(self.samples) if s[0] <= t]
        return before[-1] if before else 0

    def at(self, t: float) -> tuple[float, float, float, int]:
        """The last sample taken at or before `t` (the first one if none)."""
        return self.samples[self._index(t)]

    def postgres_breakdown(self, start: float, end: float) -> dict[str, float]:
        """Postgres CPU seconds between the samples at `start` and `end`, by what each process
        is for; the postmaster's line holds the sessions that ended meanwhile."""
        first, last = self.postgres[self._index(start)], self.postgres[self._index(end)]
        breakdown: Counter = Counter()
        for pid, seconds in last.items():
            role = self.roles.get(pid, "postmaster and ended sessions")
            breakdown[role] += seconds - first.get(pid, 0.0)
        return dict(breakdown)


def start_slow_tls(children: Children, upstream: str, delay_ms: float, directory: Path) -> str:
    """bench/slowtls.py in front of the emulator at `upstream`; its https URL."""
    child = children.spawn(
        "slowtls",
        [
            sys.executable, str(ROOT / "bench" / "slowtls.py"),
            "--upstream", upstream.removeprefix("http://"),
            "--delay-ms", str(delay_ms), "--dir", str(directory),
        ],
        child_env(),
    )  # fmt: skip
    port = wait_for(
        lambda: (found := re.search(r"listening (\d+)", child.log())) and found.group(1),
        timeout=20,
        interval=0.1,
        message="TLS front listening",
    )
    return f"https://127.0.0.1:{port}"


def start_wire_capture(children: Children, port: int):
    """`tcpdump` on lo printing one line per TCP segment to the emulator that starts with "POST"
    (kernel timestamps); None when tcpdump is not installed."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        return None
    post = "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x504f5354"
    argv = [tcpdump, "-i", "lo", "-tt", "-n", "-l", "-U", f"tcp dst port {port} and {post}"]
    child = children.spawn("tcpdump", argv, child_env())
    time.sleep(1.0)  # tcpdump needs a moment before it captures
    return child


def wire_times(child) -> list[float]:
    times = []
    for line in child.log().splitlines():
        head = line.split(" ", 1)[0]
        if head.replace(".", "", 1).isdigit():
            times.append(float(head))
    return sorted(times)


def retimed_sends(port: int) -> Counter:
    """The worker's own count of rate slots it gave up before sending, by reason (a diagnosis:
    the rate itself is counted at the emulator and on the wire)."""
    found: Counter = Counter()
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return found
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "esms_sends_retimed_total":
                found[sample.labels["reason"]] += int(sample.value)
    return found


def start_hogs(children: Children, count: int = 2) -> None:
    for index in range(count):
        children.spawn(f"hog-{index}", [sys.executable, "-c", "while True: pass"], child_env())


# --- one run -----------------------------------------------------------------------------------


class WebhookSink:
    """With --webhook: a loopback HTTP server that answers 204 to every POST and counts the
    final-status events posted to it (worker.webhook)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.events = 0
        self.posts = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.events += len(json.loads(body)["events"])
                sink.posts += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(
    name: str,
    scenario: Scenario,
    backlog: int,
    final_rows: int,
    dump_log: str | None = None,
    webhook: bool = False,
) -> dict:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    names = ["default"] + [f"shop{i}" for i in range(1, scenario.busy + scenario.idle)]
    busy = names[: scenario.busy]
    keys = {account: (f"bench-key-{account}", f"bench-secret-{account}") for account in names}
    print(f"[{name}] preparing {final_rows:,} final rows, {backlog:,} pending x {busy}", flush=True)
    url = prepare_database(final_rows, 0 if scenario.idle_memory else backlog, busy)

    with tempfile.TemporaryDirectory() as tmp:
        children = Children(Path(tmp))
        try:
            flags = [
                f for api_key, secret in keys.values() for f in ("--account", f"{api_key}:{secret}")
            ]
            flags += ["--latency-min-ms", "250", "--latency-max-ms", "600"]
            flags += ["--final-after-min-s", "0", "--final-after-max-s", "0"]
            flags += ["--rate-limit", str(scenario.provider_limit)]
            if scenario.count_refused:
                flags.append("--count-refused")
            emulator = start_emulator(children, *flags)
            wire = start_wire_capture(children, int(emulator.url.rsplit(":", 1)[1]))
            provider_url, tls_env = emulator.url, {}
            if scenario.tls_handshake_ms:
                provider_url = start_slow_tls(
                    children, emulator.url, scenario.tls_handshake_ms, Path(tmp)
                )
                tls_env = {"SSL_CERT_FILE": str(Path(tmp) / "cert.pem")}
            default_key, default_secret = keys["default"]
            others = {
                account: {"api_key": api_key, "secret_key": secret}
                for account, (api_key, secret) in keys.items()
                if account != "default"
            }
            env = child_env(
                DATABASE_URL=url,
                REDIS_URL=REDIS_URL,
                ESMS_BASE_URL=provider_url,
                **tls_env,
                ESMS_API_KEY=default_key,
                ESMS_SECRET_KEY=default_secret,
                ESMS_ACCOUNTS=json.dumps(others),
            )
            sink = WebhookSink() if webhook else None
            if sink is not None:
                env.update(FINAL_WEBHOOK_URL=sink.url, FINAL_WEBHOOK_SECRET="bench-webhook-secret")
            if scenario.hog:
                start_hogs(children)
            celery_bin = str(Path(sys.executable).parent / "celery")
            metric_ports = [free_port() for _ in range(scenario.workers)]
            started = time.time()
            workers = [
                children.spawn(
                    f"worker-{index}",
                    [
                        celery_bin,
                        "-A",
                        "worker",
                        "worker",
                        "--loglevel=WARNING",
                        "-n",
                        f"w{index}@%h",
                    ],
                    {**env, "METRICS_PORT": str(metric_ports[index])},
                )
                for index in range(scenario.workers)
            ]
            celery(children, "beat", env)
            sampler = Sampler([worker.proc.pid for worker in workers], url)
            sampler.start()
            if scenario.idle_memory:
                time.sleep(20)
            else:
                wait_for(sampler.drained, timeout=900, interval=0.5, message="drained")
            drained = time.time()
            sampler.stop.set()
            sampler.join()
            sampler.take()
            sampler.conn.close()
            log = emulator.admin("GET", "/requests", params={"refids": 0})["requests"]
            checked, wrong = check_rows(url, emulator) if not scenario.idle_memory else (0, [])
            if dump_log:
                Path(dump_log).write_text(json.dumps(log))
            retimed = sum((retimed_sends(port) for port in metric_ports), Counter())
            wire_stamps = None
            if wire is not None:
                wire.stop(signal.SIGINT)
                wire_stamps = wire_times(wire)
            for worker in workers:
                if worker.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {worker.log()[-3000:]}")
            if sink is not None:
                wanted = backlog * scenario.busy
                wait_for(lambda: sink.events >= wanted, timeout=300, message="webhook caught up")
                webhook_done = time.time()
        finally:
            children.stop_all()
            if sink is not None:
                sink.close()
    drop_database(DATABASE)

    peak_pss = max(s[3] for s in sampler.samples) / 1024
    result: dict = {
        "scenario": name,
        **scenario.__dict__,
        "worker_peak_pss_mib": round(peak_pss, 1),
    }
    if scenario.idle_memory:
        result["requests"] = len(log)
        return result

    first, last = min(e["t"] for e in log), max(e["t"] for e in log)
    resolved = backlog * scenario.busy
    rate = resolved / (last - first)
    ceiling = scenario.provider_limit * BATCH * scenario.busy
    start_sample, end_sample = sampler.at(first), sampler.at(drained)
    codes: dict[str, int] = {}
    for entry in log:
        codes[str(entry["code"])] = codes.get(str(entry["code"]), 0) + 1
    refused = [e["t"] for e in log if e["code"] == 160]
    per_key = {
        account: max_in_window(sorted(e["t"] for e in log if e["api_key"] == api_key), 1.0)
        for account, (api_key, _) in keys.items()
        if account in busy
    }
    result["rows_checked_against_truth"] = checked
    result["wrong_rows"] = len(wrong)
    if wrong:
        result["examples_wrong"] = [list(map(str, item[:3])) for item in wrong[:5]]
    result["slots_given_up_before_sending"] = dict(retimed)
    if wire_stamps:
        result["max_posts_in_any_1s_window_on_wire"] = max_in_window(wire_stamps, 1.0)
    result.update(
        {
            "backlog_per_account": backlog,
            "final_rows": final_rows,
            "requests": len(log),
            "codes": codes,
            "code_160": len(refused),
            "mean_batch": round(
                sum(e["n_read"] for e in log if e["code"] == 100)
                / max(1, sum(1 for e in log if e["code"] == 100)),
                1,
            ),
            "first_request_after_start_s": round(first - started, 2),
            "first_to_last_request_s": round(last - first, 2),
            "refids_per_second": round(rate, 1),
            "ceiling_per_second": ceiling,
            "fraction_of_ceiling": round(rate / ceiling, 4),
            "max_requests_in_any_1s_window": per_key,
            "worker_cpu_us_per_refid": round((end_sample[1] - start_sample[1]) / resolved * 1e6, 1),
            "postgres_cpu_us_per_refid": round(
                (end_sample[2] - start_sample[2]) / resolved * 1e6, 1
            ),
            "worker_cpu_s_total": round(end_sample[1], 1),
            "postgres_cpu_us_per_refid_by_process": {
                role: round(seconds / resolved * 1e6, 1)
                for role, seconds in sorted(
                    sampler.postgres_breakdown(first, drained).items(), key=lambda kv: -kv[1]
                )
            },
        }
    )
    if sink is not None:
        result["webhook_events"] = sink.events
        result["webhook_posts"] = sink.posts
        result["webhook_caught_up_after_drain_s"] = round(webhook_done - drained, 1)
    if refused:
        last_refusal = max(refused)
        settled = [e["t"] for e in log if e["t"] > last_refusal + 1]
        result["last_160_after_first_request_s"] = round(last_refusal - first, 2)
        if len(settled) > 20:
            result["requests_per_second_after_settling"] = round(
                (len(settled) - 1) / (settled[-1] - settled[0]), 2
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="one", choices=[*SCENARIOS, "all"])
    parser.add_argument("--backlog", type=int, default=100_000, help="pending messages per account")
    parser.add_argument("--final-rows", type=int, default=1_000_000)
    parser.add_argument("--dump-log", help="write the emulator's request log (JSON) here")
    parser.add_argument(
        "--webhook",
        action="store_true",
        help="also post every final-status event to a loopback sink (FINAL_WEBHOOK_URL)",
    )
    args = parser.parse_args()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    for name in names:
        result = run(
            name, SCENARIOS[name], args.backlog, args.final_rows, args.dump_log, args.webhook
        )
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
        (out / f"throughput-{name}-{int(time.time())}.json").write_text(
            json.dumps(result, indent=2)
        )
    if len(results) > 1:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
