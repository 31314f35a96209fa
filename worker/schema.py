"""Refuses to run on a database schema this release does not know.

Every statement in worker.store is written for one schema: the head of this release's
migrations/. A worker started on a database that is behind it (a release deployed without
`alembic upgrade head`) would fail on its first claim; one started on a database that is ahead
(an old release restarted after a newer one migrated) would read and write columns whose meaning
it does not know. So `celery worker` and `celery beat` (worker.celery) compare the database's
`alembic_version` with the revisions in migrations/ as they start, and stop with one line that
says which case it is and what to do (`verify` raises `SchemaMismatch` with that line).

migrations/ is not part of the installed package: it is looked for next to the package (a
checkout, an editable install) and then in the working directory, where `alembic` itself finds
alembic.ini (the release directory of the systemd units, /app in the image).

A database that cannot be reached is not a mismatch: the daemon already waits out a Postgres
outage, and a start-up check that made it exit instead would turn every restart of Postgres
into a crash loop. That case is logged and the process starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, exc, pool, text

from worker.logging_setup import redact, secrets_of
from worker.settings import Settings

log = logging.getLogger(__name__)

# A start-up check must not hang a worker on a database that does not answer.
_CONNECT_TIMEOUT_SECONDS = 10
UPGRADE_HINT = "run `alembic upgrade head`"


class SchemaMismatch(Exception):
    """The database's schema revision is not the one this code was written for; the message
    is the whole report, one line, without secrets."""


def migrations_dir(cwd: Path | None = None) -> Path | None:
    """The migrations/ directory of this release, or None when there is none to be found."""
    beside_package = Path(__file__).resolve().parent.parent / "migrations"
    in_working_dir = (cwd or Path.cwd()) / "migrations"
    for candidate in (beside_package, in_working_dir):
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    return None


# Alembic's own version table, read directly: alembic's MigrationContext would do the same and
# log two INFO lines about its DDL mode at every start of every worker.
_VERSION_TABLE = text("SELECT to_regclass('alembic_version') IS NOT NULL")
_VERSIONS = text("SELECT version_num FROM alembic_version ORDER BY 1")


def database_revisions(conn: Connection) -> tuple[str, ...]:
    """The revisions stamped in `alembic_version` (none when the table is absent or empty)."""
    if not conn.execute(_VERSION_TABLE).scalar():
        return ()
    return tuple(conn.execute(_VERSIONS).scalars())


def compare(database: Iterable[str], script: ScriptDirectory) -> None:
    """Raise `SchemaMismatch` unless the database is exactly at this release's head(s)."""
    database = tuple(database)
    heads = tuple(script.get_heads())
    known = {revision.revision for revision in script.walk_revisions()}
    wanted = ", ".join(sorted(heads))
    if not database:
        raise SchemaMismatch(
            f"the database is not migrated (no alembic_version): {UPGRADE_HINT} "
            f"(this release needs revision {wanted})"
        )
    unknown = sorted(set(database) - known)
    if unknown:
        raise SchemaMismatch(
            f"the database is at revision {', '.join(unknown)}, which this release does not "
            f"know (its newest is {wanted}): the database was migrated by a newer release. "
            "Run that release, or downgrade the database with it; this code refuses to read "
            "and write a schema it was not written for"
        )
    if set(database) != set(heads):
        raise SchemaMismatch(
            f"the database is at revision {', '.join(sorted(database))}, behind this "
            f"release's {wanted}: {UPGRADE_HINT}"
        )


def verify(settings: Settings, script_location: Path | None = None) -> bool:
    """Check the database named by `settings` against this release's migrations.

    Returns True when the revision matched, False when it could not be read (the database did
    not answer: logged); raises `SchemaMismatch` when it is the wrong one or migrations/ is
    missing.
    """
    location = script_location or migrations_dir()
    if location is None:
        raise SchemaMismatch(
            "cannot find this release's migrations/ directory (looked beside the package and in "
            f"the working directory {Path.cwd()}): start the program from the release directory"
        )
    script = ScriptDirectory(str(location))
    engine = create_engine(
        settings.sqlalchemy_url,
        poolclass=pool.NullPool,
        hide_parameters=True,
        connect_args={"connect_timeout": _CONNECT_TIMEOUT_SECONDS},
    )
    try:
        with engine.connect() as conn:
            database = database_revisions(conn)
    except (exc.OperationalError, exc.InterfaceError) as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
        log.warning(
            "schema revision not checked, the database did not answer: %s",
            redact(reason, secrets_of(settings)),
        )
        return False
    except exc.DBAPIError as error:
        # E.g. a role without SELECT on alembic_version: the same refusal as a wrong revision,
        # since nothing says this code fits the schema.
        reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
        raise SchemaMismatch(
            f"cannot read the schema revision: {redact(reason, secrets_of(settings))}"
        ) from None
    finally:
        engine.dispose()
    compare(database, script)
    return True
