"""The deployment files keep their promises: the install in docs/deploy.md copies only a commit's
files (never a checkout's `.env`), and docker-compose.yml connects the daemon as the app role and
only the migrations as the owner role."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_MD = (ROOT / "docs" / "deploy.md").read_text()
COMPOSE = (ROOT / "docker-compose.yml").read_text()


def install_block() -> str:
    section = DEPLOY_MD.split("## On a plain server with systemd", 1)[1]
    return section.split("```sh", 1)[1].split("```", 1)[0]


def test_install_copies_a_git_archive_never_the_checkout():
    block = install_block()
    assert "git archive HEAD" in block
    for line in block.splitlines():
        if "rsync " in line and "apt-get" not in line:
            # The source is the extracted archive, not the working directory.
            assert '"$release"/' in line and " ./" not in line, line
            assert "--delete" in line


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout"
)
def test_the_archive_holds_what_the_install_needs_and_no_local_state():
    listed = subprocess.run(
        ["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    names = set(
        subprocess.run(["tar", "-t"], input=listed, capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    assert {"alembic.ini", "migrations/env.py", "pyproject.toml", "deploy/esms-run"} <= names
    local_state = re.compile(r"(^|/)(\.env|\.venv/.*|\.demo/.*|celerybeat-schedule.*)$")
    assert not {name for name in names if local_state.search(name)}


def compose_services() -> dict[str, str]:
    """Each service's block of docker-compose.yml, by name (two-space keys under `services:`)."""
    body = COMPOSE.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    parts = re.split(r"^  ([a-z][a-z0-9-]*):\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_compose_runs_the_daemon_as_the_app_role_and_migrations_as_the_owner():
    services = compose_services()
    app_default = re.search(r"^x-app: &app\n(?:  .*\n)+", COMPOSE, re.M).group(0)
    assert "esms_app:" in app_default and "postgres:postgres@" not in app_default
    for name in ("worker", "receiver", "flower"):
        urls = re.findall(r"DATABASE_URL: (.*)", services[name])
        assert urls and all("esms_app:" in url for url in urls), name
    (migrate_url,) = re.findall(r"DATABASE_URL: (.*)", services["migrate"])
    assert "esms_owner:" in migrate_url
    assert "deploy/postgres-roles.sql" in services["db-roles"]
    assert "db-roles:\n        condition: service_completed_successfully" in services["migrate"]
