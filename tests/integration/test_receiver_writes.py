"""The push writer against the real database, with other writers: no deadlock between pushes and
polls, and a transaction that loses a deadlock or a serialization failure anyway is run again.

Many threads write push batches (`PushWriter`) and poll answers (`store.complete_batch`) over the
same RefIds in shuffled orders; a control run that locks rows in the opposite order shows that
the same harness does see deadlocks. Then a deadlock is built on purpose (a second connection
holding one row and asking for another) and a trigger raises serialization failures, and the
push is written by its retry; the app in-process counts the retry and answers 200.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from tests.processes import free_port
from worker import store
from worker.receiver import WRITE_ATTEMPTS, PushWriter, create_app
from worker.records import CallbackRecord

pytestmark = pytest.mark.integration

OA = "1090257973118325189"
TOKEN = "it-push-token-Wr1t3sC0ncurr3nt"
REFS = [f"c-{i:03d}" for i in range(40)]


@pytest.fixture
def writers(engine: Engine, database_url: str) -> Iterator[Engine]:
    """An engine for the writer threads (the tables emptied by `engine`) that finds a deadlock
    after 20 ms instead of Postgres's 1 s: the control run makes many."""
    writers = create_engine(
        database_url,
        pool_size=12,
        max_overflow=0,
        connect_args={"options": "-c deadlock_timeout=20ms"},
    )
    yield writers
    writers.dispose()


def insert(engine: Engine, ref_ids: list[str]) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO messages (ref_id, oa_id) VALUES (:ref_id, :oa_id)"),
            [{"ref_id": ref_id, "oa_id": OA} for ref_id in ref_ids],
        )


def at_carrier(ref_ids: list[str], request_id: str) -> list[CallbackRecord]:
    """SendStatus 7 (not final, so the rows stay pending and every write locks them again), with
    data that differs from the last write's, so every write changes every row."""
    return [CallbackRecord(ref_id=r, send_status=7, request_id=request_id) for r in ref_ids]


def hammer(writers: Engine, settings, *, lock_descending_first: bool) -> tuple[list, list]:
    """4 push threads and 3 poll threads, 30 batches of 25 of the 40 RefIds each, every batch in
    its own shuffled order, all started at once. Returns (errors raised, push retries)."""
    insert(writers, REFS)
    errors: list[BaseException] = []
    retries: list[int] = []
    start = threading.Barrier(7)

    def push(seed: int) -> None:
        rng = random.Random(seed)
        writer = PushWriter(writers, on_retry=lambda: retries.append(seed))
        start.wait()
        for i in range(30):
            writer(at_carrier(rng.sample(REFS, 25), f"push-{seed}-{i}"))

    def poll(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for i in range(30):
            refs = rng.sample(REFS, 25)
            batch = store.Batch(uuid.uuid4(), "default", OA, tuple(refs))
            with writers.begin() as conn:
                if lock_descending_first:
                    # What a writer must never do: lock the rows in another order first.
                    conn.execute(
                        text(
                            "SELECT 1 FROM messages WHERE ref_id = ANY(:refs) "
                            "ORDER BY ref_id DESC FOR UPDATE"
                        ),
                        {"refs": refs},
                    )
                store.complete_batch(conn, batch, at_carrier(refs, f"poll-{seed}-{i}"), settings)

    def guarded(target, seed: int) -> None:
        try:
            target(seed)
        except BaseException as error:  # noqa: BLE001 - the test reports every one
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=guarded, args=(push, s)) for s in range(4)]
    threads += [threading.Thread(target=guarded, args=(poll, s)) for s in range(4, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    return errors, retries


def test_pushes_and_polls_over_the_same_rows_in_any_order_never_deadlock(writers, make_settings):
    errors, retries = hammer(writers, make_settings(), lock_descending_first=False)
    assert errors == []
    assert retries == [], "no push lost a deadlock: none had to be run again"
    with writers.begin() as conn:
        changes = conn.execute(text("SELECT count(*) FROM message_history")).scalar()
        pending = conn.execute(
            text("SELECT count(*) FROM messages WHERE state = 'pending' AND send_status = 7")
        ).scalar()
    assert changes == 7 * 30 * 25  # every write changed each of its 25 rows
    assert pending == len(REFS)


def test_the_harness_sees_deadlocks_when_a_writer_locks_out_of_order(writers, make_settings):
    """The control: the same run, the poll transactions first locking their rows in descending
    order. Deadlocks come at once, as a poll's error or a push's retry."""
    errors, retries = hammer(writers, make_settings(), lock_descending_first=True)
    deadlocks = [e for e in errors if getattr(e.orig, "sqlstate", None) == "40P01"]
    assert deadlocks or retries


def _waiting_for_a_lock(engine: Engine) -> bool:
    with engine.begin() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar()
        )


def test_a_push_that_loses_a_real_deadlock_is_written_by_its_retry(engine, database_url):
    insert(engine, ["dl-a", "dl-b"])
    # The push finds the deadlock after 0.5 s; the other side would wait 30 s, so the push is
    # the one Postgres aborts.
    push_engine = create_engine(
        database_url, pool_size=1, connect_args={"options": "-c deadlock_timeout=500ms"}
    )
    retries: list[float] = []
    writer = PushWriter(push_engine, on_retry=lambda: retries.append(time.monotonic()))
    result: dict = {}

    def write() -> None:
        try:
            result["written"] = writer(at_carrier(["dl-b", "dl-a"], "after-the-deadlock"))
        except BaseException as error:  # noqa: BLE001 - asserted below
            result["error"] = error

    plain_url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        with psycopg.connect(plain_url, autocommit=True) as other:
            other.execute("SET deadlock_timeout = '30s'")
            with other.transaction():
                other.execute("SELECT 1 FROM messages WHERE ref_id = 'dl-b' FOR UPDATE")
                pusher = threading.Thread(target=write)
                pusher.start()
                # The push locks dl-a (RefId order), then waits for dl-b.
                deadline = time.monotonic() + 10
                while not _waiting_for_a_lock(engine):
                    assert time.monotonic() < deadline, "the push never waited for dl-b"
                    time.sleep(0.01)
                # Asking for dl-a closes the cycle; this returns once the push was aborted.
                other.execute("SELECT 1 FROM messages WHERE ref_id = 'dl-a' FOR UPDATE")
                other.execute(
                    "UPDATE messages SET request_id = 'other' WHERE ref_id IN ('dl-a', 'dl-b')"
                )
            pusher.join(30)
    finally:
        push_engine.dispose()
    assert "error" not in result, result.get("error")
    assert result["written"].changed == 2
    assert len(retries) == 1
    with engine.begin() as conn:
        rows = dict(conn.execute(text("SELECT ref_id, request_id FROM messages")).all())
    assert rows == {"dl-a": "after-the-deadlock", "dl-b": "after-the-deadlock"}


@pytest.fixture
def failing_updates(engine: Engine):
    """`fail(n)`: the next n UPDATEs of messages fail with a serialization failure (40001).

    The count is a sequence: nextval is not rolled back with the failed transaction."""
    ddl = [
        "CREATE SEQUENCE test_serialization_failures",
        """
        CREATE FUNCTION test_fail_serialization() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('test_serialization_failures') <= TG_ARGV[0]::int THEN
                RAISE EXCEPTION 'test: could not serialize access'
                    USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NULL;
        END $$
        """,
    ]

    def fail(times: int) -> None:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TRIGGER test_fail_serialization BEFORE UPDATE ON messages "
                    f"FOR EACH STATEMENT EXECUTE FUNCTION test_fail_serialization({int(times)})"
                )
            )

    with engine.begin() as conn:
        for statement in ddl:
            conn.execute(text(statement))
    try:
        yield fail
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS test_fail_serialization ON messages"))
            conn.execute(text("DROP FUNCTION test_fail_serialization()"))
            conn.execute(text("DROP SEQUENCE test_serialization_failures"))


