"""The warm-shutdown watchdog ends a process whose shutdown hangs, and its children with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from worker import shutdown

ROOT = Path(__file__).resolve().parents[2]

# A "worker" whose shutdown hangs: one child that would outlive it, then a main thread that never
# returns. Only the watchdog can end it.
_HUNG = """
import subprocess, sys, time
from worker import shutdown
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
shutdown.start(0.3, exitcode=3, before_exit=lambda: print("cleaned", flush=True))
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_watchdog_kills_the_children_and_exits_with_the_code():
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HUNG], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    child = int(proc.stdout.readline())
    assert _alive(child)
    assert proc.wait(timeout=20) == 3
    # The slack after the task limit, not the 60 s sleep, decided when it ended.
    assert time.monotonic() - started < 15
    assert proc.stdout.read().strip() == "cleaned"
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_child_pids_lists_children_not_grandchildren():
    child = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    try:
        grandchild = int(child.stdout.readline())
        found = shutdown.child_pids(os.getpid())
        # Other tests may have children of this process running too: only ours are asserted.
        assert child.pid in found
        assert grandchild not in found and os.getpid() not in found
        assert shutdown.child_pids(child.pid) == [grandchild]
    finally:
        os.kill(grandchild, 9)
        child.kill()
        child.wait()
