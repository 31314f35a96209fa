"""deploy/postgres-roles.sql, run with psql as docs/deploy.md says: the migrations run as the owner
role, and the daemon's real statements (a scheduler tick, a poll against the emulator, the CLI,
the start-up schema check) run as the app role, which can change rows and nothing else.

Roles are cluster-wide: each test module makes its own, with unique names, in a database of its
own, and drops them at the end.
"""

from __future__ import annotations

import secrets
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
import redis
from alembic import command
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from tests.conftest import PG_ADMIN_URL, TEST_API_KEY, TEST_SECRET_KEY, alembic_config
from tests.processes import ROOT, Children, start_emulator
from tests.scratchdb import libpq, scratch_database
from worker import poller, scheduler, schema, store
from worker.cli import app as cli_app
from worker.cooloff import CoolOffs
from worker.esms_client import EsmsClient
from worker.localservices import psql_program
from worker.notfound import NotFoundTracker
from worker.ratelimit import RateLimiter, RatePolicy

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "deploy" / "postgres-roles.sql"


@dataclass(frozen=True)
class Roles:
    owner: str
    app: str
    password: str

    def url(self, database_url: str, role: str) -> str:
        return (
            make_url(database_url)
            .set(username=role, password=self.password)
            .render_as_string(hide_password=False)
        )


@contextmanager
def unique_roles() -> Iterator[Roles]:
    suffix = uuid.uuid4().hex[:10]
    roles = Roles(f"esms_t_owner_{suffix}", f"esms_t_app_{suffix}", secrets.token_urlsafe(12))
    try:
        yield roles
    finally:
        # After the databases they have privileges in are dropped (scratch_database's exit).
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            for role in (roles.app, roles.owner):
                admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def run_script(database_url: str, roles: Roles) -> subprocess.CompletedProcess:
    return subprocess.run(
        [psql_program(), "-X", "-q", "-v", "ON_ERROR_STOP=1",
         "-v", f"owner_role={roles.owner}", "-v", f"app_role={roles.app}",
         "-v", f"owner_password={roles.password}", "-v", f"app_password={roles.password}",
         "-d", libpq(database_url), "-f", str(SCRIPT)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


@dataclass
class Deployed:
    roles: Roles
    owner_url: str
    app_url: str
    app_engine: Engine


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployed]:
    """A fresh database set up as docs/deploy.md does it: roles first, then the migrations as
    the owner; the app role's engine is the daemon's."""
    with unique_roles() as roles, scratch_database("roles") as url:
        run_script(url, roles)
        owner_url, app_url = roles.url(url, roles.owner), roles.url(url, roles.app)
        command.upgrade(alembic_config(owner_url), "head")
        engine = create_engine(app_url)
        yield Deployed(roles, owner_url, app_url, engine)
        engine.dispose()


@pytest.fixture
def app_settings(deployed, make_settings):
    with deployed.app_engine.begin() as conn:
        conn.execute(text("DELETE FROM messages"))
        conn.execute(text("DELETE FROM poll_batches"))
    return make_settings(database_url=deployed.app_url)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    children = Children(tmp_path_factory.mktemp("emulator"))
    running = start_emulator(
        children,
        "--account", f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s", "0", "--final-after-max-s", "0",
    )  # fmt: skip
    yield running
    children.stop_all()


def owners(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'S', 'i')"
                )
            ).scalars()
        )


def test_the_migrations_ran_as_the_owner_and_own_everything(deployed):
    engine = create_engine(deployed.owner_url)
    try:
        assert owners(engine) == {deployed.roles.owner}
    finally:
        engine.dispose()


def test_the_app_role_passes_the_start_up_schema_check(app_settings):
    assert schema.verify(app_settings) is True


