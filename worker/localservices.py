"""Local services for the demo and benchmarks: use the Postgres and Redis a URL names, or start
throwaway ones on loopback.

`ensure_postgres` and `ensure_redis` first ask whether a server answers at the URL. If one does, it
is used as it is. If nothing listens there, they start a private server on a free loopback port —
a fresh Postgres cluster under the work directory (trust auth) or a `redis-server` child with no
persistence — and return a URL pointing at it together with a handle whose `stop()` ends it. A
server that listens but refuses us is an error, not a reason to start another: the user meant that
server. Missing binaries produce an error that names the package to install.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql
from redis.connection import parse_url
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_WORKDIR = Path(".demo")

# Throwaway servers are for a demo: they must answer within seconds or something is wrong.
_CONNECT_TIMEOUT_SECONDS = 3
_START_TIMEOUT_SECONDS = 30
_STOP_TIMEOUT_SECONDS = 10
# Unix socket paths longer than this do not fit in sockaddr_un (108 bytes, with some margin).
_MAX_SOCKET_DIR_LENGTH = 80
_PR_SET_PDEATHSIG = 1


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


def _running_as_root() -> bool:
    return os.geteuid() == 0


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


def _stop_child(process: subprocess.Popen, timeout: float = _STOP_TIMEOUT_SECONDS) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Postgres ----------------------------------------------------------------------------------


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
class PostgresCluster:
    """A throwaway cluster this process started; `stop()` shuts it down and deletes its data."""

    base: Path
    data: Path
    bin_dir: Path
    run_as: str | None
    # A temporary base (see _usable_cluster_dir) goes entirely, its log included.
    temporary: bool = False

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _pg_ctl(self, ["stop", "-m", "fast", "-w", "-t", str(_STOP_TIMEOUT_SECONDS)])
        shutil.rmtree(self.base if self.temporary else self.data, ignore_errors=True)


def ensure_postgres(
    url: str, workdir: Path = DEFAULT_WORKDIR
) -> tuple[str, PostgresCluster | None]:
    """Use the Postgres at `url` if it answers; otherwise start a throwaway one under `workdir`.

    Returns the URL to use (same user and database name; another port for a throwaway server) and
    the cluster to stop, or None when the server was already running.
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
    cluster, port = _start_cluster(workdir / "pg")
    local = parsed.set(host="127.0.0.1", port=port, username="postgres", password=None)
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


def find_postgres_bin() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    # Debian and Ubuntu keep server binaries off PATH; the newest installed major version wins.
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
    )
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise LocalServiceError(
        "no Postgres answers at DATABASE_URL and no Postgres server binaries (initdb, pg_ctl) "
        "were found to start one.\nInstall them (Debian/Ubuntu): sudo apt-get install postgresql\n"
        "or point DATABASE_URL at a running server."
    )


