"""The push receiver as a real process on a real socket, writing to the real test database.

`python -m worker.receiver` runs once for the module; each test empties the tables (fixture
`engine`) and talks HTTP to it over loopback. Then the push grace at the scheduler, and the whole
daemon end to end: the emulator pushing 90 % of the messages to the receiver while celery worker
and beat poll what the pushes missed.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.integration.test_e2e import COMPARED, expected_row
from tests.processes import (
    BIN,
    Child,
    Children,
    celery,
    child_env,
    free_port,
    start_emulator,
    wait_for,
)
from worker import scheduler, store
from worker.records import CallbackRecord

pytestmark = pytest.mark.integration

TOKEN = "it-push-token-Xq7Lm2Rv9Tz4Wb8N"
OA = "1090257973118325189"
ZALO_124 = '{"error":-124,"message":"Access token is invalid"}'


@dataclass
class Receiver:
    child: Child
    url: str
    metrics_url: str

    def push_url(self, token: str = TOKEN) -> str:
        return f"{self.url}/esms/callback/{token}"

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=10).text


def start_receiver(
    children: Children,
    database_url: str,
    token: str | None = TOKEN,
    ready_timeout: float = 30,
    port: int | None = None,
    workers: int | None = None,
) -> Receiver:
    """`python -m worker.receiver` on loopback (a free port unless given, and a free metrics
    port), ready to answer."""
    port = port or free_port()
    metrics_port = free_port()
    env = child_env(
        DATABASE_URL=database_url,
        RECEIVER_HOST="127.0.0.1",
        RECEIVER_PORT=str(port),
        RECEIVER_METRICS_PORT=str(metrics_port),
    )
    if token is not None:
        env["PUSH_TOKEN"] = token
    argv = [str(BIN / "python"), "-m", "worker.receiver"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    child = children.spawn(f"receiver-{port}", argv, env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"receiver exited: {child.log()}")
        if re.search(r"listening on", child.log()):
            # Answering is ready; 503 only says the database is away (test_database_down_is_503).
            assert httpx.get(f"{url}/healthz", timeout=5).status_code in (200, 503)
            return Receiver(child, url, f"http://127.0.0.1:{metrics_port}/metrics")
        time.sleep(0.05)
    raise RuntimeError(f"receiver not ready: {child.log()}")


@pytest.fixture(scope="module")
def receiver(database_url, tmp_path_factory) -> Receiver:
    children = Children(Path(tmp_path_factory.mktemp("receiver")))
    try:
        yield start_receiver(children, database_url)
    finally:
        children.stop_all()


def insert(engine, *ref_ids: str, created_ago_s: float = 0) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, created_at) "
                "VALUES (:ref_id, :oa_id, now() - make_interval(secs => :ago))"
            ),
            [{"ref_id": ref_id, "oa_id": OA, "ago": created_ago_s} for ref_id in ref_ids],
        )


def row(engine, ref_id: str) -> dict:
    with engine.begin() as conn:
        found = conn.execute(text("SELECT * FROM messages WHERE ref_id = :r"), {"r": ref_id})
        return dict(found.mappings().one())


def history(engine, ref_id: str) -> list[dict]:
    with engine.begin() as conn:
        found = conn.execute(
            text("SELECT * FROM message_history WHERE ref_id = :r ORDER BY id"), {"r": ref_id}
        )
        return [dict(entry) for entry in found.mappings()]


def final_push(ref_id: str, error_info: str = "", **changes: str) -> dict[str, str]:
    """A final, failed push as eSMS sends it: every value a string, names in its mixed case."""
    return {
        "SMSID": ref_id,
        "SendFailed": "1",
        "SendStatus": "5",
        "SendSuccess": "0",
        "TotalPrice": "0.0",
        "TotalReceiver": "1",
        "TotalSent": "1",
        "RequestId": "req-7f3a",
        "TypeId": "25",
        "telcoid": "1",
        "phonenumber": "0912345678",
        "partnerids": "f3a9c0d1e2b4a5968778",
        "error_info": error_info,
        "oaid": OA,
        "tempid": "254871",
        **changes,
    }


ENCODINGS = {
    "dotnet": (ZALO_124 + "Object reference not set to an instance of an object.", -124),
    "json": (ZALO_124, -124),
    "quoted": (json.dumps(ZALO_124), -124),
    "urlencoded_twice": (quote(quote(ZALO_124, safe=""), safe=""), -124),
    "dated": (ZALO_124 + "____05/03/2025 14:07:31", -124),
    "text": ("Access token không hợp lệ + thử lại", None),
    "empty": ("", None),
    "blank": ("  ", None),
}


@pytest.mark.parametrize("form", sorted(ENCODINGS))
def test_get_push_stores_error_info_verbatim_in_every_encoding(engine, receiver, form):
    error_info, code = ENCODINGS[form]
    insert(engine, f"m-{form}")
    response = httpx.get(receiver.push_url(), params=final_push(f"m-{form}", error_info))
    assert response.status_code == 200, response.text
    stored = row(engine, f"m-{form}")
    # Verbatim, but an empty or blank value is no value: NULL, as GetCallback's null is.
    assert stored["error_info"] == (error_info if error_info.strip() else None)
    assert stored["error_code"] == code
    assert stored["state"] == "failed" and stored["resolved_at"] is not None
    assert stored["next_poll_at"] is None


def test_numbers_as_strings_become_numbers_and_history_says_push(engine, receiver):
    insert(engine, "m-num")
    push = final_push("m-num", SendSuccess="1", SendFailed="0", TotalPrice="385.5")
    assert httpx.get(receiver.push_url(), params=push).status_code == 200
    stored = row(engine, "m-num")
    assert stored["state"] == "sent"
    assert (stored["send_status"], stored["send_success"], stored["send_failed"]) == (5, 1, 0)
    assert (stored["type_id"], stored["telco_id"], stored["total_receiver"]) == (25, 1, 1)
    assert stored["total_price"] == Decimal("385.5")
    assert stored["request_id"] == "req-7f3a" and stored["zns_temp_id"] == "254871"
    assert stored["phone_number"] == "0912345678"
    assert stored["partner_ids"] == "f3a9c0d1e2b4a5968778"
    # The push is the call to the CallbackUrl: that URL, without the query, is the CallbackUrl.
    assert stored["callback_url"] == receiver.push_url()
    (entry,) = history(engine, "m-num")
    assert entry["source"] == "push" and entry["batch_id"] is None
    assert (entry["old_state"], entry["new_state"]) == ("pending", "sent")
    assert (entry["old_send_status"], entry["new_send_status"]) == (None, 5)


def test_post_json_and_post_form(engine, receiver):
    insert(engine, "m-json", "m-form")
    as_json = {
        "SMSID": "m-json",
        "SendStatus": 5,
        "SendSuccess": 1,
        "SendFailed": 0,
        "TotalPrice": 220.0,
        "TypeId": 24,
        "Telcoid": 2,
        "ErrorInfo": ZALO_124,
        "RequestId": None,
    }
    assert httpx.post(receiver.push_url(), json=as_json).status_code == 200
    stored = row(engine, "m-json")
    assert stored["state"] == "sent" and stored["total_price"] == Decimal("220.0")
    assert (stored["type_id"], stored["telco_id"], stored["error_code"]) == (24, 2, -124)
    assert stored["request_id"] is None

    form = final_push("m-form", quote(ZALO_124, safe=""))
    assert httpx.post(receiver.push_url(), data=form).status_code == 200
    stored = row(engine, "m-form")
    assert stored["state"] == "failed"
    assert stored["error_info"] == quote(ZALO_124, safe="")
    assert stored["error_code"] == -124


def test_healthz_is_ok_while_the_database_answers(engine, receiver):
    response = httpx.get(f"{receiver.url}/healthz", timeout=10)
    assert (response.status_code, response.text) == (200, "ok")


def test_resolutions_by_push_are_counted_by_state(engine, receiver):
    insert(engine, "m-sent", "m-failed", "m-rejected", "m-waiting")
    before = receiver.stats()
    for push in (
        final_push("m-sent", SendSuccess="1", SendFailed="0"),
        final_push("m-failed"),
        final_push("m-rejected", SendStatus="4"),
        final_push("m-waiting", SendStatus="2"),
        final_push("m-sent", SendSuccess="1", SendFailed="0"),  # a duplicate resolves nothing
    ):
        assert httpx.get(receiver.push_url(), params=push).status_code == 200
    after = receiver.stats()
    assert {
        state: after[f"resolved_{state}"] - before[f"resolved_{state}"]
        for state in ("sent", "failed", "rejected")
    } == {"sent": 1, "failed": 1, "rejected": 1}
    assert after["changed"] - before["changed"] == 4


def test_unknown_smsid_is_200_and_counted(engine, receiver):
    before = receiver.stats()
    response = httpx.get(receiver.push_url(), params=final_push("never-inserted"))
    assert response.status_code == 200
    after = receiver.stats()
    assert after["unknown"] == before["unknown"] + 1
    assert after["accepted"] == before["accepted"]


def test_wrong_token_and_other_paths_are_404_and_counted(engine, receiver):
    insert(engine, "m-token")
    before = receiver.stats()
    push = final_push("m-token")
    for url in (
        receiver.push_url("wrong-token-Xq7Lm2Rv9Tz4Wb8N"),
        receiver.push_url(TOKEN[:-1]),
        receiver.push_url(TOKEN + "x"),
        receiver.push_url(TOKEN) + "/",
        f"{receiver.url}/esms/callback/",
        f"{receiver.url}/esms/callback",
        f"{receiver.url}/",
    ):
        assert httpx.get(url, params=push).status_code == 404, url
    assert httpx.put(receiver.push_url(), params=push).status_code == 404
    after = receiver.stats()
    assert after["bad_token"] == before["bad_token"] + 3
    assert after["not_found"] == before["not_found"] + 5
    assert row(engine, "m-token")["state"] == "pending"
    assert history(engine, "m-token") == []


def test_malformed_pushes_are_400_with_a_reason(engine, receiver):
    insert(engine, "m-bad")
    before = receiver.stats()
    json_type = {"content-type": "application/json"}
    cases = [
        (httpx.get, {"params": {"SendStatus": "5"}}, "SMSID"),
        (httpx.get, {"params": {"SMSID": "  ", "SendStatus": "5"}}, "SMSID"),
        (httpx.get, {"params": {"SMSID": "m-bad"}}, "SendStatus"),
        (httpx.get, {"params": {"SMSID": "m-bad", "SendStatus": "five"}}, "SendStatus"),
        (httpx.post, {"content": b"{not json", "headers": json_type}, "JSON"),
        (httpx.post, {"json": [{"SMSID": "m-bad", "SendStatus": 5}]}, "object"),
        (httpx.post, {"content": b"x" * 70_000}, "larger"),
    ]  # fmt: skip
    for send, options, reason in cases:
        response = send(receiver.push_url(), **options)
        assert response.status_code == 400, (options, response.text)
        assert reason in response.text
    assert receiver.stats()["malformed"] == before["malformed"] + len(cases)
    assert row(engine, "m-bad")["state"] == "pending"


def test_forward_only_an_older_push_after_the_final_one_changes_nothing(engine, receiver):
    insert(engine, "m-order")
    final = final_push("m-order", ZALO_124)
    waiting = {**final, "SendStatus": "2", "SendFailed": "0", "TotalSent": "0", "error_info": ""}
    at_carrier = {**waiting, "SendStatus": "7", "TotalSent": "1"}
    assert httpx.get(receiver.push_url(), params=waiting).status_code == 200
    assert row(engine, "m-order")["send_status"] == 2
    assert httpx.get(receiver.push_url(), params=final).status_code == 200
    before = row(engine, "m-order")
    assert before["state"] == "failed"
    for late in (at_carrier, waiting, final):
        assert httpx.get(receiver.push_url(), params=late).status_code == 200
    assert row(engine, "m-order") == before
    assert [(h["source"], h["new_send_status"]) for h in history(engine, "m-order")] == [
        ("push", 2),
        ("push", 5),
    ]


def test_database_down_is_503(tmp_path):
    children = Children(tmp_path)
    try:
        closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
        down = start_receiver(children, closed)
        response = httpx.get(down.push_url(), params=final_push("m-down"), timeout=30)
        assert response.status_code == 503
        assert down.stats()["db_unavailable"] == 1
        health = httpx.get(f"{down.url}/healthz", timeout=10)
        assert (health.status_code, health.text) == (503, "database unavailable: OperationalError")
        assert TOKEN not in down.child.log()
    finally:
        children.stop_all()


def test_no_token_configured_refuses_every_push(tmp_path, database_url):
    children = Children(tmp_path)
    try:
        tokenless = start_receiver(children, database_url, token=None)
        assert httpx.get(tokenless.push_url(), params=final_push("m")).status_code == 404
        assert httpx.get(f"{tokenless.url}/esms/callback/None").status_code == 404
    finally:
        children.stop_all()


# --- the grace before the first poll ----------------------------------------------------------


def test_push_grace_delays_the_first_poll_and_the_poll_takes_what_is_left(engine, make_settings):
    settings = make_settings(
        poll_interval_seconds=1, poll_max_interval_seconds=2, push_grace_seconds=30
    )
    insert(engine, "old-pending", "old-pushed", created_ago_s=40)
    insert(engine, "new-pending", "new-pushed")
    records = [
        CallbackRecord(ref_id=ref, send_status=5, send_success=1, send_failed=0)
        for ref in ("old-pushed", "new-pushed")
    ]
    with engine.begin() as conn:
        assert store.merge_callbacks(conn, records, source="push").changed == 2

    queued: list[store.Batch] = []
    report = scheduler.schedule_tick(engine, settings, queued.extend)
    assert report.initialized == 2  # the two still pending; pushed rows are final already
    assert {ref for batch in queued for ref in batch.ref_ids} == {"old-pending"}
    with engine.begin() as conn:
        waits = dict(
            conn.execute(
                text(
                    "SELECT ref_id, extract(epoch FROM next_poll_at - created_at) FROM messages "
                    "WHERE ref_id IN ('new-pending', 'new-pushed')"
                )
            ).all()
        )
    assert float(waits["new-pending"]) == pytest.approx(30)
    assert waits["new-pushed"] is None


def test_without_grace_the_first_poll_waits_the_poll_interval(engine, make_settings):
    settings = make_settings(poll_interval_seconds=7, poll_max_interval_seconds=60)
    insert(engine, "plain")
    scheduler.schedule_tick(engine, settings, lambda batches: None)
    with engine.begin() as conn:
        gap = conn.execute(
            text("SELECT extract(epoch FROM next_poll_at - created_at) FROM messages")
        ).scalar()
    assert float(gap) == pytest.approx(7)


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_pushes_resolve_most_messages_and_polls_reconcile_the_rest(
    engine, database_url, redis_url, children
):
    receiver = start_receiver(children, database_url)
    emulator = start_emulator(
        children,
        "--account",
        f"{TEST_API_KEY}:{TEST_SECRET_KEY}",
        "--final-after-min-s",
        "0.5",
        "--final-after-max-s",
        "3",
        "--latency-min-ms",
        "20",
        "--latency-max-ms",
        "60",
        "--push-url",
        receiver.push_url(),
        "--push-rate",
        "0.9",
    )
    count = 600
    ref_ids = [f"{uuid.uuid4().hex}{i % 100:02d}" for i in range(count)]
    oas = [OA, "2020202020202020202", "3030303030303030303"]
    rows = [{"ref_id": ref, "oa_id": oas[i % 3]} for i, ref in enumerate(ref_ids)]
    # The sender inserts its rows, then the provider starts telling their story.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"), rows)
    emulator.admin("POST", "/messages", json={"messages": rows})

    env = child_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        ESMS_BASE_URL=emulator.url,
        ESMS_API_KEY=TEST_API_KEY,
        ESMS_SECRET_KEY=TEST_SECRET_KEY,
        POLL_INTERVAL_SECONDS="1",
        POLL_MAX_INTERVAL_SECONDS="2",
        PUSH_GRACE_SECONDS="6",
    )
    celery(children, "worker", env)
    celery(children, "beat", env)

    def pending() -> int:
        with engine.begin() as conn:
            return conn.execute(
                text("SELECT count(*) FROM messages WHERE state = 'pending'")
            ).scalar()

    wait_for(lambda: pending() == 0, timeout=90, message="every message final")
    wait_for(
        lambda: emulator.admin("GET", "/stats")["pushes"]["in_flight"] == 0,
        timeout=30,
        interval=0.1,
        message="the last push answered",
    )

    truth = emulator.admin("GET", "/truth")["messages"]
    with engine.begin() as conn:
        stored = {r["ref_id"]: r for r in conn.execute(text("SELECT * FROM messages")).mappings()}
        final_source = dict(
            conn.execute(
                text(
                    "SELECT ref_id, source FROM message_history "
                    "WHERE new_state <> 'pending' AND old_state = 'pending'"
                )
            ).all()
        )
    wrong = []
    for ref_id in ref_ids:
        fact, got = truth[ref_id], stored[ref_id]
        actual = {column: got[column] for column in COMPARED}
        if (
            got["state"] != fact["state"]
            or actual != expected_row(fact)
            or got["error_code"] != fact["error_code"]
        ):
            wrong.append((ref_id, got["state"], fact["state"], actual, expected_row(fact)))
    assert wrong == []

    pushed = {ref for ref in ref_ids if truth[ref]["pushed"]}
    assert 0.8 * count < len(pushed) < 0.97 * count
    assert all(p["http_status"] == 200 for ref in pushed for p in truth[ref]["pushes"]), (
        "every push answered 200"
    )
    by_push = {ref for ref in ref_ids if final_source[ref] == "push"}
    assert by_push == pushed
    assert {final_source[ref] for ref in set(ref_ids) - pushed} == {"poll"}

    log = emulator.admin("GET", "/requests")["requests"]
    read = [ref for entry in log for ref in entry["refids"]]
    assert len(read) <= 2 * (count - len(pushed)), "the poller read about what the push missed"
    assert len(log) * 20 <= count, f"{len(log)} GetCallback requests for {count} RefIds"
    assert receiver.stats()["changed"] >= len(pushed)


# --- whatever a caller sends, never a 500 ---------------------------------------------------------

_FIELD_NAMES = [
    "SMSID", "smsid", "SendStatus", "sendstatus", "SendSuccess", "SendFailed", "TotalPrice",
    "TotalReceiver", "TotalSent", "RequestId", "TypeId", "telcoid", "phonenumber", "partnerids",
    "error_info", "oaid", "tempid", "CallbackUrl", "x",
]  # fmt: skip
# Values that reach every parser: huge and non-finite numbers, NUL bytes, lone surrogates as
# percent-encoded UTF-8 errors, long text, JSON fragments, empty strings. (Eight long values stay
# under httpx's own 64 KiB limit on a URL, so the request is always sent.)
_ODD_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", "5", "5.0", "-0", "1e999999999", "NaN", "Infinity", "99999999999999999999",
         "0x10", " 5 ", "\x00", "null", "{", '{"error":-124}', "%", "%ZZ", "%00", "%C3%28",
         "a" * 5_000]
    ),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)  # fmt: skip
_QUERY = st.lists(st.tuples(st.sampled_from(_FIELD_NAMES), _ODD_VALUES), max_size=8)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE"]),
    query=_QUERY,
    body_kind=st.sampled_from(["none", "json", "form", "raw"]),
    raw=st.binary(max_size=200),
    known=st.booleans(),
)
# The longest request line the strategy can make: every value long (a 40 KB URL).
@example(method="GET", query=[("SMSID", "a" * 5_000)] * 8, body_kind="none", raw=b"", known=False)
def test_nothing_a_caller_sends_raises_a_500(
    engine, receiver, method, query, body_kind, raw, known
):
    ref_id = "fuzz-known"
    if known:
        query = [("SMSID", ref_id), *query]
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO messages (ref_id, oa_id) VALUES (:r, :o) ON CONFLICT DO NOTHING"),
                {"r": ref_id, "o": OA},
            )
    path_query = "&".join(f"{quote(k)}={quote(v, safe='%')}" for k, v in query)
    url = f"{receiver.push_url()}?{path_query}"
    fields = dict(query)
    kwargs: dict = {}
    if body_kind == "json":
        kwargs["json"] = fields
    elif body_kind == "form":
        kwargs["data"] = fields
    elif body_kind == "raw":
        kwargs["content"] = raw
        kwargs["headers"] = {"content-type": "application/json"}
    response = httpx.request(method, url, timeout=30, **kwargs)
    assert response.status_code in {200, 400, 404, 405, 413}, (response.status_code, response.text)