def test_a_tick_and_a_poll_end_to_end_as_the_app_role(deployed, app_settings, emulator):
    emulator.admin("POST", "/reset")
    settings = app_settings.model_copy(
        update={"esms_base_url": emulator.url, "poll_interval_seconds": 0.001}
    )
    engine = deployed.app_engine
    # The sender's insert, then the scheduler's tick (new rows, expiry, leases, the claim).
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id) VALUES (:r, 'oa-roles')"),
            [{"r": f"role-{i}"} for i in range(5)],
        )
    queued: list[store.Batch] = []
    scheduler.schedule_tick(engine, settings, queued.extend)
    if not queued:  # the first tick only gave the new rows their first poll time
        scheduler.schedule_tick(engine, settings, queued.extend)
    assert len(queued) == 1
    client = EsmsClient(settings.esms_base_url, settings.esms_timeout_seconds)
    connection = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        result = poller.poll_batch(
            queued[0].id,
            settings=settings,
            engine=engine,
            client=client,
            limiter=RateLimiter(connection, RatePolicy.from_settings(settings)),
            cooloffs=CoolOffs(connection),
            notfound=NotFoundTracker(connection, settings),
        )
    finally:
        client.close()
    assert result.outcome is poller.Outcome.DONE and result.items == 5
    with engine.connect() as conn:
        states = conn.execute(text("SELECT DISTINCT state FROM messages")).scalars().all()
        history = conn.execute(text("SELECT count(*) FROM message_history")).scalar()
    assert set(states) <= {"sent", "failed", "rejected"} and history >= 5


def test_the_cli_works_as_the_app_role(app_settings):
    runner = CliRunner()
    tracked = runner.invoke(cli_app, ["track", "cli-role-1:oa-cli"], obj=app_settings)
    assert tracked.exit_code == 0, tracked.output
    status = runner.invoke(cli_app, ["status"], obj=app_settings)
    assert status.exit_code == 0, status.output
    assert "oa-cli" in status.output
    shown = runner.invoke(cli_app, ["show", "cli-role-1"], obj=app_settings)
    assert shown.exit_code == 0, shown.output


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE message_history",
        "ALTER TABLE messages ADD COLUMN intruder text",
        "TRUNCATE poll_batches",
        "CREATE TABLE intruder (id int)",
        "CREATE INDEX intruder_idx ON messages (phone_number)",
        "DROP VIEW message_counts",
        "UPDATE alembic_version SET version_num = 'ffff'",
        "DELETE FROM alembic_version",
        "ALTER TABLE messages OWNER TO CURRENT_USER",
        "COMMENT ON TABLE messages IS 'intruder'",
    ],
)
def test_the_app_role_cannot_change_the_schema(deployed, statement):
    with psycopg.connect(libpq(deployed.app_url)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)


def test_tables_of_later_migrations_are_granted_by_default(deployed):
    with psycopg.connect(libpq(deployed.owner_url), autocommit=True) as owner:
        owner.execute("CREATE TABLE later_table (id bigint GENERATED ALWAYS AS IDENTITY, v text)")
    try:
        with psycopg.connect(libpq(deployed.app_url), autocommit=True) as app:
            app.execute("INSERT INTO later_table (v) VALUES ('granted')")
            assert app.execute("SELECT v FROM later_table").fetchone() == ("granted",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("DROP TABLE later_table")
    finally:
        with psycopg.connect(libpq(deployed.owner_url), autocommit=True) as owner:
            owner.execute("DROP TABLE later_table")


def test_an_existing_database_made_by_the_superuser_is_adopted():
    """The upgrade path: tables the superuser migrated become the owner's, the next migrations
    (0005's concurrent index build among them) run as the owner, and running the script a
    second time changes nothing."""
    with unique_roles() as roles, scratch_database("adopt") as url:
        command.upgrade(alembic_config(url), "0004")
        run_script(url, roles)
        run_script(url, roles)
        owner_url, app_url = roles.url(url, roles.owner), roles.url(url, roles.app)
        command.upgrade(alembic_config(owner_url), "head")
        engine = create_engine(app_url)
        try:
            assert owners(engine) == {roles.owner}
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES ('a', 'oa')"))
                assert conn.execute(text("SELECT count(*) FROM message_counts")).scalar() == 1
        finally:
            engine.dispose()