def _start_cluster(base: Path) -> tuple[PostgresCluster, int]:
    bin_dir = find_postgres_bin()
    run_as = _postgres_user() if _running_as_root() else None
    stop_leftover_postgres(base.parent)
    wanted = base.resolve()
    base = _usable_cluster_dir(wanted, run_as)
    cluster = PostgresCluster(base, base / "data", bin_dir, run_as, temporary=base != wanted)

    base.mkdir(parents=True, exist_ok=True)
    socket_dir = base / "sock"
    socket_dir.mkdir(exist_ok=True)
    if run_as:
        _chown_tree(base, run_as)
    _run(
        cluster,
        "initdb",
        ["-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
    )
    port = free_port()
    # A socket path too long for sockaddr_un would stop the server; TCP is all the demo needs.
    sockets = str(socket_dir) if len(str(socket_dir)) <= _MAX_SOCKET_DIR_LENGTH else ""
    # fsync off: the cluster is deleted when the demo ends, durability buys nothing here.
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c fsync=off -k '{sockets}'"
    _pg_ctl(
        cluster,
        [
            "start",
            "-w",
            "-t",
            str(_START_TIMEOUT_SECONDS),
            "-l",
            str(base / "postgres.log"),
            "-o",
            options,
        ],
    )
    return cluster, port


def _postgres_user() -> str:
    # initdb refuses to run as root, so a root caller hands the cluster to the `postgres` account
    # that the Debian/Ubuntu package creates.
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise LocalServiceError(
            "running as root, and initdb refuses root: create a 'postgres' user "
            "(sudo apt-get install postgresql does) or run the demo as an ordinary user"
        ) from None
    return "postgres"


def _usable_cluster_dir(wanted: Path, run_as: str | None) -> Path:
    """`wanted`, unless the postgres user cannot reach it (a root-only home): then a temp dir."""
    if run_as is None:
        return wanted
    wanted.parent.mkdir(parents=True, exist_ok=True)
    check = subprocess.run(
        _as_user(run_as, ["test", "-x", str(wanted.parent)]), capture_output=True, check=False
    )
    if check.returncode == 0:
        return wanted
    return Path(tempfile.mkdtemp(prefix="esms-demo-pg-"))


def stop_leftover_postgres(workdir: Path = DEFAULT_WORKDIR) -> None:
    """Stop the throwaway cluster a killed run left under `workdir`, and delete its data."""
    base = (workdir / "pg").resolve()
    if (base / "data" / "postmaster.pid").exists():
        run_as = _postgres_user() if _running_as_root() else None
        cluster = PostgresCluster(base, base / "data", find_postgres_bin(), run_as)
        with contextlib.suppress(LocalServiceError):
            _pg_ctl(cluster, ["stop", "-m", "immediate", "-w"])
    shutil.rmtree(base / "data", ignore_errors=True)


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            os.chown(name, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _as_user(user: str | None, command: Sequence[str]) -> list[str]:
    if user is None:
        return list(command)
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *command]
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(_quote(part) for part in command)]


def _quote(part: str) -> str:
    return "'" + part.replace("'", "'\\''") + "'"


def _pg_ctl(cluster: PostgresCluster, args: Sequence[str]) -> None:
    _run(cluster, "pg_ctl", ["-D", str(cluster.data), *args])


def _run(cluster: PostgresCluster, program: str, args: Sequence[str]) -> None:
    command = _as_user(cluster.run_as, [str(cluster.bin_dir / program), *args])
    # pg_ctl's server inherits stdout unless told otherwise; DEVNULL keeps our pipes closable.
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        log_hint = cluster.base / "postgres.log"
        raise LocalServiceError(
            f"{program} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            f"server log: {log_hint}"
        )


# --- Redis -------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A `redis-server` child this process started; `stop()` ends it."""

    process: subprocess.Popen

    def stop(self) -> None:
        _stop_child(self.process)


def with_redis_db(url: str, db: int) -> str:
    """The same Redis server, another numbered database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def ensure_redis(url: str, workdir: Path = DEFAULT_WORKDIR) -> tuple[str, RedisServer | None]:
    """Use the Redis at `url` if it answers; otherwise start a throwaway `redis-server`."""
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

    binary = shutil.which("redis-server")
    if binary is None:
        raise LocalServiceError(
            "no Redis answers at REDIS_URL and redis-server was not found to start one.\n"
            "Install it (Debian/Ubuntu): sudo apt-get install redis-server\n"
            "or point REDIS_URL at a running server."
        )
    port = free_port()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "redis.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches the demo, which then stops Redis last, in order.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    server = RedisServer(process)
    local = f"redis://127.0.0.1:{port}/{_redis_db(url)}"
    _wait_for_redis(local, server, logs / "redis.log")
    return local, server


def _redis_db(url: str) -> int:
    return int(parse_url(url).get("db", 0))


def _wait_for_redis(url: str, server: RedisServer, log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.1)
    finally:
        client.close()
    server.stop()
    raise LocalServiceError(f"redis-server did not start; see {log_path}")
