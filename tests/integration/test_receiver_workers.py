"""The receiver's process model: uvicorn's supervisor and prometheus_client's multiprocess mode.

A real `python -m worker.receiver --workers 2` on loopback: pushes over many connections reach
both workers, and `/metrics` (served by the supervisor) and `/stats` (served by any worker) both
show their sum; a worker killed outright is replaced and its counts stay in the sum; SIGTTIN,
SIGTTOU and SIGHUP add, remove and replace workers; SIGTERM stops the supervisor and every
worker, and the temporary metrics directory goes with them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_receiver import TOKEN, final_push, insert, start_receiver
from tests.processes import Children

pytestmark = pytest.mark.integration


def workers_of(pid: int) -> set[int]:
    """The worker processes uvicorn's supervisor started (spawned; not its resource tracker)."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.add(int(child))
    return found


def scraped(receiver) -> dict[str, float]:
    """/metrics as {"name{label=value}": value} for the receiver's own series."""
    values = {}
    for family in text_string_to_metric_families(receiver.metrics()):
        for sample in family.samples:
            if sample.name.startswith("esms_receiver_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def accepted_per_process(directory: Path) -> dict[int, float]:
    """What each worker wrote to its own file: accepted pushes by process id."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        pid = int(re.fullmatch(r"counter_(\d+)\.db", path.name).group(1))
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, _ = json.loads(key)
            if sample == "esms_receiver_pushes_total" and labels == {"outcome": "accepted"}:
                counts[pid] = counts.get(pid, 0) + value
    return counts


def push_all(receiver, ref_ids: list[str]) -> None:
    def one(ref_id: str) -> int:
        # A new connection each: the kernel hands each to whichever worker accepts first.
        with httpx.Client() as client:
            return client.get(receiver.push_url(), params=final_push(ref_id)).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, ref_ids)) == {200}


@pytest.fixture
def multiproc_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    return directory


def test_two_workers_share_the_socket_and_metrics_sum_them(
    engine, database_url, tmp_path, multiproc_dir
):
    ref_ids = [f"w-{i}" for i in range(300)]
    insert(engine, *ref_ids)
    multiproc_dir.mkdir()
    (multiproc_dir / "counter_1.db").write_bytes(b"left over from an earlier run")
    children = Children(tmp_path)
    try:
        receiver = start_receiver(children, database_url, workers=2)
        pid = receiver.child.proc.pid
        assert len(workers_of(pid)) == 2
        assert not (multiproc_dir / "counter_1.db").exists()  # emptied at start
        push_all(receiver, ref_ids)
        per_process = accepted_per_process(multiproc_dir)
        # Both workers took pushes; neither saw them all.
        assert set(per_process) == workers_of(pid)
        assert all(0 < count < len(ref_ids) for count in per_process.values()), per_process
        metrics = scraped(receiver)
        assert metrics["esms_receiver_pushes_total{outcome=accepted}"] == len(ref_ids)
        assert metrics["esms_receiver_rows_changed_total{}"] == len(ref_ids)
        assert metrics["esms_receiver_resolved_total{state=failed}"] == len(ref_ids)
        assert metrics["esms_receiver_batch_pushes_sum{}"] == len(ref_ids)
        assert metrics["esms_receiver_write_duration_seconds_count{}"] >= 1
        stats = receiver.stats()  # any one worker answers it, with the sum of both
        assert stats["accepted"] == stats["changed"] == stats["resolved_failed"] == len(ref_ids)

        # A worker killed outright is replaced; what it counted stays in the sum.
        victim = min(workers_of(pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = workers_of(pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.2)
        assert len(workers_of(pid)) == 2 and victim not in workers_of(pid)
        more = [f"w2-{i}" for i in range(40)]
        insert(engine, *more)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the new worker answers
            try:
                if httpx.get(f"{receiver.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        push_all(receiver, more)
        total = len(ref_ids) + len(more)
        assert scraped(receiver)["esms_receiver_pushes_total{outcome=accepted}"] == total
        assert receiver.stats()["accepted"] == total
        assert victim in accepted_per_process(multiproc_dir)
    finally:
        children.stop_all()


def test_sigterm_stops_the_supervisor_and_every_worker(database_url, tmp_path):
    children = Children(tmp_path)
    try:
        receiver = start_receiver(children, database_url, workers=2)
        pid = receiver.child.proc.pid
        workers = workers_of(pid)
        assert len(workers) == 2
        # Without PROMETHEUS_MULTIPROC_DIR the values go to a temporary directory.
        made = [
            Path(f"/tmp/{name}")
            for name in os.listdir("/tmp")
            if name.startswith("esms-receiver-metrics-")
            and any(Path(f"/tmp/{name}/counter_{worker}.db").exists() for worker in workers)
        ]
        assert len(made) == 1
        assert "esms_receiver_pushes_total" in receiver.metrics()
        os.kill(pid, signal.SIGTERM)
        assert receiver.child.proc.wait(20) == 0
        for worker in workers:
            assert (
                not Path(f"/proc/{worker}").exists()
                or b"zombie" in Path(f"/proc/{worker}/status").read_bytes().lower()
            )
        assert not made[0].exists()
        assert TOKEN not in receiver.child.log()
    finally:
        children.stop_all()


def _until(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_ttin_adds_a_worker_ttou_removes_one_and_hup_replaces_them_all(database_url, tmp_path):
    children = Children(tmp_path)
    try:
        receiver = start_receiver(children, database_url, workers=1)
        pid = receiver.child.proc.pid
        first = workers_of(pid)
        assert len(first) == 1
        os.kill(pid, signal.SIGTTIN)
        _until(lambda: len(workers_of(pid)) == 2)
        os.kill(pid, signal.SIGTTOU)
        _until(lambda: len(workers_of(pid)) == 1)
        before = workers_of(pid)
        os.kill(pid, signal.SIGHUP)
        _until(lambda: len(workers_of(pid)) == 1 and not workers_of(pid) & before)
        assert httpx.get(f"{receiver.url}/healthz", timeout=10).status_code == 200
        assert receiver.child.proc.poll() is None
    finally:
        children.stop_all()
