"""Unit tests of the eSMS emulator: provider semantics, message truth, faults and the admin API.

The app runs in-process (httpx over ASGI, lifespan included) with a fake clock, so message lives and
rate windows are exercised by moving time rather than sleeping.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette

from worker.emulator import EmulatorConfig, create_app
from worker.emulator.__main__ import build_parser, config_from_args
from worker.emulator.config import ConfigError, parse_account
from worker.emulator.ratelimit import SlidingWindowLimiter, max_in_window
from worker.emulator.truth import (
    ITEM_FIELDS,
    NUMERIC_FIELDS,
    ErrorForm,
    Outcome,
    TruthKnobs,
    decide,
    item_at,
    state_at,
)

T0 = 1_700_000_000.0
SECRET = "s3cr3t-never-shown"


class FakeClock:
    """A settable stand-in for time.time."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Client:
    """A synchronous client for the app in-process, with its lifespan, on one event loop."""

    def __init__(self, app: Starlette) -> None:
        self._runner = asyncio.Runner()
        self._lifespan = app.router.lifespan_context(app)
        self._runner.run(self._lifespan.__aenter__())
        transport = httpx.ASGITransport(app=app)
        self._http = httpx.AsyncClient(transport=transport, base_url="http://emulator")

    def get(self, url: str) -> httpx.Response:
        return self._runner.run(self._http.get(url))

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self._runner.run(self._http.post(url, **kwargs))

    def close(self) -> None:
        self._runner.run(self._http.aclose())
        self._runner.run(self._lifespan.__aexit__(None, None, None))
        self._runner.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(clock: FakeClock) -> Iterator[Any]:
    clients: list[Client] = []

    def make(**settings: Any) -> Client:
        settings.setdefault("clock", clock)
        clients.append(Client(create_app(EmulatorConfig(**settings))))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def poll(
    client: Client,
    refids: list[str],
    oa: str = "oa-1",
    key: str = "demo-key",
    secret: str = "demo-secret",
) -> Any:
    body = {"ApiKey": key, "SecretKey": secret, "ListRefid": refids, "OAId": oa}
    return client.post("/ZaloCallback/GetCallback", json=body)


def register(client: Client, refids: list[str], oa: str = "oa-1", **extra: Any) -> Any:
    messages = [{"ref_id": ref, "oa_id": oa, **extra} for ref in refids]
    response = client.post("/_emulator/messages", json={"messages": messages})
    assert response.status_code == 200, response.text
    return response.json()


def log_entries(client: Client, since: int = 0) -> list[dict[str, Any]]:
    return client.get(f"/_emulator/requests?since={since}").json()["requests"]


def read_error_code(text: str) -> int | None:
    """What a tolerant parser reads from ErrorInfo: unquote, URL-decode, then a leading code."""
    for _ in range(3):
        match = re.match(r'\{"error":(-?\d+)', text)
        if match:
            return int(match.group(1))
        if text.startswith('"'):
            text = json.loads(text)
        elif text.startswith("%"):
            text = unquote(text)
        else:
            return None
    return None


# --- the provider endpoint -------------------------------------------------------------------


def test_healthz(make_client: Any) -> None:
    response = make_client().get("/healthz")
    assert response.status_code == 200
    assert response.text == "ok"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"ApiKey": "demo-key", "SecretKey": "demo-secret", "ListRefid": []}',
        b'{"ApiKey": "demo-key", "SecretKey": "demo-secret", "ListRefid": "r1", "OAId": "o"}',
        b'{"ApiKey": 5, "SecretKey": "demo-secret", "ListRefid": [], "OAId": "o"}',
    ],
)
def test_malformed_body_is_http_400_code_99(make_client: Any, body: bytes) -> None:
    client = make_client()
    response = client.post("/ZaloCallback/GetCallback", content=body)
    assert response.status_code == 400
    assert response.json()["Code"] == 99
    assert log_entries(client)[-1]["http_status"] == 400


@pytest.mark.parametrize(("key", "secret"), [("demo-key", "wrong"), ("nobody", "demo-secret")])
def test_wrong_credentials_answer_101(make_client: Any, key: str, secret: str) -> None:
    response = poll(make_client(), ["r1"], key=key, secret=secret)
    assert response.status_code == 200
    assert response.json() == {"Code": 101, "Message": "Authorize Failed"}


