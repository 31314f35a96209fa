"""Alembic environment: migrates the database named by DATABASE_URL (via worker.settings).

Run it as the schema's owner role (docs/deploy.md, deploy/postgres-roles.sql), never as the
daemon's role, which may not change the schema.

A migration must never stall the poller. A DDL statement waiting for its lock (say, behind a
long report that reads `messages`) makes every later statement on that table queue behind it,
the poller's writes included, for as long as it waits. So each revision runs in its own
transaction with a short `lock_timeout`: a step that cannot get its lock in time gives up, is
rolled back (the revisions before it stay applied), and is tried again after a pause that
doubles each time, so the poller's writes wait at most about the timeout per attempt. After the
last retry the run ends with one line saying what happened and what to do. Statements
themselves may run as long as they need (`statement_timeout` 0: an index build on a big table
takes minutes, with no lock that blocks writes).

Options, as `alembic -x NAME=VALUE upgrade head`:
  lock_timeout   longest wait for one lock, in Postgres syntax (default 2s)
  lock_retries   further attempts after the first one times out (default 5)
  retry_backoff  seconds before the first retry, doubled for each next one, at most 10 (default 1)
"""

from __future__ import annotations

import logging
import time
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine, exc, pool, text

from worker.models import metadata
from worker.settings import Settings

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

log = logging.getLogger("alembic.env")

DEFAULT_LOCK_TIMEOUT = "2s"
DEFAULT_LOCK_RETRIES = 5
DEFAULT_RETRY_BACKOFF_SECONDS = 1.0
MAX_RETRY_BACKOFF_SECONDS = 10.0
_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock wait cut by lock_timeout

# set_config(..., false) lasts for the session, also through 0005's autocommit block.
_SESSION_TIMEOUTS = text(
    "SELECT set_config('lock_timeout', :lock_timeout, false), "
    "set_config('statement_timeout', '0', false)"
)
_HAS_VERSION_TABLE = text("SELECT to_regclass('alembic_version') IS NOT NULL")
_CURRENT = text("SELECT string_agg(version_num, ', ') FROM alembic_version")


def _url() -> str:
    # A caller (the test suite) may pass a connection URL explicitly; otherwise DATABASE_URL.
    return config.attributes.get("database_url") or Settings().sqlalchemy_url


def _options() -> tuple[str, int, float]:
    given = context.get_x_argument(as_dictionary=True)
    try:
        return (
            given.get("lock_timeout", DEFAULT_LOCK_TIMEOUT),
            max(0, int(given.get("lock_retries", DEFAULT_LOCK_RETRIES))),
            max(0.0, float(given.get("retry_backoff", DEFAULT_RETRY_BACKOFF_SECONDS))),
        )
    except ValueError:
        raise CommandError(
            "-x lock_retries needs a whole number and -x retry_backoff a number of seconds"
        ) from None


def _is_lock_timeout(error: exc.DBAPIError) -> bool:
    return getattr(error.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE


def _current_revision(engine) -> str:
    try:
        with engine.connect() as conn:
            if not conn.execute(_HAS_VERSION_TABLE).scalar():
                return "none"
            return conn.execute(_CURRENT).scalar() or "none"
    except exc.DBAPIError:
        return "unknown"


def _migrate_once(engine, lock_timeout: str) -> None:
    with engine.connect() as connection:
        connection.execute(_SESSION_TIMEOUTS, {"lock_timeout": lock_timeout})
        # Outside a transaction before alembic starts, so that it opens one per revision.
        connection.commit()
        context.configure(
            connection=connection,
            target_metadata=metadata,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    lock_timeout, retries, backoff = _options()
    engine = create_engine(_url(), poolclass=pool.NullPool, hide_parameters=True)
    try:
        for attempt in range(1, retries + 2):
            try:
                # Each attempt starts from the revision the database is at: the steps that
                # succeeded before a timeout are committed and not run again.
                _migrate_once(engine, lock_timeout)
                return
            except exc.DBAPIError as error:
                if not _is_lock_timeout(error):
                    raise
                at = _current_revision(engine)
                if attempt > retries:
                    raise CommandError(
                        f"migration stopped at revision {at}: a step could not take its lock "
                        f"within lock_timeout={lock_timeout} in {attempt} attempts. Another "
                        "session holds a conflicting lock on a table the step changes (see "
                        "pg_locks and pg_stat_activity); run `alembic upgrade head` again once "
                        "it is gone, or allow more with -x lock_timeout=... -x lock_retries=..."
                    ) from None
                pause = min(backoff * 2 ** (attempt - 1), MAX_RETRY_BACKOFF_SECONDS)
                log.warning(
                    "at revision %s, the next step waited lock_timeout=%s for a lock "
                    "(attempt %d of %d); trying again in %.1fs",
                    at, lock_timeout, attempt, retries + 1, pause,
                )  # fmt: skip
                time.sleep(pause)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
