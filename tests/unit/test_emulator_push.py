"""Unit tests of the emulator's push: which messages are pushed, when, in what format, and how
a push that gets no answer is sent again. Deliveries go to a small HTTP server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from worker.emulator import EmulatorConfig, create_app, push
from worker.emulator.__main__ import build_parser, config_from_args
from worker.emulator.config import ConfigError
from worker.emulator.push import (
    PUSH_FIELDS,
    NoAnswer,
    PushClient,
    Pusher,
    push_query,
    status_changes,
)
from worker.emulator.registry import Registry
from worker.emulator.truth import ErrorForm, Outcome, TruthKnobs, decide, item_at
from worker.records import parse_callback_item

T0 = 1_700_000_000.0
PUSH_URL = "http://127.0.0.1:9/esms/callback/tok"
DOCUMENTED_NAMES = [
    "SMSID", "SendFailed", "SendStatus", "SendSuccess", "TotalPrice", "TotalReceiver",
    "TotalSent", "RequestId", "TypeId", "telcoid", "phonenumber", "partnerids", "error_info",
    "oaid", "tempid",
]  # fmt: skip


def knobs(**changes: Any) -> TruthKnobs:
    return TruthKnobs(**{"push_url": PUSH_URL, "push_rate": 1.0, **changes})


def test_the_pushed_fraction_and_their_callback_url():
    lives = [decide(f"ref-{i}", "oa", None, T0, knobs(push_rate=0.9)) for i in range(3000)]
    pushed = [life for life in lives if life.pushed]
    assert 0.87 < len(pushed) / len(lives) < 0.93
    assert {life.final_item["CallbackUrl"] for life in pushed} == {PUSH_URL}
    assert PUSH_URL not in {life.final_item["CallbackUrl"] for life in lives if not life.pushed}


def test_push_knobs_change_nothing_else_about_a_message():
    for i in range(200):
        plain = decide(f"ref-{i}", "oa", None, T0, TruthKnobs())
        pushed = decide(f"ref-{i}", "oa", None, T0, knobs())
        assert not plain.pushed and pushed.pushed == (plain.outcome is not Outcome.NO_CALLBACK)
        if plain.final_item is not None:
            assert {**pushed.final_item, "CallbackUrl": None} == {
                **plain.final_item,
                "CallbackUrl": None,
            }
        assert (plain.final_at, plain.carrier_at) == (pushed.final_at, pushed.carrier_at)


def test_no_url_or_no_callback_means_no_push():
    assert not decide("r", "oa", None, T0, knobs(push_url=None)).pushed
    assert not decide("r", "oa", None, T0, knobs(no_callback_rate=1.0)).pushed


def test_status_changes_follow_the_life():
    lives = [decide(f"ref-{i}", "oa", None, T0, knobs()) for i in range(300)]
    with_carrier = next(life for life in lives if life.carrier_at is not None)
    assert status_changes(with_carrier) == [
        (with_carrier.visible_at, 2),
        (with_carrier.carrier_at, 7),
        (with_carrier.final_at, 5),
    ]
    rejected = next(life for life in lives if life.outcome is Outcome.REJECTED)
    assert [status for _, status in status_changes(rejected)] == [2, 4]
    instant = decide("r", "oa", None, T0, knobs(final_after_min_s=0, final_after_max_s=0))
    assert status_changes(instant) == [(T0, 5)]
    late = decide("r", "oa", None, T0, knobs(visible_after_s=5, final_after_max_s=1))
    assert status_changes(late) == [(T0 + 5, 5)]
    assert status_changes(decide("r", "oa", None, T0, knobs(no_callback_rate=1.0))) == []


def test_push_query_uses_esms_names_and_case_and_round_trips_every_error_form():
    forms_seen = set()
    for i in range(400):
        life = decide(f"ref-{i}", "oa-7", None, T0, knobs(success_rate=0.3, rejected_rate=0.1))
        for at, status in status_changes(life):
            item = item_at(life, at)
            assert item["SendStatus"] == status
            query = push_query(item)
            pairs = parse_qsl(query, keep_blank_values=True)
            names = [name for name, _ in pairs]
            assert names == DOCUMENTED_NAMES  # every field, a null one empty
            if item["RequestId"] is None:
                assert ("RequestId", "") in pairs
            record = parse_callback_item(dict(pairs))
            assert record.ref_id == item["SMSID"]
            assert (record.send_status, record.send_success) == (status, item["SendSuccess"])
            # The push ends as the GetCallback item does, field by field (the CallbackUrl, which
            # a push does not carry, aside).
            polled = parse_callback_item({**item, "CallbackUrl": None})
            assert record == polled
        forms_seen.add(life.error_form)
    assert forms_seen >= set(ErrorForm)
    assert [name for _, name in PUSH_FIELDS] == DOCUMENTED_NAMES


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def test_pusher_schedules_each_change_and_hands_them_out_when_due():
    clock = FakeClock()
    config = EmulatorConfig(push_url=PUSH_URL, push_rate=1.0, clock=clock)
    registry = Registry()
    pusher = Pusher(config, registry)
    registry.on_new = pusher.message_registered
    for i in range(50):
        registry.register(f"ref-{i}", "oa", None, T0, config.truth_knobs())
    registry.register("ref-0", "oa", None, T0 + 100, config.truth_knobs())  # known: no new pushes
    expected = sorted(
        (at, ref_id, status)
        for ref_id in (f"ref-{i}" for i in range(50))
        for at, status in status_changes(registry.get(ref_id))
    )
    assert pusher.take_due(T0 - 1) == []
    handed = pusher.take_due(T0 + 5) + pusher.take_due(T0 + 11)
    assert sorted((d.changed_at, d.ref_id, d.send_status) for d in handed) == expected
    assert pusher.stats()["scheduled"] == 50 and pusher.stats()["waiting"] == 0
    assert all(pusher.describe(f"ref-{i}") for i in range(50))
    pusher.clear()
    assert pusher.describe("ref-1") == [] and pusher.stats()["scheduled"] == 0


def test_pusher_stays_idle_without_push():
    registry = Registry()
    pusher = Pusher(EmulatorConfig(push_rate=1.0), registry)
    registry.on_new = pusher.message_registered
    registry.register("r", "oa", None, T0, EmulatorConfig().truth_knobs())
    assert not pusher.enabled and pusher.take_due(T0 + 100) == []


def test_config_and_command_line():
    args = build_parser().parse_args(["--push-url", PUSH_URL, "--push-rate", "0.9"])
    config = config_from_args(args)
    assert (config.push_url, config.push_rate, config.push_timeout_s) == (PUSH_URL, 0.9, 5.0)
    assert config.truth_knobs().push_url == PUSH_URL
    assert EmulatorConfig(push_rate=0.5).truth_knobs().push_rate == 0.0
    with pytest.raises(ConfigError, match="push_url"):
        EmulatorConfig(push_url="ftp://x").validate()
    with pytest.raises(ConfigError, match="push_rate"):
        EmulatorConfig(push_url=PUSH_URL, push_rate=1.5).validate()
    with pytest.raises(ConfigError, match="push_timeout_s"):
        EmulatorConfig().update({"push_timeout_s": 0})


# --- deliveries over a real socket ------------------------------------------------------------


class Receiver:
    """A loopback HTTP server that records request targets. `drop(n)` hangs up on the next n
    requests without answering; `chunked` answers with a chunked body."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.to_drop = 0
        self.chunked = False
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/esms/callback/tok"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                if self.to_drop:
                    self.to_drop -= 1
                    break
                self.targets.append(line.decode().split(" ")[1])
                if self.chunked:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    writer.write(b"2\r\nOK\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def deliver_all(config_for: Callable[[str], EmulatorConfig], scenario) -> Any:
    """Run an emulator app (with its pusher) and a Receiver, then `scenario(app, receiver)`."""

    async def main() -> Any:
        receiver = Receiver()
        url = await receiver.start()
        app = create_app(config_for(url))
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://emu") as client:
                    return await scenario(client, receiver)
        finally:
            await receiver.stop()

    return asyncio.run(main())


async def settle(client: httpx.AsyncClient, timeout: float = 10) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        stats = (await client.get("/_emulator/stats")).json()["pushes"]
        if stats["waiting"] == 0 and stats["in_flight"] == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError("pushes did not settle")


def fast_config(**extra: Any) -> Callable[[str], EmulatorConfig]:
    def build(url: str) -> EmulatorConfig:
        values = {
            "push_url": url,
            "push_rate": 1.0,
            "final_after_min_s": 0.05,
            "final_after_max_s": 0.3,
            **extra,
        }
        return EmulatorConfig(**values)

    return build


def test_each_change_is_pushed_once_as_an_esms_get():
    async def scenario(client, receiver):
        refs = [{"ref_id": f"m{i}", "oa_id": "oa"} for i in range(30)]
        await client.post("/_emulator/messages", json={"messages": refs})
        stats = await settle(client)
        truth = (await client.get("/_emulator/truth")).json()["messages"]
        listing = (await client.get("/_emulator/pushes")).json()
        return stats, truth, listing, receiver

    stats, truth, listing, receiver = deliver_all(fast_config(), scenario)
    expected = sum(len(status_changes_of(fact)) for fact in truth.values())
    assert len(receiver.targets) == expected == stats["sent"] == stats["answered"]
    assert stats["by_http_status"] == {"200": expected} and stats["gave_up"] == 0
    assert receiver.connections < expected  # kept alive
    for target in receiver.targets:
        parts = urlsplit(target)
        assert parts.path == "/esms/callback/tok"
        assert [name for name, _ in parse_qsl(parts.query)][:3] == DOCUMENTED_NAMES[:3]
    for fact in truth.values():
        assert fact["pushed"] is True
        assert [p["send_status"] for p in fact["pushes"]] == status_changes_of(fact)
        final = fact["pushes"][-1]
        assert final["changed_at"] == fact["final_at"]
        assert final["sent_at"] >= final["changed_at"] and final["answered_at"] >= final["sent_at"]
        assert final["attempts"] == 1 and final["http_status"] == 200
    assert len(listing["pushes"]) == expected


def status_changes_of(fact: dict[str, Any]) -> list[int]:
    statuses = [2] if fact["visible_at"] < fact["final_at"] else []
    if fact["carrier_at"] is not None:
        statuses.append(7)
    return statuses + [fact["item"]["SendStatus"]]


def test_a_push_without_answer_is_sent_again_and_chunked_answers_are_read(monkeypatch):
    monkeypatch.setattr(push, "RETRY_DELAYS", (0.01,) * 5)

    async def scenario(client, receiver):
        receiver.to_drop = 3
        receiver.chunked = True
        await client.post("/_emulator/messages", json={"messages": [{"ref_id": "m", "oa_id": "o"}]})
        stats = await settle(client)
        return stats, (await client.get("/_emulator/truth")).json()["messages"]["m"]

    stats, fact = deliver_all(fast_config(final_after_min_s=0, final_after_max_s=0), scenario)
    (only,) = fact["pushes"]
    assert only["http_status"] == 200
    # The first try and up to three more on fresh connections; never more than 6 attempts.
    assert 2 <= only["attempts"] <= 4
    assert stats["answered"] == 1 and stats["gave_up"] == 0


def test_nobody_listening_means_five_retries_then_giving_up(monkeypatch):
    monkeypatch.setattr(push, "RETRY_DELAYS", (0.01,) * 5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    async def scenario(client, receiver):
        await client.post("/_emulator/messages", json={"messages": [{"ref_id": "m", "oa_id": "o"}]})
        stats = await settle(client)
        return stats, (await client.get("/_emulator/truth")).json()["messages"]["m"]

    def config(url: str) -> EmulatorConfig:
        return fast_config(final_after_min_s=0, final_after_max_s=0)(
            f"http://127.0.0.1:{closed}/esms/callback/tok"
        )

    stats, fact = deliver_all(config, scenario)
    (only,) = fact["pushes"]
    assert (only["attempts"], only["gave_up"], only["http_status"]) == (6, True, None)
    assert stats["gave_up"] == 1 and stats["attempts"] == 6


def test_client_times_out_on_a_silent_server():
    async def main() -> None:
        async def silent(reader, writer):
            await asyncio.sleep(5)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = PushClient(f"http://127.0.0.1:{port}/x")
        try:
            with pytest.raises(NoAnswer, match="TimeoutError"):
                await client.get(f"http://127.0.0.1:{port}/x?a=1", timeout=0.2)
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_truth_and_stats_say_nothing_of_pushes_when_push_is_off():
    async def main() -> dict[str, Any]:
        app = create_app(EmulatorConfig())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://emu") as client:
                await client.post(
                    "/_emulator/messages", json={"messages": [{"ref_id": "m", "oa_id": "o"}]}
                )
                truth = (await client.get("/_emulator/truth")).json()["messages"]["m"]
                stats = (await client.get("/_emulator/stats")).json()
                return {"truth": truth, "stats": stats}

    seen = asyncio.run(main())
    assert "pushed" not in seen["truth"] and "pushes" not in seen["stats"]