@pytest.mark.parametrize(
    ("key", "oa", "code"),
    [
        ("a", "OA1", 100),
        ("a", "OA2", 100),
        ("a", "OA3", 799),  # another account's OA
        ("a", "OA9", 204),  # nobody's OA
        ("a", "", 204),
        ("c", "OA3", 100),  # an account without an OA list accepts any OA
        ("c", "", 204),
    ],
)
def test_oa_checks(make_client: Any, key: str, oa: str, code: int) -> None:
    accounts = tuple(parse_account(spec) for spec in ("a:sa:OA1,OA2", "b:sb:OA3", "c:sc"))
    client = make_client(accounts=accounts)
    response = poll(client, ["r1"], oa=oa, key=key, secret="s" + key)
    assert response.json()["Code"] == code


def test_success_item_has_the_documented_fields_and_types(make_client: Any) -> None:
    client = make_client(final_after_min_s=0, final_after_max_s=0)
    response = poll(client, [f"r{i}" for i in range(50)])
    body = response.json()
    assert (body["Code"], body["Message"]) == (100, "Success")
    assert response.headers["content-type"].startswith("application/json")
    for item in body["Data_callback"]:
        assert tuple(item) == ITEM_FIELDS
        for name in NUMERIC_FIELDS:
            assert isinstance(item[name], float if name == "TotalPrice" else int)
        assert item["RequestId"] is None or isinstance(item["RequestId"], str)
        assert item["OAId"] == "oa-1"
    # Prices are sent as JSON numbers with a decimal point, like the provider's 0.0.
    assert re.search(r'"TotalPrice": \d+\.\d', response.text)


def test_only_the_first_max_refids_are_read(make_client: Any) -> None:
    client = make_client(final_after_min_s=0, final_after_max_s=0)
    refids = [f"r{i:03d}" for i in range(250)]
    items = poll(client, refids).json()["Data_callback"]
    assert [item["SMSID"] for item in items] == refids[:200]
    entry = log_entries(client)[-1]
    assert (entry["n_refids"], entry["n_read"], entry["n_items"]) == (250, 200, 200)
    assert entry["refids"] == refids[:200]
    assert sorted(client.get("/_emulator/truth").json()["messages"]) == refids[:200]


def test_max_refids_is_a_knob(make_client: Any) -> None:
    client = make_client(max_refids=3)
    items = poll(client, ["a", "b", "c", "d"]).json()["Data_callback"]
    assert [item["SMSID"] for item in items] == ["a", "b", "c"]


def test_repeated_refid_in_one_request_gives_one_item(make_client: Any) -> None:
    items = poll(make_client(), ["a", "a", "b"]).json()["Data_callback"]
    assert [item["SMSID"] for item in items] == ["a", "b"]


def test_refids_of_another_oa_or_account_are_omitted(make_client: Any) -> None:
    accounts = tuple(parse_account(spec) for spec in ("k1:s1", "k2:s2"))
    client = make_client(accounts=accounts)
    register(client, ["mine"], oa="oa-1", api_key="k1")
    register(client, ["other-oa"], oa="oa-2")
    register(client, ["any-key"], oa="oa-1")
    refids = ["mine", "other-oa", "any-key"]
    seen_by_k1 = poll(client, refids, key="k1", secret="s1").json()["Data_callback"]
    seen_by_k2 = poll(client, refids, key="k2", secret="s2").json()["Data_callback"]
    assert [item["SMSID"] for item in seen_by_k1] == ["mine", "any-key"]
    assert [item["SMSID"] for item in seen_by_k2] == ["any-key"]


def test_without_auto_register_unknown_refids_are_omitted(make_client: Any) -> None:
    client = make_client(auto_register=False)
    register(client, ["known"])
    items = poll(client, ["unknown", "known"]).json()["Data_callback"]
    assert [item["SMSID"] for item in items] == ["known"]
    assert list(client.get("/_emulator/truth").json()["messages"]) == ["known"]
    assert log_entries(client)[-1]["refids"] == ["unknown", "known"]


