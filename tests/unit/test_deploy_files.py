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


# --- monitoring: Prometheus, the alert rules and Grafana (docs/alerts.md) ----------------------

_METRIC = re.compile(r"\besms_[a-z0-9_]+")
# What Prometheus adds to a family's name in the samples it stores.
_SAMPLE_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def defined_metrics() -> set[str]:
    """Every metric the code exports: the names given in worker/metrics.py and the receiver's
    (worker/receiver_metrics.py), with the `_total` Prometheus adds to a counter's samples."""
    names = set()
    for module in ("metrics.py", "receiver_metrics.py"):
        source = (ROOT / "worker" / module).read_text()
        for kind, name in re.findall(
            r"(Counter|Gauge|Histogram)\(\s*\"(esms_[a-z0-9_]+)\"", source
        ):
            names.add(name)
            if kind == "Counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
    return names


def used_metrics(text: str) -> set[str]:
    found = set()
    for name in _METRIC.findall(text):
        for suffix in _SAMPLE_SUFFIXES:
            name = name.removesuffix(suffix)
        found.add(name)
    return found


def test_alerts_and_dashboard_use_only_metrics_the_code_exports():
    import json

    yaml = pytest.importorskip("yaml")
    exported = defined_metrics()
    assert {"esms_requests_total", "esms_receiver_pushes_total"} <= exported
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = " ".join(rule["expr"] for group in rules["groups"] for rule in group["rules"])
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "esms-callback-poller.json").read_text())
    queries = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    assert used_metrics(exprs) - exported == set()
    assert used_metrics(queries) - exported == set()
    # The dashboard shows what the issue asked for.
    for wanted in (
        "esms_requests_total",
        "esms_refids_polled_total",
        "esms_backlog_pending",
        "esms_backlog_oldest_pending_age_seconds",
        "esms_resolved_total",
        "esms_final_failures_total",
        "esms_limiter_wait_seconds",
        "esms_receiver_resolved_total",
    ):
        assert wanted in used_metrics(queries), wanted
    assert all(
        target["datasource"]["uid"] == "esms-prometheus"
        for panel in dashboard["panels"]
        for target in panel["targets"]
    )


def test_compose_provisions_prometheus_with_the_rules_and_grafana_with_the_dashboard():
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(COMPOSE)["services"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source, target, *_ = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                mounts[target] = ROOT / source
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"].name == "alerts.yml"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["esms-worker"]["dns_sd_configs"][0]["port"] == 9808
    # The receiver's supervisor serves every worker's counters on RECEIVER_METRICS_PORT.
    from worker.settings import Settings

    metrics_port = (
        services["receiver"]
        .get("environment", {})
        .get("RECEIVER_METRICS_PORT", Settings.model_fields["receiver_metrics_port"].default)
    )
    assert jobs["esms-receiver"]["static_configs"][0]["targets"] == [f"receiver:{metrics_port}"]
    # The workers listen where Prometheus looks for them.
    assert str(services["worker"]["environment"]["METRICS_PORT"]) == "9808"
    provisioning = mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == "esms-prometheus"
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((provisioning / "dashboards" / "esms.yml").read_text())
    folder = boards["providers"][0]["options"]["path"]
    assert any(target.startswith(folder + "/") for target in mounts), folder
