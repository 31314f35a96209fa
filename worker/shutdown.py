"""A watchdog for the worker's warm shutdown: the process ends even if Celery's pool hangs.

On SIGTERM Celery stops taking tasks, waits for the running ones and stops its prefork pool. In
about one shutdown out of 25 the pool was seen to hang in "Stopping Pool" after every task had
finished, until a second signal (docs/reliability.md). No poll task can run longer than
`Settings.lease_min_remaining_seconds` (rate-slot wait, request timeout, write), so once that long
has passed since the warm shutdown began every task has finished or can no longer matter (its
lease ends before it could write). The watchdog then kills the pool processes that are left and
ends the main process with the exit code Celery would have used, so systemd and docker see an
orderly stop instead of waiting for their own SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Beyond the longest task: time for Celery to finish its own shutdown in the normal case.
_SLACK_SECONDS = 2.0


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid`, read from /proc (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _end(exitcode: int, before_exit: Callable[[], None]) -> None:
    children = child_pids(os.getpid())
    log.warning(
        "warm shutdown still not done after every task must have ended: stopping %d pool "
        "processes and exiting",
        len(children),
    )
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        before_exit()
    finally:
        logging.shutdown()
        os._exit(exitcode)


def start(
    after_seconds: float, exitcode: int = 0, before_exit: Callable[[], None] = lambda: None
) -> threading.Timer:
    """End this process `after_seconds` (plus a little slack) from now, unless it ends first;
    `before_exit` runs just before, as the clean-up Celery's own shutdown would have done."""
    timer = threading.Timer(after_seconds + _SLACK_SECONDS, _end, args=(exitcode, before_exit))
    timer.name = "warm-shutdown-watchdog"
    timer.daemon = True
    timer.start()
    return timer
