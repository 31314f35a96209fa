"""Flower, as an operator runs it: real `celery flower` behind basic auth, a real worker and beat,
real Redis and the emulator. Flower's HTTP API must list the worker and show the poll tasks with
their readable arguments (account, OAId, batch size) and nothing secret.
"""

from __future__ import annotations

import ast
import uuid

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.integration.test_e2e import daemon_env
from tests.processes import BIN, celery, free_port, start_emulator, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

AUTH = ("operator", "flower-test-password")


def test_flower_shows_the_worker_and_the_poll_tasks(engine, database_url, redis_url, children):
    emulator = start_emulator(
        children,
        "--account",
        f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        # Pending long enough that polls keep coming while Flower watches.
        "--final-after-min-s",
        "20",
        "--final-after-max-s",
        "40",
    )
    oas = ["1090257973118325189", "2020202020202020202"]
    rows = [{"ref_id": uuid.uuid4().hex, "oa_id": oas[i % 2]} for i in range(60)]
    emulator.admin("POST", "/messages", json={"messages": rows})
    env = daemon_env(database_url, redis_url, emulator.url, METRICS_PORT="0")

    port = free_port()
    flower_env = dict(env, FLOWER_BASIC_AUTH=":".join(AUTH))
    flower = children.spawn(
        "flower",
        [str(BIN / "celery"), "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"],
        flower_env,
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str, **params) -> httpx.Response | None:
        try:
            return httpx.get(f"{base}{path}", params=params, auth=AUTH, timeout=15)
        except httpx.HTTPError:
            return None

    wait_for(lambda: get("/api/tasks"), timeout=60, message=f"Flower up: {flower.log()}")
    assert httpx.get(f"{base}/api/workers", timeout=15).status_code == 401

    node = f"flowertest-{uuid.uuid4().hex[:8]}@127.0.0.1"
    celery(children, "worker", env, "-n", node)
    celery(children, "beat", env)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), rows)

    def our_polls() -> list[dict] | None:
        response = get("/api/tasks", taskname="esms.poll_batch")
        if response is None or response.status_code != 200:
            return None
        tasks = [task for task in response.json().values() if task.get("worker") == node]
        return tasks or None

    tasks = wait_for(our_polls, timeout=90, message="esms.poll_batch tasks in Flower")
    for task in tasks:
        assert task["name"] == "esms.poll_batch"
        kwargs = ast.literal_eval(task["kwargs"])
        assert set(kwargs) == {"batch_id", "account", "oa_id", "size", "kind"}
        assert kwargs["account"] == "default" and kwargs["oa_id"] in oas
        assert 1 <= kwargs["size"] <= 200
        assert task["args"] in ("()", "[]")

    def worker_listed() -> dict | None:
        response = get("/api/workers", refresh="1")
        if response is None or response.status_code != 200 or node not in response.json():
            return None
        return response.json()

    workers = wait_for(worker_listed, timeout=60, message=f"{node} in /api/workers")
    assert "esms.poll_batch" in workers[node]["registered"]

    for response in (get("/api/workers"), get("/api/tasks")):
        assert response is not None and response.status_code == 200
        assert TEST_API_KEY not in response.text and TEST_SECRET_KEY not in response.text
