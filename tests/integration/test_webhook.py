"""The final-status webhook (worker.webhook) against a real HTTP server: signed bodies, the
cursor moved only after a 2xx, a backoff after a failure; and end to end, a receiver that is
down for the first 30 s of a run still gets every final message, while polling goes on."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.integration.test_e2e import daemon_env
from tests.processes import celery, free_port, start_emulator, wait_for
from tests.samples import SAMPLE_OA_ID, SAMPLE_RECORD
from worker import store, webhook

pytestmark = pytest.mark.integration

SECRET = "webhook-test-secret-Qw3rTy"
SENT = dataclasses.replace(SAMPLE_RECORD, send_success=1, send_failed=0, error_info=None)


class Sink:
    """An HTTP server that records every POST (headers and body) and answers `status`."""

    def __init__(self, port: int = 0, status: int = 204) -> None:
        self.posts: list[tuple[dict, bytes]] = []
        self.status = status
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.posts.append((dict(self.headers), body))
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/esms"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verified_events(self) -> list[dict]:
        """Every event of every POST, each POST's signature checked as a receiver would."""
        found = []
        for headers, body in self.posts:
            stamp = headers[webhook.TIMESTAMP_HEADER]
            expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
            assert hmac.compare_digest(
                headers[webhook.SIGNATURE_HEADER], f"sha256={expected.hexdigest()}"
            )
            found.extend(json.loads(body)["events"])
        return found


def test_a_signature_covers_timestamp_and_body():
    good = webhook.signature(b"k", "100", b'{"events":[]}')
    assert good == "sha256=" + hmac.new(b"k", b'100.{"events":[]}', hashlib.sha256).hexdigest()
    assert webhook.signature(b"k", "101", b'{"events":[]}') != good
    assert webhook.signature(b"k", "100", b'{"events":[1]}') != good
    assert webhook.signature(b"other", "100", b'{"events":[]}') != good


def test_events_are_posted_once_accepted_and_retried_after_a_backoff(
    engine, make_settings, redis_url
):
    refs = [f"wh-{i}" for i in range(5)]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id) VALUES (:r, :o)"),
            [{"r": r, "o": SAMPLE_OA_ID} for r in refs],
        )
        store.merge_callbacks(conn, [dataclasses.replace(SENT, ref_id=r) for r in refs])
    sink = Sink(status=503)
    client = httpx.Client()
    broker = redis.Redis.from_url(redis_url)
    settings = make_settings(
        final_webhook_url=sink.url, final_webhook_secret=SECRET, final_webhook_batch_size=2
    )
    try:
        failed = webhook.deliver(engine, client, broker, settings)
        assert (failed.delivered, failed.posts, failed.stopped) == (0, 1, "failed")
        with engine.connect() as conn:
            assert store.cursor_of(conn, webhook.CURSOR_NAME) == (0, 0)
        # During the backoff nothing is posted.
        assert webhook.deliver(engine, client, broker, settings).stopped == "backing_off"
        assert len(sink.posts) == 1
        sink.status = 200
        time.sleep(webhook.FIRST_BACKOFF_SECONDS + 0.1)
        done = webhook.deliver(engine, client, broker, settings)
        assert (done.delivered, done.posts, done.stopped) == (5, 3, "caught_up")
        received = sink.verified_events()
        # The refused POST's two events come again: at least once.
        assert [e["ref_id"] for e in received] == refs[:2] + refs
        assert {e["state"] for e in received} == {"sent"}
        assert webhook.deliver(engine, client, broker, settings).delivered == 0
        with engine.connect() as conn:
            cursor = store.cursor_of(conn, webhook.CURSOR_NAME)
        assert f"{cursor[0]}-{cursor[1]}" == received[-1]["cursor"]
        # Without a URL the task does nothing.
        assert webhook.deliver(engine, client, broker, make_settings()).stopped == "disabled"
    finally:
        sink.close()
        client.close()
        broker.close()


def test_a_secret_is_required_with_a_url(make_settings):
    with pytest.raises(ValueError, match="FINAL_WEBHOOK_SECRET"):
        make_settings(final_webhook_url="http://127.0.0.1:9/x")


@pytest.mark.e2e
def test_a_receiver_down_for_30s_still_gets_every_final_message(
    engine, database_url, redis_url, children
):
    emulator = start_emulator(
        children,
        "--account", f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s", "1",
        "--final-after-max-s", "8",
        "--success-rate", "0.7",
        "--rejected-rate", "0.1",
    )  # fmt: skip
    oas = ["1090257973118325189", "2020202020202020202"]
    rows = [{"ref_id": f"wh{uuid.uuid4().hex}", "oa_id": oas[i % 2]} for i in range(1200)]
    emulator.admin("POST", "/messages", json={"messages": rows})
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), rows)
    port = free_port()
    env = daemon_env(
        database_url,
        redis_url,
        emulator.url,
        FINAL_WEBHOOK_URL=f"http://127.0.0.1:{port}/hooks/esms",
        FINAL_WEBHOOK_SECRET=SECRET,
        FINAL_WEBHOOK_MAX_BACKOFF_SECONDS="4",
    )
    worker = celery(children, "worker", env)
    celery(children, "beat", env)
    started = time.monotonic()

    def pending() -> int:
        with engine.begin() as conn:
            return conn.execute(
                text("SELECT count(*) FROM messages WHERE state = 'pending'")
            ).scalar()

    # Polling does not wait for the webhook: everything is final while its receiver is down.
    wait_for(lambda: pending() == 0, timeout=28, message="every message final")
    resolved_after = time.monotonic() - started
    time.sleep(max(0.0, 30 - (time.monotonic() - started)))
    sink = Sink(port=port)
    try:
        with engine.begin() as conn:
            query = text("SELECT ref_id, state FROM message_events")
            finals = {tuple(row) for row in conn.execute(query)}
        assert len(finals) == len(rows)
        wait_for(
            lambda: {(e["ref_id"], e["state"]) for e in sink.verified_events()} >= finals,
            timeout=60,
            message="every final message posted",
        )
        came_after = time.monotonic() - started
    finally:
        sink.close()
    received = sink.verified_events()
    assert {(e["ref_id"], e["state"]) for e in received} == finals
    log = worker.log()
    assert "webhook: POST of" in log and "unreachable" in log
    assert SECRET not in log
    print(
        f"\nwebhook: {len(finals)} messages final {resolved_after:.1f} s after start with the "
        f"receiver down; receiver up at 30 s, every event received by {came_after:.1f} s, "
        f"{len(sink.posts)} POSTs, {len(received) - len(finals)} events received twice"
    )
