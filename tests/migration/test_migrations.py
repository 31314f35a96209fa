"""The migrations build exactly the schema of worker/models.py, and downgrade cleanly."""

from __future__ import annotations

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from tests.conftest import PG_ADMIN_URL, _server_url, alembic_config
from worker.models import metadata

pytestmark = pytest.mark.integration


def test_head_matches_models(session_engine):
    with session_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_server_default": True})
        assert compare_metadata(context, metadata) == []


def test_downgrade_to_base_and_up_again():
    name = "esms_test_migration_roundtrip"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _server_url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        config = alembic_config(url)
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        engine = create_engine(url)
        with engine.connect() as conn:
            tables = (
                conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                .scalars()
                .all()
            )
        engine.dispose()
        assert tables == ["alembic_version"]
        command.upgrade(config, "head")
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