def test_not_found_code_answers_105_for_unknown_or_not_yet_visible(
    make_client: Any, clock: FakeClock
) -> None:
    client = make_client(auto_register=False, not_found_code=True, visible_after_s=2.0)
    register(client, ["known"])
    clock.advance(3.0)
    register(client, ["young"])
    assert poll(client, ["known"]).json()["Code"] == 100
    # One RefId it cannot find spoils the whole request, as a strict provider may do.
    assert poll(client, ["known", "unknown"]).json() == {"Code": 105, "Message": "SMSID not found"}
    assert poll(client, ["known", "young"]).json()["Code"] == 105
    clock.advance(2.5)
    assert [item["SMSID"] for item in poll(client, ["known", "young"]).json()["Data_callback"]] == [
        "known",
        "young",
    ]
    assert log_entries(client)[1]["fault_detail"] == "not found: 1"


# --- the rate limit ----------------------------------------------------------------------------


def test_21st_request_within_one_second_is_refused_with_160(
    make_client: Any, clock: FakeClock
) -> None:
    client = make_client()
    codes = []
    for _ in range(20):
        codes.append(poll(client, ["r"]).json()["Code"])
        clock.advance(0.01)
    assert codes == [100] * 20
    clock.t = T0 + 0.5
    assert poll(client, ["r"]).json() == {"Code": 160, "Message": "TPS limit exceeded"}
    clock.t = T0 + 0.999
    assert poll(client, ["r"]).json()["Code"] == 160
    # The window is (t - 1 s, t]: the first request, at exactly T0, has left it.
    clock.t = T0 + 1.0
    assert poll(client, ["r"]).json()["Code"] == 100
    # Refused requests took no place in the window: the next slot frees at T0 + 0.01.
    clock.t = T0 + 1.01
    assert poll(client, ["r"]).json()["Code"] == 100

    entries = log_entries(client)
    assert [e["over_limit"] for e in entries] == [False] * 20 + [True, True, False, False]
    assert all(e["fault"] is None for e in entries)
    key_stats = client.get("/_emulator/stats").json()["per_api_key"]["demo-key"]
    assert key_stats["requests"] == 24
    assert key_stats["admitted"] == 22
    assert key_stats["over_limit"] == 2
    assert key_stats["max_admitted_in_window"] == 20
    assert key_stats["max_in_window"] == 22
    assert (key_stats["first_t"], key_stats["last_t"]) == (T0, T0 + 1.01)


def test_rate_limit_is_per_api_key_and_ignores_failed_credentials(make_client: Any) -> None:
    accounts = tuple(parse_account(spec) for spec in ("k1:s1", "k2:s2"))
    client = make_client(accounts=accounts)
    for _ in range(30):
        assert poll(client, ["r"], key="k1", secret="bad").json()["Code"] == 101
    assert [poll(client, ["r"], key="k1", secret="s1").json()["Code"] for _ in range(21)] == [
        100
    ] * 20 + [160]
    assert poll(client, ["r"], key="k2", secret="s2").json()["Code"] == 100


def test_rate_limit_can_change_at_runtime(make_client: Any) -> None:
    client = make_client()
    client.post("/_emulator/config", json={"rate_limit": 2})
    assert [poll(client, ["r"]).json()["Code"] for _ in range(3)] == [100, 100, 160]


@given(
    gaps=st.lists(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 1.0]), max_size=120),
    limit=st.integers(1, 6),
)
def test_limiter_is_exact_and_greedy(gaps: list[float], limit: int) -> None:
    limiter = SlidingWindowLimiter()
    t = T0
    admitted: list[float] = []
    for gap in gaps:
        t += gap
        window_count = sum(1 for a in admitted if a > t - 1.0)
        accepted = limiter.admit("k", t, limit, 1.0)
        # Refused exactly when the window already holds `limit` admitted requests.
        assert accepted == (window_count < limit)
        if accepted:
            admitted.append(t)
    assert max_in_window(admitted, 1.0) <= limit


