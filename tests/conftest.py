"""Shared fixtures: a throwaway Postgres database per test session, a private Redis database, and
settings that point at them. Nothing here touches any other database.

`TEST_PG_ADMIN_URL` (default postgresql://postgres@127.0.0.1:5432/postgres) is where the session
database is created and dropped; `TEST_REDIS_URL` (default redis://127.0.0.1:6379/13) is flushed.
When nothing answers at one of them, `pytest_configure` starts an embedded server for the session
(worker/localservices.py: the Postgres and Redis wheels of the dev extra, under .demo/pytest) and
puts its URL into both the constants below and the environment, where the celery workers and other
programs the tests start read it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text

from worker.settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")

TEST_API_KEY = "test-api-key-1"
TEST_SECRET_KEY = "test-secret-Zq8vN3"


def pytest_configure(config: pytest.Config) -> None:
    global PG_ADMIN_URL, REDIS_TEST_URL
    from worker.localservices import LocalServiceError, ensure_postgres, ensure_redis

    workdir = Path(ROOT) / ".demo" / "pytest"
    started = []
    try:
        PG_ADMIN_URL, postgres = ensure_postgres(PG_ADMIN_URL, workdir)
        started.append(postgres)
        REDIS_TEST_URL, redis_server = ensure_redis(REDIS_TEST_URL, workdir)
        started.append(redis_server)
    except LocalServiceError as error:
        _close(started)
        raise pytest.UsageError(str(error)) from None
    config.stash[_EMBEDDED] = [server for server in started if server is not None]
    os.environ["TEST_PG_ADMIN_URL"] = PG_ADMIN_URL
    os.environ["TEST_REDIS_URL"] = REDIS_TEST_URL


def pytest_sessionstart(session: pytest.Session) -> None:
    # Written even under -q (`make test`): whoever reads the log learns which servers ran it.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    embedded = {type(server).__name__ for server in session.config.stash.get(_EMBEDDED, [])}
    for name, url, kind in (("postgres", PG_ADMIN_URL, "EmbeddedPostgres"),
                            ("redis", REDIS_TEST_URL, "EmbeddedRedis")):  # fmt: skip
        origin = "embedded, started for this session" if kind in embedded else "as found"
        if reporter is not None:
            # Host, port and database only: a URL's password is never printed.
            where = urlsplit(url)
            reporter.write_line(f"{name}: {where.hostname}:{where.port}{where.path} ({origin})")


def pytest_unconfigure(config: pytest.Config) -> None:
    _close(config.stash.get(_EMBEDDED, []))


_EMBEDDED = pytest.StashKey[list]()


def _close(servers: list) -> None:
    for server in reversed(servers):
        if server is not None:
            server.close()


def _server_url(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def alembic_config(database_url: str) -> Config:
    config = Config(os.path.join(ROOT, "alembic.ini"))
    config.set_main_option("script_location", os.path.join(ROOT, "migrations"))
    config.attributes["database_url"] = database_url
    return config


@pytest.fixture(scope="session")
def database_url() -> str:
    name = f"esms_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _server_url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    command.upgrade(alembic_config(url), "head")
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def session_engine(database_url: str) -> Engine:
    engine = create_engine(database_url, pool_size=8, max_overflow=8)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(session_engine: Engine) -> Engine:
    """The session database, emptied: tests here commit, and other processes must see it."""
    with session_engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE messages, poll_batches, message_history, scheduler_heartbeat, "
                "message_count_deltas, message_totals, resolved_hourly_counts, "
                "message_events, feed_cursors"
            )
        )
    return session_engine


@pytest.fixture
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    client.close()
    return REDIS_TEST_URL


@pytest.fixture
def make_settings(database_url: str, redis_url: str):
    """Settings for this test's database and Redis; keyword arguments override fields."""

    def build(**overrides) -> Settings:
        values = {
            "database_url": database_url,
            "redis_url": redis_url,
            "esms_api_key": TEST_API_KEY,
            "esms_secret_key": TEST_SECRET_KEY,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return build


@pytest.fixture
def children(tmp_path):
    from tests.processes import Children

    running = Children(tmp_path)
    yield running
    running.stop_all()
