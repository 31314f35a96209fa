"""The emulator as a real process: run `python -m worker.emulator`, talk HTTP over loopback, stop.

Checks what in-process tests cannot: the ready line, a real socket, the JSON-lines request log and a
clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

API_KEY = "it-key"
SECRET = "it-secret-do-not-log"
OA = "1090257973118325189"
RATE_LIMIT = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lines(stream: IO[str], sink: queue.Queue[str]) -> None:
    for line in stream:
        sink.put(line)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    port = _free_port()
    log_path = tmp_path / "requests.jsonl"
    command = [
        sys.executable,
        "-m",
        "worker.emulator",
        "--port",
        str(port),
        "--account",
        f"{API_KEY}:{SECRET}:{OA}",
        "--rate-limit",
        str(RATE_LIMIT),
        "--final-after-min-s",
        "0",
        "--final-after-max-s",
        "0",
        "--request-log",
        str(log_path),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    threading.Thread(target=_lines, args=(process.stdout, output), daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        ready = ""
        while "listening on" not in ready:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and process.poll() is None, "emulator did not start"
            try:
                ready = output.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
        assert ready.strip() == f"eSMS emulator listening on http://127.0.0.1:{port}"
        yield f"http://127.0.0.1:{port}", log_path, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _poll(client: httpx.Client, refids: list[str], secret: str = SECRET) -> httpx.Response:
    body = {"ApiKey": API_KEY, "SecretKey": secret, "ListRefid": refids, "OAId": OA}
    return client.post("/ZaloCallback/GetCallback", json=body)


def test_emulator_over_loopback(emulator: tuple[str, Path, subprocess.Popen[str]]) -> None:
    base_url, log_path, process = emulator
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert client.get("/healthz").text == "ok"
        messages = [{"ref_id": ref, "oa_id": OA} for ref in ("m1", "m2", "m3")]
        registered = client.post("/_emulator/messages", json={"messages": messages}).json()
        assert registered == {"registered": 3, "known": 0, "total": 3}

        answer = _poll(client, ["m1", "m2", "m3", "unknown-elsewhere"]).json()
        assert answer["Code"] == 100
        truth = client.get("/_emulator/truth").json()["messages"]
        items = {item["SMSID"]: item for item in answer["Data_callback"]}
        assert items["m1"] == truth["m1"]["item"]
        assert _poll(client, ["m1"], secret="wrong").json()["Code"] == 101

        started = time.monotonic()
        burst = [_poll(client, ["m1"]).json()["Code"] for _ in range(RATE_LIMIT + 3)]
        if time.monotonic() - started < 1.0:  # a badly overloaded machine could spread the burst
            assert burst.count(160) >= 3

        log = client.get("/_emulator/requests").json()
        stats = client.get("/_emulator/stats").json()
        body_texts = [client.get(path).text for path in ("/_emulator/requests", "/_emulator/stats")]

    entries = log["requests"]
    assert log["next"] == len(entries) == 2 + len(burst)
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    assert [e["t"] for e in entries] == sorted(e["t"] for e in entries)
    assert entries[0]["refids"] == ["m1", "m2", "m3", "unknown-elsewhere"]
    assert (entries[0]["n_items"], entries[1]["code"]) == (4, 101)
    assert [e["code"] for e in entries[2:]] == burst
    assert all(SECRET not in text for text in body_texts)

    key_stats = stats["per_api_key"][API_KEY]
    assert key_stats["requests"] == len(entries)
    assert key_stats["max_admitted_in_window"] <= RATE_LIMIT
    assert stats["by_code"].get("160", 0) == burst.count(160)
    assert stats["messages"] == 4

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    written = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert written == entries
    assert SECRET not in log_path.read_text()