def test_a_stricter_provider_counts_what_it_refuses() -> None:
    # 18 per second, refused requests counted: a client sending 20 per second for two seconds
    # is refused more and more, because each refusal keeps the window full.
    limiter = SlidingWindowLimiter()
    lenient = SlidingWindowLimiter()
    times = [T0 + i * 0.05 for i in range(40)]
    strict = [limiter.admit("k", t, 18, 1.0, count_refused=True) for t in times]
    plain = [lenient.admit("k", t, 18, 1.0) for t in times]
    assert strict[:18] == plain[:18] == [True] * 18
    assert sum(strict) == 18 < sum(plain)
    # Once it slows down below the limit, the window drains and it is admitted again.
    assert limiter.admit("k", times[-1] + 1.01, 18, 1.0, count_refused=True)


def test_max_in_window_counts_half_open_windows() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    assert max_in_window([0.0, 0.5, 0.999, 1.0, 1.4], 1.0) == 4


# --- message truth ------------------------------------------------------------------------------


def test_truth_is_deterministic_across_processes() -> None:
    knobs = TruthKnobs(seed=42)
    refs = ["4a496110-9fd3-4838-ac8b-bcaa36616f7011", "r1", "r2", "r3"]
    here = [decide(ref, "oa", None, T0, knobs).final_item for ref in refs]
    script = (
        "import json, sys\n"
        "from worker.emulator.truth import TruthKnobs, decide\n"
        f"refs = {refs!r}\n"
        f"print(json.dumps([decide(r, 'oa', None, {T0!r}, TruthKnobs(seed=42)).final_item "
        "for r in refs]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here
    other_seed = [decide(ref, "oa", None, T0, TruthKnobs(seed=43)).final_item for ref in refs]
    assert other_seed != here


def test_each_oa_sends_from_its_own_few_templates() -> None:
    def templates(oa: str, per_oa: int) -> set[str]:
        knobs = TruthKnobs(seed=7, templates_per_oa=per_oa)
        return {
            decide(f"ref-{i}", oa, None, T0, knobs).final_item["ZnsTempId"] for i in range(2000)
        }

    assert len(templates("oa-1", 20)) == 20
    assert len(templates("oa-1", 3)) == 3
    assert templates("oa-1", 20) != templates("oa-2", 20)
    assert len(templates("oa-1", 0)) > 1900  # the old world: any of 100,000 for every message


def test_message_life_moves_forward_over_time(make_client: Any, clock: FakeClock) -> None:
    client = make_client(visible_after_s=1.0, final_after_min_s=3.0, final_after_max_s=5.0)
    refids = [f"r{i}" for i in range(60)]
    register(client, refids)
    truth = client.get("/_emulator/truth").json()["messages"]
    assert {m["state"] for m in truth.values()} == {"pending"}

    assert poll(client, refids).json()["Data_callback"] == []  # not visible yet
    seen: dict[str, list[int]] = {ref: [] for ref in refids}
    for _ in range(50):
        clock.advance(0.1)
        for item in poll(client, refids).json()["Data_callback"]:
            seen[item["SMSID"]].append(item["SendStatus"])
    clock.t = T0 + 5.0
    final_items = {i["SMSID"]: i for i in poll(client, refids).json()["Data_callback"]}

    truth = client.get("/_emulator/truth").json()["messages"]
    rank = {2: 0, 7: 1, 4: 2, 5: 2}
    for ref in refids:
        statuses = seen[ref]
        assert statuses[0] == 2
        assert [rank[s] for s in statuses] == sorted(rank[s] for s in statuses)
        assert final_items[ref] == truth[ref]["item"]
        assert truth[ref]["state"] == truth[ref]["final_state"]
        assert T0 + 3.0 <= truth[ref]["final_at"] <= T0 + 5.0
    assert any(7 in statuses for statuses in seen.values())


def test_final_items_follow_the_poller_state_rule() -> None:
    knobs = TruthKnobs(seed=3, rejected_rate=0.1)
    messages = [decide(f"ref-{i}", "oa", None, T0, knobs) for i in range(3000)]
    outcomes = Counter(m.outcome for m in messages)
    assert 0.80 < outcomes[Outcome.SENT] / 3000 < 0.90
    assert 0.07 < outcomes[Outcome.REJECTED] / 3000 < 0.13
    for message in messages:
        item = message.final_item
        assert item is not None
        if item["SendStatus"] == 5:
            rule = "sent" if item["SendSuccess"] >= 1 else "failed"
        else:
            assert item["SendStatus"] == 4
            rule = "rejected"
        assert rule == message.outcome.value
        assert state_at(message, message.final_at) == rule
        assert state_at(message, message.final_at - 0.001) == "pending"
        assert item_at(message, message.final_at) is item
        assert re.fullmatch(r"0[35789]\d{8}", item["PhoneNumber"])
        if item["SendStatus"] == 5:
            assert re.fullmatch(r"[0-9a-f]{20}", item["Partnerids"])
        if rule == "sent":
            assert item["TotalPrice"] in (220.0, 300.0, 385.5, 440.0)
            assert (item["SendSuccess"], item["SendFailed"], item["TotalSent"]) == (1, 0, 1)
        else:
            assert item["TotalPrice"] == 0.0
    assert {m.final_item["Telcoid"] for m in messages} == {1, 2, 3, 4, 5, 6, 7, 9}
    assert {m.final_item["TypeId"] for m in messages} == {24, 25, 26}
    assert {m.final_item["RequestId"] is None for m in messages} == {True, False}


def test_every_error_info_form_appears_and_carries_its_code() -> None:
    knobs = TruthKnobs(success_rate=0.0, rejected_rate=0.0)
    failures = [decide(f"f{i}", "oa", None, T0, knobs) for i in range(1500)]
    assert {m.error_form for m in failures} == set(ErrorForm)
    for message in failures:
        assert message.final_item is not None
        text = message.final_item["ErrorInfo"]
        assert read_error_code(text) == message.error_code
        if message.error_form in (ErrorForm.TEXT, ErrorForm.EMPTY):
            assert message.error_code is None
        else:
            assert message.error_code in (-100, -108, -114, -118, -124, -137)
    sample = next(
        m for m in failures if m.error_form is ErrorForm.DOTNET and m.error_code == -124
    ).final_item
    assert sample is not None
    assert sample["ErrorInfo"] == (
        '{"error":-124,"message":"Access token is invalid"}'
        "Object reference not set to an instance of an object."
    )
    dated = next(m for m in failures if m.error_form is ErrorForm.DATED).final_item
    assert dated is not None
    assert re.search(r"____\d{2}/\d{2}/\d{4} \d{2}:\d{2}:\d{2}$", dated["ErrorInfo"])
    texts = {m.final_item["ErrorInfo"] for m in failures if m.error_form is ErrorForm.TEXT}
    assert "Số điện thoại không hợp lệ" in texts


def test_success_error_info_is_zalo_success_or_empty() -> None:
    knobs = TruthKnobs(success_rate=1.0)
    infos = {decide(f"s{i}", "oa", None, T0, knobs).final_item["ErrorInfo"] for i in range(200)}
    assert infos == {'{"error":0,"message":"Success"}', ""}


def test_no_callback_messages_never_have_data(make_client: Any, clock: FakeClock) -> None:
    client = make_client(no_callback_rate=1.0, final_after_min_s=0, final_after_max_s=0)
    assert poll(client, ["a", "b"]).json()["Data_callback"] == []
    clock.advance(100)
    assert poll(client, ["a", "b"]).json()["Data_callback"] == []
    truth = client.get("/_emulator/truth").json()["messages"]
    assert truth["a"]["state"] == "no_callback"
    assert truth["a"]["item"] is None
    assert truth["a"]["final_at"] is None


def test_knob_changes_apply_to_later_registrations_only(make_client: Any) -> None:
    client = make_client(success_rate=1.0, final_after_min_s=0, final_after_max_s=0)
    register(client, [f"early{i}" for i in range(20)])
    client.post("/_emulator/config", json={"success_rate": 0.0, "rejected_rate": 0.0})
    register(client, [f"late{i}" for i in range(20)])
    truth = client.get("/_emulator/truth").json()["messages"]
    assert {truth[f"early{i}"]["final_state"] for i in range(20)} == {"sent"}
    assert {truth[f"late{i}"]["final_state"] for i in range(20)} == {"failed"}


# --- faults --------------------------------------------------------------------------------------


def test_5xx_fault(make_client: Any) -> None:
    client = make_client(fault_5xx_rate=1.0, rate_limit=1000)
    statuses = {poll(client, ["r"]).status_code for _ in range(30)}
    assert statuses == {500, 502, 503}
    entries = log_entries(client)
    assert {e["fault"] for e in entries} == {"5xx"}
    assert all(e["fault_detail"] == str(e["http_status"]) and e["code"] is None for e in entries)


def test_broken_body_fault(make_client: Any) -> None:
    client = make_client(fault_broken_body_rate=1.0, rate_limit=1000)
    for _ in range(40):
        response = poll(client, ["r"])
        assert response.status_code == 200
        try:
            body = response.json()
        except ValueError:
            continue  # truncated JSON or an HTML page
        assert body["Code"] == 100
        assert body.get("Data_callback") is None
    entries = log_entries(client)
    assert {e["fault"] for e in entries} == {"broken_body"}
    assert {e["fault_detail"] for e in entries} == {
        "truncated",
        "html",
        "null_data",
        "missing_data",
    }


def test_code_fault(make_client: Any) -> None:
    client = make_client(fault_code_rate=1.0, fault_codes=(105,))
    assert poll(client, ["r"]).json() == {"Code": 105, "Message": "SMSID not found"}
    entry = log_entries(client)[-1]
    assert (entry["fault"], entry["code"], entry["over_limit"]) == ("code", 105, False)


def test_slow_fault_sleeps_before_a_normal_answer(make_client: Any) -> None:
    client = make_client(fault_slow_rate=1.0, slow_seconds=0.3)
    started = time.monotonic()
    response = poll(client, ["r"])
    assert time.monotonic() - started >= 0.3
    assert response.json()["Code"] == 100
    entry = log_entries(client)[-1]
    assert (entry["fault"], entry["delay_ms"]) == ("slow", 300.0)


def test_latency_is_applied_and_logged(make_client: Any) -> None:
    client = make_client(latency_min_ms=50, latency_max_ms=60)
    started = time.monotonic()
    poll(client, ["r"])
    assert time.monotonic() - started >= 0.05
    assert 50 <= log_entries(client)[-1]["delay_ms"] <= 60


def test_stale_fault_shows_waiting_status_for_final_messages(make_client: Any) -> None:
    client = make_client(fault_stale_rate=1.0, final_after_min_s=0, final_after_max_s=0)
    items = poll(client, ["a", "b", "c"]).json()["Data_callback"]
    assert [(i["SMSID"], i["SendStatus"]) for i in items] == [("a", 2), ("b", 2), ("c", 2)]
    entry = log_entries(client)[-1]
    assert (entry["fault"], entry["fault_detail"]) == ("stale", "stale=3")
    truth = client.get("/_emulator/truth").json()["messages"]
    assert {truth[ref]["item"]["SendStatus"] for ref in "abc"} <= {4, 5}


def test_duplicate_fault_adds_an_older_twin(make_client: Any) -> None:
    client = make_client(fault_duplicate_rate=1.0, final_after_min_s=0, final_after_max_s=0)
    refids = [f"r{i}" for i in range(40)]
    items = poll(client, refids).json()["Data_callback"]
    assert len(items) == 80
    by_ref: dict[str, list[int]] = {}
    for item in items:
        by_ref.setdefault(item["SMSID"], []).append(item["SendStatus"])
    assert all(len(statuses) == 2 and 2 in statuses for statuses in by_ref.values())
    assert {statuses.index(2) for statuses in by_ref.values()} == {0, 1}  # before and after
    assert log_entries(client)[-1]["fault"] == "duplicate"


def test_numbers_as_strings(make_client: Any) -> None:
    client = make_client(numbers_as_strings_rate=1.0, final_after_min_s=0, final_after_max_s=0)
    items = poll(client, [f"r{i}" for i in range(20)]).json()["Data_callback"]
    for item in items:
        assert all(isinstance(item[name], str) for name in NUMERIC_FIELDS)
        assert re.fullmatch(r"\d+\.\d+", item["TotalPrice"])
        assert item["SendStatus"] in ("4", "5")
    assert log_entries(client)[-1]["numbers_as_strings"] is True


def test_request_fault_rates_must_fit_in_one(make_client: Any) -> None:
    client = make_client()
    response = client.post(
        "/_emulator/config", json={"fault_5xx_rate": 0.6, "fault_code_rate": 0.6}
    )
    assert response.status_code == 400
    assert client.get("/_emulator/config").json()["fault_5xx_rate"] == 0.0


# --- request log, stats and admin API ---------------------------------------------------------


def test_secret_key_is_never_logged_or_returned(make_client: Any, tmp_path: Path) -> None:
    log_path = tmp_path / "requests.jsonl"
    accounts = (parse_account(f"key-1:{SECRET}"),)
    client = make_client(accounts=accounts, request_log_path=str(log_path))
    poll(client, ["r1"], key="key-1", secret=SECRET)
    poll(client, ["r1"], key="key-1", secret=SECRET + "-wrong")
    client.post("/ZaloCallback/GetCallback", json={"ApiKey": "key-1", "SecretKey": SECRET})
    for path in (
        "/_emulator/requests",
        "/_emulator/stats",
        "/_emulator/config",
        "/_emulator/truth",
    ):
        text = client.get(path).text
        assert SECRET not in text
    assert len(log_path.read_text().splitlines()) == 3
    assert SECRET not in log_path.read_text()
    assert [e["api_key"] for e in log_entries(client)] == ["key-1"] * 3


def test_request_log_entries(make_client: Any, clock: FakeClock) -> None:
    client = make_client()
    poll(client, ["a", "b"])
    clock.advance(0.25)
    poll(client, ["c"], secret="bad")
    data = client.get("/_emulator/requests").json()
    assert data["next"] == 2
    first, second = data["requests"]
    assert first == {
        "seq": 0,
        "t": T0,
        "api_key": "demo-key",
        "oa_id": "oa-1",
        "n_refids": 2,
        "n_read": 2,
        "n_items": 2,
        "refids": ["a", "b"],
        "code": 100,
        "http_status": 200,
        "admitted": True,
        "over_limit": False,
        "fault": None,
        "fault_detail": None,
        "numbers_as_strings": False,
        "delay_ms": 0.0,
    }
    assert (second["seq"], second["t"], second["code"], second["admitted"]) == (
        1,
        T0 + 0.25,
        101,
        False,
    )
    later = client.get("/_emulator/requests?since=1&refids=0").json()
    assert [e["seq"] for e in later["requests"]] == [1]
    assert "refids" not in later["requests"][0]
    assert client.get("/_emulator/requests?since=0&limit=1").json()["next"] == 1
    assert client.get("/_emulator/requests?since=x").status_code == 400


def test_stats_totals(make_client: Any) -> None:
    client = make_client(rate_limit=1)
    poll(client, ["a"])
    poll(client, ["a"])
    poll(client, ["a"], secret="bad")
    client.post("/ZaloCallback/GetCallback", content=b"{")
    stats = client.get("/_emulator/stats").json()
    assert stats["requests"] == 4
    assert stats["by_code"] == {"100": 1, "101": 1, "160": 1, "99": 1}
    assert stats["by_http_status"] == {"200": 3, "400": 1}
    assert stats["over_limit"] == 1
    assert stats["messages"] == 1
    assert stats["window_s"] == 1.0
    assert set(stats["per_api_key"]) == {"demo-key"}


def test_register_is_idempotent_and_keeps_the_first_time(
    make_client: Any, clock: FakeClock
) -> None:
    client = make_client()
    assert register(client, ["a", "b"]) == {"registered": 2, "known": 0, "total": 2}
    clock.advance(30)
    assert register(client, ["b", "c"]) == {"registered": 1, "known": 1, "total": 3}
    truth = client.get("/_emulator/truth").json()
    assert truth["now"] == T0 + 30
    messages = truth["messages"]
    assert messages["b"]["registered_at"] == T0
    assert messages["c"]["registered_at"] == T0 + 30
    assert set(messages["a"]) == {
        "oa_id",
        "api_key",
        "registered_at",
        "visible_at",
        "carrier_at",
        "final_at",
        "state",
        "final_state",
        "item",
        "error_code",
        "error_form",
    }


@pytest.mark.parametrize(
    "payload",
    [{}, {"messages": "x"}, {"messages": [{"ref_id": "a"}]}, {"messages": [{"ref_id": 1}]}],
)
def test_register_rejects_bad_payloads(make_client: Any, payload: dict[str, Any]) -> None:
    response = make_client().post("/_emulator/messages", json=payload)
    assert response.status_code == 400
    assert "error" in response.json()


def test_register_ten_thousand_quickly(make_client: Any) -> None:
    client = make_client()
    messages = [{"ref_id": f"bulk-{i}", "oa_id": "oa-1"} for i in range(10_000)]
    started = time.monotonic()
    response = client.post("/_emulator/messages", json={"messages": messages})
    assert time.monotonic() - started < 2.0
    assert response.json()["registered"] == 10_000


def test_config_roundtrip(make_client: Any) -> None:
    client = make_client()
    knobs = client.get("/_emulator/config").json()
    assert knobs["rate_limit"] == 20
    assert knobs["max_refids"] == 200
    assert knobs["fault_codes"] == [99, 105, 160]
    assert client.post("/_emulator/config", json=knobs).json() == knobs
    changed = client.post("/_emulator/config", json={"latency_max_ms": 5, "fault_codes": [160]})
    assert changed.json()["latency_max_ms"] == 5.0
    assert changed.json()["fault_codes"] == [160]
    for bad in ({"nope": 1}, {"rate_limit": "x"}, {"success_rate": 2}, {"auto_register": 1}):
        assert client.post("/_emulator/config", json=bad).status_code == 400
    assert client.post("/_emulator/config", content=b"[1]").status_code == 400


def test_reset_clears_messages_log_and_windows(make_client: Any) -> None:
    client = make_client(rate_limit=1)
    poll(client, ["a"])
    assert poll(client, ["a"]).json()["Code"] == 160
    assert client.post("/_emulator/reset").json() == {"ok": True}
    assert client.get("/_emulator/truth").json()["messages"] == {}
    assert client.get("/_emulator/requests").json() == {"requests": [], "next": 0}
    assert poll(client, ["a"]).json()["Code"] == 100


# --- configuration and command line ----------------------------------------------------------


def test_parse_account() -> None:
    assert parse_account("k:s").oa_ids is None
    assert parse_account("k:s:OA1,OA2").oa_ids == frozenset({"OA1", "OA2"})
    for bad in ("k", "k:", ":s", "k:s:", "k:s:a:b"):
        with pytest.raises(ConfigError):
            parse_account(bad)


def test_cli_flags_build_the_config() -> None:
    args = build_parser().parse_args(
        [
            "--account",
            "k1:s1:OA1",
            "--account",
            "k2:s2",
            "--latency-min-ms",
            "250",
            "--latency-max-ms",
            "600",
            "--no-auto-register",
            "--fault-codes",
            "99,160",
            "--seed",
            "7",
            "--request-log",
            "/tmp/x.jsonl",
        ]
    )
    config = config_from_args(args)
    assert [a.api_key for a in config.accounts] == ["k1", "k2"]
    assert (config.latency_min_ms, config.latency_max_ms) == (250.0, 600.0)
    assert config.auto_register is False
    assert config.fault_codes == (99, 160)
    assert config.seed == 7
    assert config.request_log_path == "/tmp/x.jsonl"
    assert config.rate_limit == 20  # untouched knobs keep their defaults
    defaults = config_from_args(build_parser().parse_args([]))
    assert [(a.api_key, a.oa_ids) for a in defaults.accounts] == [("demo-key", None)]


def test_cli_rejects_inconsistent_knobs() -> None:
    args = build_parser().parse_args(["--latency-min-ms", "10", "--latency-max-ms", "5"])
    with pytest.raises(ConfigError):
        config_from_args(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--account", "only-a-key"])
