"""Metrics and JSON logs of the real programs: `celery worker` (prefork) and `celery beat` against
Postgres, Redis and the emulator. The first test scrapes the worker's endpoint over HTTP, as
Prometheus would, and reads the JSON lines both programs wrote; the others check the backlog
query and the result label in this process.
"""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.integration.test_e2e import daemon_env
from tests.processes import celery, free_port, start_emulator, wait_for
from worker import metrics
from worker.errors import MalformedResponse, ProviderUnavailable, RateLimited

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint by (name, sorted labels); {} while it does not answer."""
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return {}
    response.raise_for_status()
    assert TEST_API_KEY not in response.text and TEST_SECRET_KEY not in response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def json_lines(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def test_worker_serves_metrics_and_both_log_json(engine, database_url, redis_url, children):
    emulator = start_emulator(
        children,
        "--account",
        f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s",
        "0",
        "--final-after-max-s",
        "2",
    )
    oas = ["1090257973118325189", "2020202020202020202"]
    rows = [{"ref_id": uuid.uuid4().hex, "oa_id": oas[i % 2]} for i in range(300)]
    emulator.admin("POST", "/messages", json={"messages": rows})
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), rows)

    port = free_port()
    env = daemon_env(database_url, redis_url, emulator.url, METRICS_PORT=str(port))
    env.update(LOG_FORMAT="json")
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)
    url = f"http://127.0.0.1:{port}/metrics"

    def resolved_and_backlog() -> dict | None:
        samples = scrape(url)
        ready = (
            total(samples, "esms_resolved_total") > 0
            and total(samples, "esms_requests_total", result="100") > 0
            and ("esms_backlog_pending", (("account", "default"),)) in samples
        )
        return samples if ready else None

    samples = wait_for(resolved_and_backlog, timeout=90, message="resolved RefIds in /metrics")

    assert total(samples, "esms_requests_total", account="default", result="100") > 0
    assert total(samples, "esms_request_duration_seconds_count", account="default") > 0
    assert total(samples, "esms_limiter_wait_seconds_count", account="default") > 0
    assert total(samples, "esms_resolved_total", state="sent") > 0
    assert total(samples, "esms_batches_total", outcome="done") > 0
    assert total(samples, "esms_scheduler_ticks_total", result="run") > 0
    assert ("esms_backlog_oldest_pending_age_seconds", (("account", "default"),)) in samples
    assert total(samples, "esms_rate_per_second", account="default") == pytest.approx(19.2)

    worker.stop()
    beat.stop()

    # Celery prints its banner as plain text; every log record is one JSON object.
    worker_lines, beat_lines = json_lines(worker.log()), json_lines(beat.log())
    assert {"time", "level", "logger", "message"} <= worker_lines[0].keys()
    batch_lines = [line for line in worker_lines if line["logger"] == "worker.poller"]
    assert batch_lines, "no batch was logged"
    for line in batch_lines:
        if "duration" in line:
            assert line["account"] == "default" and line["oa"] in oas
            assert line["size"] >= 1 and line["duration"] >= 0
            assert line["task"] == "esms.poll_batch" and line["task_id"]
    assert any(line["logger"] == "celery.beat" for line in beat_lines)
    for child in (worker, beat):
        assert TEST_API_KEY not in child.log() and TEST_SECRET_KEY not in child.log()
        plain = [line for line in child.log().splitlines() if line and not line.startswith("{")]
        assert not any(re.match(r"\[\d{4}-\d\d-\d\d", line) for line in plain), plain[:5]


def test_backlog_gauges_follow_the_pending_rows_every_tenth_tick(engine, make_settings):
    settings = make_settings(
        esms_accounts={"shopb": {"api_key": "kb-1234", "secret_key": "sb-1234"}},
        schedule_tick_seconds=1,
    )
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, created_at) "
                "SELECT 'bl-' || g, 'oa', now() - make_interval(secs => 90 + g) "
                "FROM generate_series(1, 3) AS g"
            )
        )
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id, state) VALUES ('bl-x', 'oa', 'sent')")
        )
        conn.execute(
            text("INSERT INTO scheduler_heartbeat (last_tick_at, ticks) VALUES (now(), 1)")
        )

    metrics.refresh_backlog(engine, settings)

    def gauge(name: str, account: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"account": account})

    assert gauge("esms_backlog_pending", "default") == 3
    assert 93 <= gauge("esms_backlog_oldest_pending_age_seconds", "default") < 150
    assert gauge("esms_backlog_pending", "shopb") == 0
    assert gauge("esms_backlog_oldest_pending_age_seconds", "shopb") == 0
    # Ticks 2..10 leave the gauges alone (one aggregate per 10 s, whichever process runs it).
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET state = 'sent' WHERE ref_id = 'bl-1'"))
        conn.execute(text("UPDATE scheduler_heartbeat SET ticks = 2"))
    metrics.refresh_backlog(engine, settings)
    assert gauge("esms_backlog_pending", "default") == 3
    with engine.begin() as conn:
        conn.execute(text("UPDATE scheduler_heartbeat SET ticks = 11"))
    metrics.refresh_backlog(engine, settings)
    assert gauge("esms_backlog_pending", "default") == 2


@pytest.mark.parametrize(
    ("error", "result"),
    [
        (None, "100"),
        (RateLimited("Code 160", code=160), "160"),
        (RateLimited("HTTP 429"), "rate_limited"),
        (ProviderUnavailable("timeout (ReadTimeout)"), "provider_unavailable"),
        (MalformedResponse("HTTP 200, body is not JSON"), "malformed_response"),
    ],
)
def test_the_result_label_is_the_code_or_the_error_kind(error, result):
    assert metrics.request_result(error) == result
