"""The newcomer's first command, end to end: `python -m worker.demo` as a subprocess, on this
machine's Postgres and Redis (or the suite's embedded ones), must resolve every message and exit 0.

It runs in its own database, Redis database and work directory, so it neither disturbs nor is
disturbed by a developer's `make demo`, and removes both databases' contents afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

# The same servers as the rest of the suite, embedded ones included (see tests/conftest.py).
from tests.conftest import PG_ADMIN_URL, REDIS_TEST_URL
from worker.localservices import with_redis_db

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# Not 12 (the demo), 13 (the suite) or 14 (bench/): any of them may be running beside this test.
REDIS_DB = 15
MESSAGES = 300
# Final statuses come 5-12 s after the first poll (the demo's own default is up to 40 s, for a
# newcomer to watch); the rest is start-up and shutdown.
FINAL_AFTER_MAX_SECONDS = 12
DEMO_TIMEOUT_SECONDS = 150
RUN_TIMEOUT_SECONDS = 220


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def test_demo_resolves_every_message(tmp_path):
    database = f"esms_demo_test_{os.getpid()}"
    env = {
        **os.environ,
        "DATABASE_URL": PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        "REDIS_URL": REDIS_TEST_URL,
    }
    command = [
        sys.executable,
        "-m",
        "worker.demo",
        f"--messages={MESSAGES}",
        f"--timeout={DEMO_TIMEOUT_SECONDS}",
        f"--final-after-max={FINAL_AFTER_MAX_SECONDS}",
        f"--database={database}",
        f"--redis-db={REDIS_DB}",
        f"--workdir={tmp_path}",
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the demo then stops its worker, beat and emulator itself.
        process.terminate()
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the demo did not finish in {RUN_TIMEOUT_SECONDS} s:\n{output}")
    finally:
        _drop_database(database)
        _flush_redis()

    logs = f"{output}\n--- worker.log ---\n{_tail(tmp_path / 'logs' / 'worker.log')}"
    assert process.returncode == 0, logs
    table = re.search(r"^\s+pending\s+(\d[\d,]*)\s", output, re.MULTILINE)
    assert table is not None, logs
    assert table.group(1) == "0", logs
    total = re.search(r"^\s+total\s+(\d[\d,]*)\s*$", output, re.MULTILINE)
    assert total is not None and total.group(1) == str(MESSAGES), logs


def _drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _flush_redis() -> None:
    client = redis.Redis.from_url(with_redis_db(REDIS_TEST_URL, REDIS_DB))
    try:
        client.flushdb()
    finally:
        client.close()
