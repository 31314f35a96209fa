"""The benchmarks' throwaway database: made fresh and migrated for a run, dropped after it.

Each benchmark names its own database (never one a user or the tests use) on the server at
`BENCH_PG_SERVER` (default: the local Postgres as user postgres).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import child_env  # noqa: E402

PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")


def fresh_database(name: str) -> str:
    """Drop and recreate database `name`, run `alembic upgrade head` on it; its SQLAlchemy URL."""
    drop_database(name)
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = f"{PG_SERVER}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"],
        cwd=ROOT,
        env=child_env(DATABASE_URL=url),
        check=True,
        capture_output=True,
    )
    return url


def drop_database(name: str) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
