"""Throwaway databases beside the session's, for tests that need a schema state of their own (a
database stamped with an unknown revision, one migrated by a dedicated owner role).

Each is named `esms_test_<pid>_<random>_<tag>`, created on the server of TEST_PG_ADMIN_URL and
dropped with everything in it when the block ends, whatever happened inside.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.conftest import PG_ADMIN_URL, _server_url


@contextmanager
def scratch_database(tag: str) -> Iterator[str]:
    """An empty database; yields its SQLAlchemy URL (as the superuser of the admin URL)."""
    name = f"esms_test_{os.getpid()}_{uuid.uuid4().hex[:8]}_{tag}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _server_url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def libpq(url: str) -> str:
    """A SQLAlchemy psycopg URL as psycopg and psql take it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)