def test_a_serialization_failure_is_retried_and_the_retries_run_out(engine, failing_updates):
    insert(engine, ["sf-1"])
    retries: list[int] = []
    writer = PushWriter(engine, on_retry=lambda: retries.append(1))
    failing_updates(WRITE_ATTEMPTS + 1)
    with pytest.raises(OperationalError) as raised:
        writer(at_carrier(["sf-1"], "never"))
    assert raised.value.orig.sqlstate == "40001"
    assert len(retries) == WRITE_ATTEMPTS - 1
    # One failure left in the trigger: the next push fails once and is written by its retry.
    assert writer(at_carrier(["sf-1"], "second")).changed == 1
    assert len(retries) == WRITE_ATTEMPTS
    with engine.begin() as conn:
        stored = conn.execute(text("SELECT request_id FROM messages WHERE ref_id = 'sf-1'"))
        assert stored.scalar() == "second"


def _serve(app, scenario):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver.test") as c:
            async with app.router.lifespan_context(app):
                return await scenario(c)

    return asyncio.run(main())


def test_the_app_answers_200_after_a_retry_and_counts_it(engine, make_settings, failing_updates):
    insert(engine, ["app-1"])
    failing_updates(1)
    app = create_app(make_settings(push_token=TOKEN))

    async def scenario(client):
        push = await client.get(
            f"/esms/callback/{TOKEN}",
            params={"SMSID": "app-1", "SendStatus": "5", "SendSuccess": "1"},
        )
        health = await client.get("/healthz")
        return push, health, (await client.get("/stats")).json()

    push, health, stats = _serve(app, scenario)
    assert (push.status_code, push.text) == (200, "OK")
    assert (health.status_code, health.text) == (200, "ok")
    assert (stats["retried"], stats["accepted"], stats["resolved_sent"]) == (1, 1, 1)
    assert stats["db_unavailable"] == 0


def test_healthz_is_503_at_once_while_the_database_is_away(make_settings):
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(make_settings(push_token=TOKEN, database_url=closed))

    async def scenario(client):
        started = time.monotonic()
        health = await client.get("/healthz")
        return health, time.monotonic() - started

    health, took = _serve(app, scenario)
    assert (health.status_code, health.text) == (503, "database unavailable: OperationalError")
    assert took < 2
