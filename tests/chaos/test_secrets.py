"""Secrets never leave the process that needs them: a full poll cycle at DEBUG, grepped.

Worker and beat run at `--loglevel=DEBUG` next to Flower; the database URL carries a real password
(a role made for this test), the broker URL another (a private Redis with `requirepass`), and the
account has its own ApiKey and SecretKey. The provider fails some requests, so error paths log
too. Afterwards every log line, every command the broker received (task messages and events,
their base64 bodies decoded) and Flower's API answers are searched for each secret.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.chaos.audit import count_pending, daemon_env, insert_messages, new_messages
from tests.chaos.conftest import OAS
from tests.conftest import PG_ADMIN_URL
from tests.processes import BIN, celery, free_port, start_private_redis, wait_for
from worker.localservices import redis_cli_program

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

API_KEY = f"chaos-api-{uuid.uuid4().hex[:12]}"
SECRET_KEY = f"chaos-secret-{uuid.uuid4().hex}"
DB_PASSWORD = f"chaos-db-{uuid.uuid4().hex}"
REDIS_PASSWORD = f"chaos-redis-{uuid.uuid4().hex}"
FLOWER_AUTH = ("operator", f"flower-{uuid.uuid4().hex[:8]}")
SECRETS = {
    "SecretKey": SECRET_KEY,
    "ApiKey": API_KEY,
    "database password": DB_PASSWORD,
    "Redis password": REDIS_PASSWORD,
}
# A kombu message as the broker stores it: JSON whose "body" is base64 (quotes escaped by
# MONITOR's output).
BODY = re.compile(r'\\?"body\\?": \\?"([A-Za-z0-9+/=]+)\\?"')


@pytest.fixture
def role_url(database_url):
    """The session database as a role with a password, dropped again at the end."""
    role = f"esms_chaos_{uuid.uuid4().hex[:8]}"
    url = make_url(database_url)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}'")
        admin.execute(f'GRANT CONNECT ON DATABASE "{url.database}" TO {role}')
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
        conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
    yield url.set(username=role, password=DB_PASSWORD).render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {role} NOLOGIN")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        conn.execute(f"DROP OWNED BY {role}")
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"DROP ROLE {role}")


def leaks(where: str, text: str) -> list[str]:
    """`where: secret name` for every secret in `text`, or in a base64 body inside it."""
    decoded = []
    for body in BODY.findall(text):
        try:
            decoded.append(base64.b64decode(body).decode("utf-8", "replace"))
        except (binascii.Error, ValueError):
            continue
    haystack = "\n".join([text, *decoded])
    return [f"{where}: {name}" for name, secret in SECRETS.items() if secret in haystack]


def test_no_secret_in_logs_broker_or_flower(engine, role_url, children, emulator_with):
    emulator = emulator_with(
        "--latency-min-ms", "20", "--latency-max-ms", "100",
        "--fault-5xx-rate", "0.1", "--fault-broken-body-rate", "0.1", "--fault-code-rate", "0.1",
        accounts=(f"{API_KEY}:{SECRET_KEY}",),
    )  # fmt: skip
    redis_server = start_private_redis(children, "--requirepass", REDIS_PASSWORD)
    port = redis_server.port
    cli = redis_cli_program()
    monitor = children.spawn(
        "redis-monitor",
        [cli, "-p", str(port), "-a", REDIS_PASSWORD, "--no-auth-warning", "monitor"],
        {"PATH": str(BIN) + ":/usr/bin:/bin"},
    )
    wait_for(lambda: "OK" in monitor.log(), timeout=20, message="MONITOR attached")
    rows = new_messages(300, OAS)
    insert_messages(engine, emulator, rows)
    env = daemon_env(
        role_url, redis_server.url(password=REDIS_PASSWORD), emulator.url,
        ESMS_API_KEY=API_KEY, ESMS_SECRET_KEY=SECRET_KEY,
    )  # fmt: skip

    flower_port = free_port()
    flower = children.spawn(
        "flower",
        [str(BIN / "celery"), "-A", "worker", "flower", f"--port={flower_port}",
         "--address=127.0.0.1", "--logging=debug"],
        dict(env, FLOWER_BASIC_AUTH=":".join(FLOWER_AUTH)),
    )  # fmt: skip
    worker = celery(children, "worker", env)
    beat = celery(children, "beat", env)

    wait_for(lambda: count_pending(engine) == 0, timeout=90, message="every message final")
    flower_api = f"http://127.0.0.1:{flower_port}/api"

    def flower_get(path: str, **params) -> str:
        try:
            response = httpx.get(f"{flower_api}{path}", params=params, auth=FLOWER_AUTH, timeout=30)
        except httpx.HTTPError:
            return ""
        return response.text if response.status_code == 200 else ""

    tasks = wait_for(
        lambda: (text := flower_get("/tasks")) and "esms.poll_batch" in text and text,
        timeout=60, message="poll tasks in Flower",
    )  # fmt: skip
    workers = flower_get("/workers", refresh=1)
    assert workers, "Flower did not list the workers"
    failures = [line for line in worker.log().splitlines() if "request failed" in line]
    assert failures, "no error path was exercised"

    # The search finds a secret hidden in a broker body, as MONITOR prints it.
    hidden = base64.b64encode(SECRET_KEY.encode()).decode()
    assert leaks("control", f'"{{\\"body\\": \\"{hidden}\\"}}"') == ["control: SecretKey"]
    found = []
    for child in (worker, beat, flower, monitor):
        found += leaks(child.name, child.log())
    found += leaks("Flower /api/tasks", tasks) + leaks("Flower /api/workers", workers)
    assert found == []
    # The audit looked where the secrets would be: task messages did pass through the broker.
    assert '"LPUSH" "esms"' in monitor.log()
