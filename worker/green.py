"""Puts a bare `celery -A worker worker` on Celery's gevent pool, patched before Celery's imports.

Polls are I/O-bound: a task spends its life waiting for its rate slot, the provider and Postgres.
Celery's answer for such tasks is its gevent pool, where one OS process runs every in-flight poll
as a greenlet, so an idle account costs nothing and a busy one costs what it has in flight.

Celery monkey-patches for gevent only when the pool is named on the command line, as the very
first thing `celery` does (`-P gevent`); the `worker_pool` setting picks the pool class but
patches nothing (celery/celery#10067), and by the time `-A worker` imports this package Celery
has already imported kombu and redis-py, which bind `select.epoll`, `time.sleep` and friends at
import time. A hub blocked in a real epoll would stall every greenlet. So when a `celery worker`
command names no pool, `reexec_on_gevent` replaces the process, before anything else happens in
it, with the same command plus `--pool=gevent` (and `--without-mingle`, see below): same PID,
same signals, same arguments, about half a second later. A pool named on the command line
(`-P prefork`, `-P solo`, `-P gevent`) is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# Options of the `celery` command itself that take a value in the next argument.
_GLOBAL_OPTIONS_WITH_VALUE = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
}
_POOL_OPTIONS = ("-P", "--pool")


def _is_celery_program(argv0: str) -> bool:
    name = os.path.basename(argv0)
    return name == "celery" or argv0.endswith(os.path.join("celery", "__main__.py"))


def subcommand(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The `celery` subcommand in `argv` (without argv[0]) and the arguments after it."""
    skip_next = False
    for index, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            skip_next = True
            continue
        if arg.startswith("-"):
            continue
        return arg, list(argv[index + 1 :])
    return None, []


def names_a_pool(args: Sequence[str]) -> bool:
    """Whether the worker's own arguments choose a pool (`-P x`, `-Px`, `--pool x`, `--pool=x`)."""
    for arg in args:
        if arg in _POOL_OPTIONS or arg.startswith("--pool="):
            return True
        if arg.startswith("-P") and not arg.startswith("--"):
            return True
    return False


def gevent_command(argv: Sequence[str]) -> list[str] | None:
    """The command to re-execute for `argv` (as `sys.argv`), or None when it needs none: not a
    `celery worker`, a pool already named, or only asking for help."""
    if not argv or not _is_celery_program(argv[0]):
        return None
    name, args = subcommand(argv[1:])
    if name != "worker" or names_a_pool(args) or "--help" in args:
        return None
    extra = ["--pool=gevent"]
    # Mingle asks the other workers for revoked task ids and waits a second for their answers
    # at every start; nothing here revokes tasks, and the first poll should not wait for it.
    if not any(arg.endswith("mingle") for arg in args):
        extra.append("--without-mingle")
    return [sys.executable, "-m", "celery", *argv[1:], *extra]


def reexec_on_gevent() -> None:
    """Called first thing when the package is imported; returns unless it re-executes."""
    command = gevent_command(sys.argv)
    if command is None:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(command[0], command)
