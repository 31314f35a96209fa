"""Unit tests of the push receiver's HTTP surface, with the database write replaced by a fake.

The app runs in-process (httpx over ASGI, lifespan included); what reaches the write is checked
as typed records. The real write and the real socket are in tests/integration/test_receiver.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import httpx
import psycopg.errors
import pytest
from sqlalchemy.exc import DataError, OperationalError

from worker import receiver
from worker.receiver import (
    MAX_BODY_BYTES,
    WRITE_ATTEMPTS,
    MalformedPush,
    PushOutcome,
    PushWriter,
    Written,
    create_app,
    record_from_fields,
)
from worker.records import CallbackRecord
from worker.settings import Settings

TOKEN = "unit-push-token-9fK2mQ7xZ1"
PATH = f"/esms/callback/{TOKEN}"
CALLED = f"http://receiver.test{PATH}"


class FakeWrite:
    """Records each batch; SMSIDs starting with "unknown" have no row, "bad" breaks a batch."""

    def __init__(self, error: Exception | None = None) -> None:
        self.batches: list[list[CallbackRecord]] = []
        self.error = error
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, records: Sequence[CallbackRecord]) -> Written:
        self.batches.append(list(records))
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        if self.error is not None:
            raise self.error
        if any(record.ref_id.startswith("bad") for record in records):
            raise DataError("UPDATE messages ...", {}, ValueError("bad data"))
        outcomes = [
            PushOutcome.UNKNOWN if record.ref_id.startswith("unknown") else PushOutcome.ACCEPTED
            for record in records
        ]
        resolved: dict[str, int] = {}
        for record, outcome in zip(records, outcomes, strict=True):
            state = {4: "rejected", 5: "sent" if record.send_success else "failed"}.get(
                record.send_status or 0
            )
            if outcome is PushOutcome.ACCEPTED and state is not None:
                resolved[state] = resolved.get(state, 0) + 1
        return Written(outcomes, sum(o is PushOutcome.ACCEPTED for o in outcomes), resolved)

    @property
    def records(self) -> list[CallbackRecord]:
        return [record for batch in self.batches for record in batch]


def run(write: FakeWrite, scenario, token: str | None = TOKEN, ping=None) -> Any:
    """Run `scenario(client)` against an app using `write` (and `ping` for /healthz), on a fresh
    event loop."""
    settings = Settings(_env_file=None, push_token=token)
    app = create_app(settings, write, ping=ping)

    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as c:
            async with app.router.lifespan_context(app):
                return await scenario(c)

    return asyncio.run(main())


def push(**fields: str) -> dict[str, str]:
    return {"SMSID": "m1", "SendStatus": "5", "SendSuccess": "1", **fields}


def test_get_with_mixed_case_names_reaches_the_merge_as_a_typed_record():
    write = FakeWrite()
    query = {
        "SMSID": "4a496110-9fd3-4838-ac8b-bcaa36616f7011",
        "SendFailed": "0",
        "SendStatus": "5",
        "SendSuccess": "1",
        "TotalPrice": "385.5",
        "TotalReceiver": "1",
        "TotalSent": "1",
        "RequestId": "req-1",
        "TypeId": "25",
        "telcoid": "3",
        "phonenumber": "0912345678",
        "partnerids": "f3a9c0d1e2b4a5968778",
        "error_info": '{"error":0,"message":"Success"}',
        "oaid": "1090257973118325189",
        "tempid": "254871",
    }

    async def scenario(client):
        return await client.get(PATH, params=query)

    response = run(write, scenario)
    assert (response.status_code, response.text) == (200, "OK")
    assert write.records == [
        CallbackRecord(
            ref_id="4a496110-9fd3-4838-ac8b-bcaa36616f7011",
            send_status=5,
            send_success=1,
            send_failed=0,
            total_receiver=1,
            total_sent=1,
            type_id=25,
            telco_id=3,
            total_price=Decimal("385.5"),
            request_id="req-1",
            phone_number="0912345678",
            callback_url=CALLED,
            partner_ids="f3a9c0d1e2b4a5968778",
            error_info='{"error":0,"message":"Success"}',
            oa_id="1090257973118325189",
            zns_temp_id="254871",
        )
    ]
    assert write.records[0].error_code == 0


def test_error_info_is_decoded_once_only():
    write = FakeWrite()
    twice = "%257B%2522error%2522%253A-124%257D"  # the text "%7B%22error%22%3A-124%7D", encoded

    async def scenario(client):
        return await client.get(f"{PATH}?SMSID=m1&SendStatus=5&error_info={twice}&phonenumber=+84")

    assert run(write, scenario).status_code == 200
    (record,) = write.records
    assert record.error_info == "%7B%22error%22%3A-124%7D"
    assert record.error_code == -124
    assert record.phone_number == " 84"  # a query's "+" is a space, as in any form encoding


def test_post_json_and_form_and_query_fields_on_a_post():
    write = FakeWrite()

    async def scenario(client):
        return [
            await client.post(PATH, json={"SMSID": "j", "SendStatus": 4, "TotalPrice": 0.0}),
            await client.post(PATH, data={"SMSID": "f", "SendStatus": "7", "error_info": "a+b"}),
            await client.post(f"{PATH}?SMSID=q&SendStatus=2"),
            await client.post(
                PATH, content=b'{"SMSID": "t", "SendStatus": "5"}', headers={"content-type": ""}
            ),
        ]

    assert [r.status_code for r in run(write, scenario)] == [200, 200, 200, 200]
    got = {record.ref_id: record for record in write.records}
    assert (got["j"].send_status, got["j"].total_price) == (4, Decimal("0.0"))
    assert (got["f"].send_status, got["f"].error_info) == (7, "a+b")
    assert got["q"].send_status == 2
    assert got["t"].send_status == 5


@pytest.mark.parametrize(
    ("send", "reason"),
    [
        (lambda c: c.get(PATH, params={"SendStatus": "5"}), "SMSID is missing"),
        (lambda c: c.get(PATH, params={"SMSID": "", "SendStatus": "5"}), "SMSID is missing"),
        (lambda c: c.get(PATH, params={"SMSID": "m1"}), "SendStatus is missing"),
        (lambda c: c.get(PATH, params={"SMSID": "m1", "SendStatus": "1e99"}), "SendStatus"),
        (lambda c: c.post(PATH, content=b"{oops", headers=_JSON), "not valid JSON"),
        (lambda c: c.post(PATH, content=b"[" * 100_000 + b"]" * 100_000), "larger than"),
        (lambda c: c.post(PATH, content=b"[" * 20_000, headers=_JSON), "not valid JSON"),
        (lambda c: c.post(PATH, json=["m1"]), "must be an object"),
        (lambda c: c.post(PATH, content=b'{"SMSID": "\\ud800", "SendStatus": 5}'), "Unicode"),
        (lambda c: c.post(PATH, files={"SMSID": b"m1"}), "x-www-form-urlencoded"),
        (lambda c: c.post(PATH, json={"SMSID": {"nested": 1}, "SendStatus": 5}), "SMSID"),
    ],
)
def test_malformed_pushes_are_400_with_a_reason_and_never_reach_the_merge(send, reason):
    write = FakeWrite()

    async def scenario(client):
        response = await send(client)
        return response, (await client.get("/stats")).json()

    response, stats = run(write, scenario)
    assert response.status_code == 400
    assert reason in response.text
    assert stats["malformed"] == 1
    assert write.batches == []


_JSON = {"content-type": "application/json"}


def test_body_limit_is_what_the_constant_says():
    write = FakeWrite()
    padding = " " * (MAX_BODY_BYTES - 40)

    async def scenario(client):
        body = ('{"SMSID": "m1", "SendStatus": 5}' + padding).encode()
        return await client.post(PATH, content=body, headers=_JSON)

    assert run(write, scenario).status_code == 200


def test_wrong_token_other_paths_and_methods_are_404_and_counted():
    write = FakeWrite()

    async def scenario(client):
        codes = [
            (await client.get(f"/esms/callback/{TOKEN[:-1]}", params=push())).status_code,
            (await client.get(f"/esms/callback/{TOKEN}x", params=push())).status_code,
            (await client.get(f"/esms/callback/{TOKEN.upper()}", params=push())).status_code,
            (await client.get(f"/esms/callback/%C3%A9{TOKEN}", params=push())).status_code,
            (await client.get(f"{PATH}/", params=push())).status_code,
            (await client.get("/esms/callback/", params=push())).status_code,
            (await client.get("/admin")).status_code,
            (await client.delete(PATH)).status_code,
        ]
        return codes, (await client.get("/stats")).json()

    codes, stats = run(write, scenario)
    assert codes == [404] * 8
    assert stats["bad_token"] == 4
    assert stats["not_found"] == 4
    assert write.batches == []


def test_without_a_token_configured_every_push_is_404():
    write = FakeWrite()

    async def scenario(client):
        return [
            (await client.get(PATH, params=push())).status_code,
            (await client.get("/esms/callback/None", params=push())).status_code,
            (await client.get("/healthz")).status_code,
        ]

    assert run(write, scenario, token=None) == [404, 404, 200]
    assert write.batches == []


def test_unknown_smsid_is_200_and_counted():
    write = FakeWrite()

    async def scenario(client):
        response = await client.get(PATH, params=push(SMSID="unknown-1"))
        return response, (await client.get("/stats")).json()

    response, stats = run(write, scenario)
    assert response.status_code == 200
    assert (stats["unknown"], stats["accepted"]) == (1, 0)


def test_database_down_is_503_and_the_batch_is_not_retried_push_by_push():
    write = FakeWrite(OperationalError("SELECT 1", {}, ConnectionRefusedError("refused")))
    write.hold = threading.Event()

    async def scenario(client):
        first = asyncio.create_task(client.get(PATH, params=push(SMSID="a")))
        await asyncio.to_thread(write.entered.wait, 10)
        rest = [asyncio.create_task(client.get(PATH, params=push(SMSID=s))) for s in "bcd"]
        await asyncio.sleep(0.1)
        write.hold.set()
        responses = await asyncio.gather(first, *rest)
        return [r.status_code for r in responses], (await client.get("/stats")).json()

    codes, stats = run(write, scenario)
    assert codes == [503] * 4
    assert stats["db_unavailable"] == 4
    assert [len(batch) for batch in write.batches] == [1, 3]


def test_pushes_arriving_during_a_write_go_together_in_the_next_one():
    write = FakeWrite()
    write.hold = threading.Event()

    async def scenario(client):
        first = asyncio.create_task(client.get(PATH, params=push(SMSID="first")))
        await asyncio.to_thread(write.entered.wait, 10)
        rest = [
            asyncio.create_task(client.get(PATH, params=push(SMSID=f"m{i}"))) for i in range(20)
        ]
        await asyncio.sleep(0.2)
        write.hold.set()
        responses = await asyncio.gather(first, *rest)
        return [r.status_code for r in responses], (await client.get("/stats")).json()

    codes, stats = run(write, scenario)
    assert codes == [200] * 21
    assert [len(batch) for batch in write.batches] == [1, 20]
    assert (stats["accepted"], stats["changed"]) == (21, 21)


def test_one_bad_push_in_a_batch_costs_only_itself():
    write = FakeWrite()
    write.hold = threading.Event()

    async def scenario(client):
        first = asyncio.create_task(client.get(PATH, params=push(SMSID="first")))
        await asyncio.to_thread(write.entered.wait, 10)
        rest = [
            asyncio.create_task(client.get(PATH, params=push(SMSID=s)))
            for s in ("good-1", "bad-1", "unknown-1", "good-2")
        ]
        await asyncio.sleep(0.2)
        write.hold.set()
        return [r.status_code for r in await asyncio.gather(first, *rest)]

    assert run(write, scenario) == [200, 200, 503, 200, 200]
    assert [[r.ref_id for r in batch] for batch in write.batches] == [
        ["first"],
        ["good-1", "bad-1", "unknown-1", "good-2"],
        ["good-1"],
        ["bad-1"],
        ["unknown-1"],
        ["good-2"],
    ]


def test_stats_and_healthz():
    write = FakeWrite()

    async def scenario(client):
        await client.get(PATH, params=push())
        return (await client.get("/healthz")).text, (await client.get("/stats")).json()

    health, stats = run(write, scenario)
    assert health == "ok"
    assert stats == {
        "accepted": 1,
        "changed": 1,
        "unknown": 0,
        "bad_token": 0,
        "not_found": 0,
        "malformed": 0,
        "db_unavailable": 0,
        "retried": 0,
        "resolved_failed": 0,
        "resolved_rejected": 0,
        "resolved_sent": 1,
    }


def test_resolutions_are_counted_by_state_also_when_a_batch_is_written_push_by_push():
    write = FakeWrite()
    write.hold = threading.Event()
    finals = [
        push(SMSID="first", SendStatus="2"),
        push(SMSID="s1"),
        push(SMSID="s2"),
        push(SMSID="f1", SendSuccess="0", SendFailed="1"),
        push(SMSID="r1", SendStatus="4"),
        push(SMSID="bad-1"),  # makes its batch go push by push, and is not written
        push(SMSID="unknown-1"),
    ]

    async def scenario(client):
        first = asyncio.create_task(client.get(PATH, params=finals[0]))
        await asyncio.to_thread(write.entered.wait, 10)
        rest = [asyncio.create_task(client.get(PATH, params=fields)) for fields in finals[1:]]
        await asyncio.sleep(0.2)
        write.hold.set()
        codes = [r.status_code for r in await asyncio.gather(first, *rest)]
        return codes, (await client.get("/stats")).json()

    codes, stats = run(write, scenario)
    assert codes == [200, 200, 200, 200, 200, 503, 200]
    assert len(write.batches) == 2 + 6  # the first, the failed batch of six, then one by one
    resolved = {name: count for name, count in stats.items() if name.startswith("resolved_")}
    assert resolved == {"resolved_sent": 2, "resolved_failed": 1, "resolved_rejected": 1}
    assert stats["changed"] == 5


# --- /healthz ---------------------------------------------------------------------------------


class FakePing:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error
        self.hold: threading.Event | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self.hold is not None:
            self.hold.wait(10)
        if self.error is not None:
            raise self.error


def test_healthz_is_ok_while_the_database_answers_and_503_with_the_reason_when_not(
    monkeypatch,
):
    monkeypatch.setattr(receiver, "HEALTH_CACHE_SECONDS", 0)
    ping = FakePing()

    async def scenario(client):
        answers = [await client.get("/healthz")]
        ping.error = OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
        answers.append(await client.get("/healthz"))
        ping.error = None
        answers.append(await client.get("/healthz"))
        return [(r.status_code, r.text) for r in answers]

    assert run(FakeWrite(), scenario, ping=ping) == [
        (200, "ok"),
        (503, "database unavailable: OperationalError"),
        (200, "ok"),
    ]
    assert ping.calls == 3


def test_healthz_answers_within_its_timeout_when_the_database_hangs(monkeypatch):
    monkeypatch.setattr(receiver, "HEALTH_TIMEOUT_SECONDS", 0.2)
    monkeypatch.setattr(receiver, "HEALTH_CACHE_SECONDS", 0)
    ping = FakePing()
    ping.hold = threading.Event()

    async def scenario(client):
        started = time.monotonic()
        answers = await asyncio.gather(*(client.get("/healthz") for _ in range(5)))
        waited = time.monotonic() - started
        again = await client.get("/healthz")  # the first ping still hangs: no second one
        ping.hold.set()
        return answers, waited, again

    answers, waited, again = run(FakeWrite(), scenario, ping=ping)
    assert {(r.status_code, r.text) for r in answers} == {
        (503, "database did not answer within 0.2 s")
    }
    assert waited < 2
    assert again.status_code == 503
    assert ping.calls == 1


def test_a_storm_of_probes_costs_one_ping_a_second():
    ping = FakePing()

    async def scenario(client):
        answers = await asyncio.gather(*(client.get("/healthz") for _ in range(50)))
        answers += [await client.get("/healthz") for _ in range(50)]
        return [r.status_code for r in answers]

    assert run(FakeWrite(), scenario, ping=ping) == [200] * 100
    assert ping.calls == 1


# --- the writer's retries -----------------------------------------------------------------------


class FlakyWriter(PushWriter):
    """PushWriter whose transaction fails with `errors` first, then succeeds."""

    def __init__(self, errors: list[Exception]) -> None:
        self.retries: list[float] = []
        super().__init__(engine=None, on_retry=lambda: self.retries.append(0.0), sleep=self._slept)
        self.errors = errors
        self.attempts = 0
        self.slept: list[float] = []

    def _slept(self, seconds: float) -> None:
        self.slept.append(seconds)

    def _write(self, records):
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return Written([PushOutcome.ACCEPTED] * len(records), len(records))


def _db_error(cause: Exception) -> OperationalError:
    return OperationalError("WITH x AS (...)", {}, cause)


def test_deadlocks_and_serialization_failures_are_retried_with_jittered_backoff():
    writer = FlakyWriter(
        [
            _db_error(psycopg.errors.DeadlockDetected("deadlock detected")),
            _db_error(psycopg.errors.SerializationFailure("could not serialize")),
        ]
    )
    written = writer([CallbackRecord(ref_id="m", send_status=5)])
    assert written.changed == 1
    assert writer.attempts == 3 and len(writer.retries) == 2
    assert 0 <= writer.slept[0] <= receiver.RETRY_BACKOFF_SECONDS
    assert 0 <= writer.slept[1] <= 2 * receiver.RETRY_BACKOFF_SECONDS


def test_the_writer_gives_up_after_its_attempts_and_never_retries_other_errors():
    deadlocks = [
        _db_error(psycopg.errors.DeadlockDetected("deadlock detected"))
        for _ in range(WRITE_ATTEMPTS)
    ]
    writer = FlakyWriter(list(deadlocks))
    with pytest.raises(OperationalError) as raised:
        writer([CallbackRecord(ref_id="m", send_status=5)])
    assert raised.value is deadlocks[-1]
    assert writer.attempts == WRITE_ATTEMPTS and len(writer.retries) == WRITE_ATTEMPTS - 1

    for error in (
        _db_error(ConnectionRefusedError("refused")),
        DataError("UPDATE messages ...", {}, psycopg.errors.NumericValueOutOfRange("too big")),
    ):
        writer = FlakyWriter([error])
        with pytest.raises(type(error)):
            writer([CallbackRecord(ref_id="m", send_status=5)])
        assert writer.attempts == 1 and writer.retries == []


def test_record_from_fields_keeps_a_callback_url_the_push_names():
    record = record_from_fields({"SMSID": "m", "SendStatus": "2", "CallbackUrl": "x"}, CALLED)
    assert record.callback_url == "x"
    assert record_from_fields({"smsid": " m ", "sendstatus": 2}, None).ref_id == "m"
    with pytest.raises(MalformedPush, match="SendStatus"):
        record_from_fields({"SMSID": "m", "SendStatus": "2.5"}, None)
