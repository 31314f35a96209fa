"""GetCallback's one whole-request deadline, against a real socket that answers too slowly in
pieces (each piece within httpx's per-read timeout, the whole far beyond it)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from pydantic import SecretStr

from tests.processes import ROOT
from worker.errors import ProviderUnavailable
from worker.esms_client import EsmsClient
from worker.settings import Account

PIECE_GAP_SECONDS = 0.3


@pytest.fixture
def trickling_server():
    """An HTTP server that answers 200 and then one byte of body every PIECE_GAP_SECONDS."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            time.sleep(PIECE_GAP_SECONDS)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            while not stop.is_set():
                time.sleep(PIECE_GAP_SECONDS)
                try:
                    conn.sendall(b"1\r\n \r\n")
                except OSError:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


ACCOUNT = Account("default", SecretStr("k"), SecretStr("s"))


def test_an_answer_trickling_past_the_deadline_is_given_up(trickling_server):
    client = EsmsClient(trickling_server, 1.0)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="no whole answer within 1s"):
        client.get_callback(ACCOUNT, "oa", ["r1"])
    # Between two pieces of the answer: at most one piece's gap late.
    assert time.monotonic() - started < 1.0 + 2 * PIECE_GAP_SECONDS
    client.close()


def test_under_gevent_the_deadline_is_exact(trickling_server):
    """The worker's case: the deadline interrupts the read it falls in."""
    script = f"""
from gevent import monkey; monkey.patch_all()
import json, time
from pydantic import SecretStr
from worker.errors import ProviderUnavailable
from worker.esms_client import EsmsClient
from worker.settings import Account
client = EsmsClient({trickling_server!r}, 1.0)
started = time.monotonic()
try:
    client.get_callback(Account("default", SecretStr("k"), SecretStr("s")), "oa", ["r1"])
except ProviderUnavailable as error:
    print(json.dumps([str(error), time.monotonic() - started]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    reason, elapsed = json.loads(done.stdout)
    assert reason == "no whole answer within 1s"
    assert 1.0 <= elapsed < 1.15
