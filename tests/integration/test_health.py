"""The health checks docs/deploy.md and docker-compose.yml give operators, run as written:
`celery -A worker inspect ping` against a real worker and a real beat (`--enable-remote-control`),
and the systemd unit files in deploy/ through `systemd-analyze verify`.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.processes import BIN, ROOT, celery, child_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def ping(env: dict[str, str], node: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "celery"), "-A", "worker", "inspect", "ping", "-d", node, "-t", "5"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_inspect_ping_answers_for_worker_and_beat(engine, database_url, redis_url, children):
    env = child_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        ESMS_API_KEY="health-key",
        ESMS_SECRET_KEY="health-secret",
        ESMS_BASE_URL="http://127.0.0.1:9",  # nothing is due: never called
        METRICS_PORT="0",
    )
    suffix = uuid.uuid4().hex[:8]
    worker_node, beat_node = f"health-{suffix}@127.0.0.1", f"healthbeat-{suffix}@127.0.0.1"
    # Nobody answers yet: the check fails, as a supervisor must see it.
    assert ping(env, worker_node).returncode != 0

    celery(children, "worker", env, "-n", worker_node)
    celery(children, "beat", env, "--enable-remote-control", "-n", beat_node)
    for node in (worker_node, beat_node):
        answer = wait_for(
            lambda node=node: (result := ping(env, node)).returncode == 0 and result,
            timeout=60,
            message=f"{node} answers inspect ping",
        )
        assert "pong" in answer.stdout and node in answer.stdout
    # The second half of beat's check in docker-compose.yml: a tick ran in the last minute.
    age = wait_for(
        lambda: _heartbeat_age(engine),
        timeout=60,
        message="a scheduler tick recorded in scheduler_heartbeat",
    )
    assert age < 60


def _heartbeat_age(engine) -> float | None:
    with engine.begin() as conn:
        age = conn.execute(
            text("SELECT extract(epoch FROM now() - last_tick_at) FROM scheduler_heartbeat")
        ).scalar()
    return None if age is None else float(age) + 1e-9


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify_cleanly(tmp_path):
    units = sorted((ROOT / "deploy").glob("*.service"))
    assert {unit.name for unit in units} == {
        "esms-worker.service",
        "esms-beat.service",
        "esms-flower.service",
        "esms-receiver.service",
    }
    for unit in units:
        # The units name the install directory of docs/deploy.md; this checkout stands in for it
        # so that verify can check that each ExecStart exists.
        text_ = unit.read_text().replace("/opt/esms-callback-poller", str(ROOT))
        (tmp_path / unit.name).write_text(text_)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(p) for p in Path(tmp_path).iterdir())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # verify exits 0 even for unknown keys and bad values; it only complains on stderr.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
