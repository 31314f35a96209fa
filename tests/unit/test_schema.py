"""worker.schema's comparison of a database's revision with this release's migrations."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from worker import schema
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script() -> ScriptDirectory:
    return ScriptDirectory(str(ROOT / "migrations"))


def test_the_release_at_its_head_passes(script):
    schema.compare(script.get_heads(), script)


def test_a_database_never_migrated_is_told_to_upgrade(script):
    with pytest.raises(schema.SchemaMismatch, match=r"not migrated.*run `alembic upgrade head`"):
        schema.compare((), script)


def test_a_database_behind_is_told_to_upgrade(script):
    (head,) = script.get_heads()
    previous = script.get_revision(head).down_revision
    with pytest.raises(schema.SchemaMismatch) as raised:
        schema.compare([previous], script)
    message = str(raised.value)
    assert f"at revision {previous}, behind this release's {head}" in message
    assert message.endswith("run `alembic upgrade head`")


def test_a_database_newer_than_the_code_is_refused(script):
    with pytest.raises(schema.SchemaMismatch) as raised:
        schema.compare(["9f1e2d3c4b5a"], script)
    message = str(raised.value)
    assert "revision 9f1e2d3c4b5a, which this release does not know" in message
    assert "migrated by a newer release" in message
    assert "upgrade head" not in message


def test_migrations_are_found_beside_the_package_first(tmp_path):
    # This checkout (or an editable install): whatever the working directory.
    assert schema.migrations_dir(tmp_path) == ROOT / "migrations"


def test_an_installed_package_finds_the_release_directory_it_runs_in(monkeypatch, tmp_path):
    # Installed into a venv's site-packages, as the systemd units and the image run it: the
    # migrations are in the working directory (the release directory).
    installed = tmp_path / "venv" / "site-packages" / "worker" / "schema.py"
    monkeypatch.setattr(schema, "__file__", str(installed))
    release = tmp_path / "release"
    (release / "migrations" / "versions").mkdir(parents=True)
    (release / "migrations" / "env.py").write_text("")
    assert schema.migrations_dir(release) == release / "migrations"
    assert schema.migrations_dir(tmp_path) is None


def test_a_missing_migrations_directory_is_a_clear_refusal(monkeypatch, tmp_path):
    monkeypatch.setattr(schema, "migrations_dir", lambda cwd=None: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(schema.SchemaMismatch, match="cannot find this release's migrations/"):
        schema.verify(Settings(_env_file=None))
