"""Helpers that run the real programs as child processes: the emulator, celery worker and beat.

Every child is started in its own process group and killed with it, so a failed test leaves
nothing running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from worker.localservices import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Children:
    tmp: Path
    started: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.tmp / f"{name}.log"
        handle = open(log_path, "wb")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = Child(name, proc, log_path)
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.started):
            child.stop()


@dataclass
class Emulator:
    child: Child
    url: str

    def admin(self, method: str, path: str, **kwargs) -> dict:
        response = httpx.request(method, f"{self.url}/_emulator{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()


def start_emulator(children: Children, *flags: str, ready_timeout: float = 20) -> Emulator:
    port = free_port()
    child = children.spawn(
        f"emulator-{port}",
        [str(BIN / "python"), "-m", "worker.emulator", "--port", str(port), *flags],
        env=child_env(),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"emulator exited: {child.log()}")
        if re.search(r"listening on", child.log()):
            try:
                httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                return Emulator(child, url)
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"emulator not ready: {child.log()}")


def child_env(**overrides: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("ESMS_", "POLL_"))
    }
    env.update({"PYTHONUNBUFFERED": "1", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    # Workers of parallel tests must not fight over the metrics port; a test that scrapes
    # metrics passes its own.
    env.setdefault("METRICS_PORT", "0")
    env.setdefault("RECEIVER_METRICS_PORT", "0")
    env.update(overrides)
    return env


def celery(children: Children, role: str, env: dict[str, str], *extra: str) -> Child:
    argv = [str(BIN / "celery"), "-A", "worker", role, "--loglevel=DEBUG", *extra]
    if role == "beat":
        argv += ["--schedule", str(children.tmp / f"beat-{len(children.started)}")]
    return children.spawn(f"{role}-{len(children.started)}", argv, env)


def wait_for(predicate, timeout: float, interval: float = 0.5, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


# --- chaos helpers: signals, private Redis and Postgres servers to stop and start ------------


def send_signal(child: Child, sig: int) -> None:
    """Signal the child's main process only, as `kill <pid>` or `docker stop` would."""
    if child.proc.poll() is None:
        os.kill(child.proc.pid, sig)


def terminate(child: Child, grace: float) -> bool:
    """Stop the child as a supervisor does (`docker stop`, systemd): SIGTERM to the main process,
    SIGKILL to the whole group if it has not exited after `grace` seconds. True if it exited by
    itself."""
    send_signal(child, signal.SIGTERM)
    try:
        child.proc.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        child.stop(signal.SIGKILL)
        return False


@dataclass
class PrivateRedis:
    """A `redis-server` child on its own port, with nothing on disk: a restart starts empty."""

    children: Children
    port: int
    extra: tuple[str, ...] = ()
    child: Child | None = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, ready_timeout: float = 20) -> None:
        from worker.localservices import redis_server_program

        argv = [redis_server_program(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", ""]
        argv += ["--appendonly", "no", *self.extra]
        name = f"redis-{self.port}-{len(self.children.started)}"
        self.child = self.children.spawn(name, argv, child_env())
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.child.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.child.log()}")
            if "Ready to accept connections" in self.child.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not ready: {self.child.log()}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def start_private_redis(children: Children, *extra: str) -> PrivateRedis:
    server = PrivateRedis(children, free_port(), tuple(extra))
    server.start()
    return server


@dataclass
class PrivatePostgres:
    """An embedded Postgres cluster (worker/localservices.py) that can be stopped and started
    again on the same port; `destroy()` ends it and deletes its directory."""

    cluster: EmbeddedPostgres
    url: str  # postgresql+psycopg://postgres@127.0.0.1:PORT/DATABASE
    base: Path

    def stop(self) -> None:
        self.cluster.stop()

    def start(self) -> None:
        self.cluster.start()

    def destroy(self) -> None:
        try:
            self.cluster.close()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def start_private_postgres(database: str = "esms_chaos") -> PrivatePostgres:
    """A fresh cluster on a free loopback port holding `database`, migrated to head.

    Its data lives in a directory of its own under the system's temp dir, not under a test's
    tmp_path: under root the server runs as another account, and every pytest session on the
    machine resets pytest's base directory to mode 0700, which would lock that account out.
    """
    from alembic import command

    from tests.conftest import alembic_config
    from worker.localservices import ensure_database

    base = Path(tempfile.mkdtemp(prefix="esms-pg-"))
    try:
        cluster = EmbeddedPostgres.create(base / "pg")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    url = f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/{database}"
    server = PrivatePostgres(cluster, url, base)
    try:
        ensure_database(server.url)
        command.upgrade(alembic_config(server.url), "head")
    except BaseException:
        server.destroy()
        raise
    return server
