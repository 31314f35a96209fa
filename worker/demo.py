"""The demo (`make demo`, `python -m worker.demo`): the whole daemon against the emulator, locally.

It finds Postgres and Redis at DATABASE_URL and REDIS_URL, or starts embedded ones (the wheels of
the dev extra, see worker/localservices.py); recreates a dedicated database (`esms_demo`) and
flushes a dedicated Redis database (12), so running it twice works and nothing else is touched;
migrates; starts the eSMS emulator on a free loopback port; inserts a few thousand messages the way
a sending system would; runs a real Celery worker and beat against them; and shows progress until
no message is pending. Whatever happens — success, timeout, Ctrl-C, an error — every process it
started is stopped again. It never talks to anything but loopback and the servers the two URLs
name.

`--seed-only` is the other use: insert messages into DATABASE_URL as it is, and exit (the compose
`demo-seeder`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

from worker import localservices
from worker.localservices import LocalServiceError
from worker.settings import DEFAULT_ACCOUNT, Settings

ROOT = Path(__file__).resolve().parents[1]

DEMO_DATABASE = "esms_demo"
DEMO_REDIS_DB = 12
DEMO_API_KEY = "demo-key"
DEMO_SECRET_KEY = "demo-secret"
DEMO_OA_IDS = ("4318249720583317428", "1093652778042510386", "7725900316449816055")
STATES = ("pending", "sent", "failed", "rejected", "expired")

# The emulator's message life: final statuses arrive 5–40 s after the first poll, so the whole run
# takes about a minute and every state shows up (`--final-after-max` shortens it, as the test does).
EMULATOR_KNOBS = {
    "latency-min-ms": "50",
    "latency-max-ms": "200",
    "success-rate": "0.85",
}
FINAL_AFTER_MIN_SECONDS = 5.0
FINAL_AFTER_MAX_SECONDS = 40.0
# Short intervals so that a message is seen final within seconds of becoming final.
DEMO_POLL_INTERVAL_SECONDS = "2"
DEMO_POLL_MAX_INTERVAL_SECONDS = "5"

READY_LINE = re.compile(r"eSMS emulator listening on (http://\S+)")
STARTUP_TIMEOUT_SECONDS = 20
STOP_TIMEOUT_SECONDS = 15

INSERT_MESSAGES = (
    "INSERT INTO messages (ref_id, oa_id) SELECT * FROM unnest(%s::text[], %s::text[])"
)
COUNT_BY_STATE = "SELECT state, count(*), sum(total_price) FROM messages GROUP BY state"
SQL_TO_TRY = """\
    SELECT state, count(*), sum(total_price) FROM messages GROUP BY state ORDER BY state;
    SELECT ref_id, oa_id, state, send_status, error_info, poll_count, resolved_at - created_at
      FROM messages ORDER BY resolved_at DESC NULLS LAST LIMIT 20;"""


class DemoFailed(Exception):
    """The demo could not finish; the message says why and where to look."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.demo",
        description="Run the poller end to end against the eSMS emulator on this machine.",
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages to insert (3000)")
    parser.add_argument(
        "--timeout", type=float, default=240, help="seconds to wait for no pending message (240)"
    )
    parser.add_argument(
        "--database", default=DEMO_DATABASE, help=f"database to recreate ({DEMO_DATABASE})"
    )
    parser.add_argument(
        "--redis-db", type=int, default=DEMO_REDIS_DB, help=f"Redis db to flush ({DEMO_REDIS_DB})"
    )
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".demo", help="logs and embedded servers (.demo)"
    )
    parser.add_argument(
        "--final-after-max",
        type=float,
        default=FINAL_AFTER_MAX_SECONDS,
        metavar="SECONDS",
        help="the emulator makes a status final at most this long after the first poll "
        f"({FINAL_AFTER_MAX_SECONDS:.0f}; and at least {FINAL_AFTER_MIN_SECONDS:.0f} s after it)",
    )
    parser.add_argument(
        "--seed-only",
        action="store_true",
        help="only insert --messages into DATABASE_URL as configured, then exit",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    if args.seed_only:
        inserted = seed(settings.libpq_url, args.messages)
        print(f"inserted {inserted} messages into {_shown(settings.sqlalchemy_url)}")
        return 0
    # SIGTERM (a test's timeout, `kill`) unwinds like Ctrl-C, so the cleanup still runs; SIGINT
    # is set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return Demo(args, settings).run()
    except KeyboardInterrupt:
        print("\ninterrupted; everything the demo started is stopped.")
        return 130
    except (DemoFailed, LocalServiceError) as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1


def seed(libpq_url: str, count: int) -> int:
    """Insert `count` new messages for the default account, spread over the demo OAs."""
    # eSMS SMSIDs look like a uuid4 hex with a suffix; the demo's RefIds look the same.
    ref_ids = [f"{uuid.uuid4().hex}{random.randrange(100):02d}" for _ in range(count)]
    oa_ids = [DEMO_OA_IDS[i % len(DEMO_OA_IDS)] for i in range(count)]
    with psycopg.connect(libpq_url) as conn:
        conn.execute(INSERT_MESSAGES, (ref_ids, oa_ids))
    return count


@dataclass
class Child:
    """A process the demo started, with the log its output goes to."""

    name: str
    process: subprocess.Popen
    log: Path

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoFailed(f"{self.name} exited early (status {code}); see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Outcome:
    """What the demo saw last: messages and total price by state, the emulator's request count."""

    counts: dict[str, int]
    prices: dict[str, Decimal | None]
    requests: int | None
    over_limit: int | None
    polling_seconds: float


class Demo:
    """One run: servers, migration, emulator, seed, worker and beat, progress, cleanup, report."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.args = args
        self.settings = settings
        self.workdir: Path = args.workdir.resolve()
        self.logs = self.workdir / "logs"
        self.tty = sys.stdout.isatty()
        self.embedded_postgres = False
        self.embedded_redis = False

    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        cleanup = contextlib.ExitStack()
        try:
            outcome, database_url = self._run(cleanup)
        finally:
            # A second Ctrl-C must not cut the cleanup short and leave servers running.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                # Nor may a closed stdout (`| head`): the note is optional, the cleanup is not.
                with contextlib.suppress(OSError):
                    _step("Stopping worker, beat, emulator" + self._servers_note())
                cleanup.close()
            finally:
                signal.signal(signal.SIGINT, previous)
        self._report(outcome, database_url, time.monotonic() - started)
        if outcome.counts.get("pending", 0):
            print(
                f"\n{outcome.counts['pending']} messages still pending after "
                f"{self.args.timeout:.0f} s. Look at {self.logs / 'worker.log'} and "
                f"{self.logs / 'beat.log'}.",
                file=sys.stderr,
            )
            return 1
        return 0

    def _run(self, cleanup: contextlib.ExitStack) -> tuple[Outcome, str]:
        database_url = self._database(cleanup)
        redis_url = self._redis(cleanup)

        _step("Migrating (alembic upgrade head)")
        env = self._child_env(database_url, redis_url)
        self._migrate(env)

        _step("Starting the eSMS emulator")
        emulator = self._start(cleanup, "emulator", self._emulator_command(), env)
        base_url = self._wait_for_ready_line(emulator)
        low, high = self._final_after()
        print(f"  {base_url} (latency 50–200 ms, final after {low:g}–{high:g} s, success 85%)")

        _step(f"Inserting {self.args.messages:,} messages")
        seed(localservices.libpq_url(database_url), self.args.messages)
        print(
            f"  INSERT INTO messages (ref_id, oa_id) ... — {len(DEMO_OA_IDS)} OAs, "
            f"account {DEFAULT_ACCOUNT!r}"
        )

        _step("Starting celery worker and beat")
        env = self._child_env(database_url, redis_url, base_url)
        celery = [sys.executable, "-m", "celery", "-A", "worker"]
        worker = self._start(
            cleanup, "worker", [*celery, "worker", "--loglevel=INFO", "-n", "demo@%h"], env
        )
        schedule = str(self.workdir / "celerybeat-schedule")
        beat = self._start(
            cleanup, "beat", [*celery, "beat", "--loglevel=INFO", "--schedule", schedule], env
        )
        print(f"  logs: {self.logs}/worker.log, beat.log, emulator.log")

        _step("Polling until no message is pending")
        return self._watch(database_url, base_url, [emulator, worker, beat]), database_url

    # --- servers -------------------------------------------------------------------------------

    def _database(self, cleanup: contextlib.ExitStack) -> str:
        _step("Postgres")
        url, cluster = localservices.ensure_postgres(self.settings.sqlalchemy_url, self.workdir)
        if cluster is None:
            print(f"  using the server at DATABASE_URL ({_server(url)})")
        else:
            cleanup.callback(cluster.close)
            self.embedded_postgres = True
            print(f"  nothing answers at DATABASE_URL; started an embedded one at {_server(url)}")
        database_url = localservices.with_database(url, self.args.database)
        # Dropped and created again: every run starts from an empty, freshly migrated database.
        localservices.drop_database(database_url)
        localservices.ensure_database(database_url)
        print(f"  database {self.args.database!r} (recreated)")
        return database_url

    def _redis(self, cleanup: contextlib.ExitStack) -> str:
        _step("Redis")
        url, server = localservices.ensure_redis(
            self.settings.redis_url.get_secret_value(), self.workdir
        )
        if server is None:
            print(f"  using the server at REDIS_URL ({_server(url)})")
        else:
            cleanup.callback(server.close)
            self.embedded_redis = True
            print(f"  nothing answers at REDIS_URL; started an embedded one at {_server(url)}")
        redis_url = localservices.with_redis_db(url, self.args.redis_db)
        # Tasks left queued by an earlier run would poll batches that no longer exist.
        client = redis.Redis.from_url(redis_url)
        try:
            client.flushdb()
        finally:
            client.close()
        print(f"  database {self.args.redis_db} (flushed)")
        return redis_url

    def _servers_note(self) -> str:
        started = [
            name
            for name, embedded in (
                ("Postgres", self.embedded_postgres),
                ("Redis", self.embedded_redis),
            )
            if embedded
        ]
        return f" and the embedded {' and '.join(started)}" if started else ""

    # --- child processes -----------------------------------------------------------------------

    def _child_env(
        self, database_url: str, redis_url: str, base_url: str | None = None
    ) -> dict[str, str]:
        # The children see exactly the demo's settings: every variable the daemon reads is
        # dropped from the inherited environment and set here, and they run in the work directory
        # so a developer's `.env` (real keys, other accounts) cannot leak into the demo.
        env = {
            name: value
            for name, value in os.environ.items()
            if name.lower() not in Settings.model_fields
        }
        env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
        if base_url is not None:
            env.update(
                ESMS_BASE_URL=base_url,
                ESMS_API_KEY=DEMO_API_KEY,
                ESMS_SECRET_KEY=DEMO_SECRET_KEY,
                POLL_INTERVAL_SECONDS=DEMO_POLL_INTERVAL_SECONDS,
                POLL_MAX_INTERVAL_SECONDS=DEMO_POLL_MAX_INTERVAL_SECONDS,
            )
        # The children run elsewhere than the checkout; keep this checkout's `worker` importable.
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(ROOT), env.get("PYTHONPATH", "")) if part
        )
        return env

    def _migrate(self, env: dict[str, str]) -> None:
        config = ROOT / "alembic.ini"
        if not config.exists():
            raise DemoFailed(f"{config} not found: run the demo from a checkout of the repository")
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(config), "upgrade", "head"],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        (self.logs / "migrate.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise DemoFailed(f"alembic upgrade head failed:\n{result.stdout}{result.stderr}")

    def _emulator_command(self) -> list[str]:
        command = [sys.executable, "-m", "worker.emulator", "--host", "127.0.0.1", "--port", "0"]
        for flag, value in EMULATOR_KNOBS.items():
            command += [f"--{flag}", value]
        low, high = self._final_after()
        return command + ["--final-after-min-s", str(low), "--final-after-max-s", str(high)]

    def _final_after(self) -> tuple[float, float]:
        high = self.args.final_after_max
        return min(FINAL_AFTER_MIN_SECONDS, high), high

    def _start(
        self, cleanup: contextlib.ExitStack, name: str, command: list[str], env: dict[str, str]
    ) -> Child:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Their own session: Ctrl-C reaches only the demo, which then stops them in order
                # (beat before the worker it feeds, the emulator after both).
                start_new_session=True,
                preexec_fn=localservices.die_with_parent(),
            )
        child = Child(name, process, log)
        cleanup.callback(child.stop)
        return child

    def _wait_for_ready_line(self, emulator: Child) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            found = READY_LINE.search(emulator.log.read_text(errors="replace"))
            if found:
                return found.group(1)
            emulator.check_alive()
            time.sleep(0.05)
        raise DemoFailed(f"the emulator did not get ready in time; see {emulator.log}")

    # --- progress ------------------------------------------------------------------------------

    def _watch(self, database_url: str, base_url: str, children: list[Child]) -> Outcome:
        started = time.monotonic()
        last_plain = float("-inf")
        stats = httpx.Client(base_url=base_url, timeout=2)
        with stats, psycopg.connect(localservices.libpq_url(database_url), autocommit=True) as db:
            while True:
                counts, prices = _counts(db)
                requests, over_limit = _emulator_stats(stats)
                elapsed = time.monotonic() - started
                line = _progress_line(elapsed, counts, requests)
                done = counts.get("pending", 0) == 0 or elapsed >= self.args.timeout
                if self.tty:
                    print(f"\r{line}\x1b[K", end="\n" if done else "", flush=True)
                elif done or elapsed - last_plain >= 5:
                    print(line, flush=True)
                    last_plain = elapsed
                if done:
                    return Outcome(counts, prices, requests, over_limit, elapsed)
                for child in children:
                    child.check_alive()
                time.sleep(0.5)

    # --- the end -------------------------------------------------------------------------------

    def _report(self, outcome: Outcome, database_url: str, wall_seconds: float) -> None:
        total = sum(outcome.counts.values())
        print(
            f"\nFinal state of {total:,} messages (polling took {outcome.polling_seconds:.0f} s, "
            f"the whole demo {wall_seconds:.0f} s):\n"
        )
        print(f"  {'state':<10}{'messages':>10}{'total price':>16}")
        for state in STATES:
            price = outcome.prices.get(state)
            shown_price = f"{price:,.1f}" if price is not None else "-"
            print(f"  {state:<10}{outcome.counts.get(state, 0):>10,}{shown_price:>16}")
        print(f"  {'total':<10}{total:>10,}")
        if outcome.requests is not None:
            print(
                f"\n  GetCallback requests made: {outcome.requests:,} "
                f"({outcome.over_limit or 0} over the emulator's rate limit)"
            )
        if self.embedded_postgres:
            print(
                "\nThe embedded Postgres is stopped now. To keep the rows, point DATABASE_URL at "
                "a running server and run the demo again; then look for yourself:\n"
            )
        else:
            print("\nLook for yourself:\n")
            print(f"  psql '{_shown(localservices.libpq_url(database_url))}'")
        print(SQL_TO_TRY)


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _counts(db: psycopg.Connection) -> tuple[dict[str, int], dict[str, Decimal | None]]:
    rows = db.execute(COUNT_BY_STATE).fetchall()
    return {state: count for state, count, _ in rows}, {state: price for state, _, price in rows}


def _emulator_stats(client: httpx.Client) -> tuple[int | None, int | None]:
    # Progress is still worth showing without the request count, so a hiccup here is no error.
    try:
        stats = client.get("/_emulator/stats").json()
        return int(stats["requests"]), int(stats.get("over_limit", 0))
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None, None


def _progress_line(elapsed: float, counts: dict[str, int], requests: int | None) -> str:
    parts = [f"{elapsed:5.1f} s"]
    parts += [f"{state} {counts.get(state, 0):,}" for state in STATES]
    parts.append(f"requests {requests:,}" if requests is not None else "requests ?")
    return "  " + " | ".join(parts)


def _server(url: str) -> str:
    """host:port of a Postgres or Redis URL, for telling the user which server is used."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'local socket'}:{parts.port or ''}".rstrip(":")


def _shown(url: str) -> str:
    """The URL with any password hidden: it is printed, and terminals get copied into tickets."""
    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
