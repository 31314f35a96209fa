"""worker.schema against real databases, and `celery worker`/`celery beat` refusing to start on a
schema revision they do not know: exit status 1, one line saying why, no traceback."""

from __future__ import annotations

import logging
import sys

import pytest
from sqlalchemy import create_engine, text

from tests.processes import celery, child_env, free_port
from tests.scratchdb import scratch_database
from worker import schema

pytestmark = pytest.mark.integration

UNKNOWN = "9f1e2d3c4b5a"


def stamp(url: str, *revisions: str) -> None:
    """Make `url` look migrated to `revisions`: only the version table, as alembic keeps it."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE alembic_version (version_num varchar(32) NOT NULL "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY)"
            )
        )
        for revision in revisions:
            conn.execute(text("INSERT INTO alembic_version VALUES (:r)"), {"r": revision})
    engine.dispose()


def test_the_session_database_at_head_passes(make_settings):
    assert schema.verify(make_settings()) is True


def test_an_unknown_revision_is_refused(make_settings):
    with scratch_database("unknown") as url:
        stamp(url, UNKNOWN)
        with pytest.raises(schema.SchemaMismatch, match=f"revision {UNKNOWN}, which this release"):
            schema.verify(make_settings(database_url=url))


def test_a_database_never_migrated_is_refused(make_settings):
    with scratch_database("empty") as url:
        with pytest.raises(schema.SchemaMismatch, match="run `alembic upgrade head`"):
            schema.verify(make_settings(database_url=url))


def test_a_database_that_does_not_answer_is_logged_not_refused(make_settings, caplog):
    url = f"postgresql+psycopg://esms:pw-Kq9x7s@127.0.0.1:{free_port()}/esms"
    with caplog.at_level(logging.WARNING, logger="worker.schema"):
        assert schema.verify(make_settings(database_url=url)) is False
    assert "schema revision not checked" in caplog.text
    assert "pw-Kq9x7s" not in caplog.text


@pytest.mark.e2e
def test_celery_worker_refuses_an_unknown_revision(children, redis_url):
    with scratch_database("worker") as url:
        stamp(url, UNKNOWN)
        env = child_env(
            DATABASE_URL=url, REDIS_URL=redis_url,
            ESMS_API_KEY="schema-key", ESMS_SECRET_KEY="schema-secret",
        )  # fmt: skip
        child = celery(children, "worker", env)
        assert child.proc.wait(60) == 1
    log = child.log()
    assert f"celery worker refuses to start: the database is at revision {UNKNOWN}" in log
    assert "migrated by a newer release" in log
    assert "Traceback" not in log
    # It stopped before consuming: the banner's ready line never came.
    assert "ready." not in log


@pytest.mark.e2e
def test_celery_beat_refuses_a_database_behind_the_code(children, redis_url):
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(schema.migrations_dir()))
    (head,) = script.get_heads()
    previous = script.get_revision(head).down_revision
    with scratch_database("beat") as url:
        stamp(url, previous)
        env = child_env(DATABASE_URL=url, REDIS_URL=redis_url)
        child = celery(children, "beat", env)
        assert child.proc.wait(60) == 1
    log = child.log()
    assert f"celery beat refuses to start: the database is at revision {previous}" in log
    assert "run `alembic upgrade head`" in log
    assert "Traceback" not in log


def test_the_receiver_refuses_an_unknown_revision(children, redis_url):
    with scratch_database("receiver") as url:
        stamp(url, UNKNOWN)
        env = child_env(DATABASE_URL=url, REDIS_URL=redis_url, PUSH_TOKEN="t" * 32)
        argv = [sys.executable, "-m", "worker.receiver", "--port", str(free_port())]
        child = children.spawn("receiver", argv, env)
        assert child.proc.wait(60) == 1
    log = child.log()
    assert f"worker.receiver refuses to start: the database is at revision {UNKNOWN}" in log
    assert "Traceback" not in log
