"""The push receiver: eSMS calls the sender's CallbackUrl at each status change; write it at once.

`python -m worker.receiver` serves `/esms/callback/<PUSH_TOKEN>` on RECEIVER_HOST:RECEIVER_PORT.
eSMS sends a GET whose query names mix case (`SMSID, SendStatus, ..., telcoid, phonenumber,
partnerids, error_info, oaid, tempid`); a POST with the same fields as JSON or as a form is
accepted too. The fields go through `records.parse_callback_item`, the same edge as GetCallback's
items, and then through `store.merge_callbacks(..., source="push")`, the same forward-only merge
the poller uses. In each process (`--processes` of them share the socket) one writer thread runs
the transactions: pushes that arrive while it writes wait for the next one and go in together, so
a burst costs a few short transactions rather than one per push, and the event loop never waits
on Postgres (nor on the GIL of a crowd of threads). A
push carries no CallbackUrl field because it *is* the call to that URL: the record gets the URL
the receiver was called at, without its query, which is what GetCallback reports for the same
message.

Answers: 200 when the push was written or changed nothing (duplicate, older than the row, row
already final), 200 as well for an SMSID with no row (eSMS retries only on timeouts, and a row
inserted later is polled anyway); 400 with the reason for a push without SMSID or SendStatus or
with an unreadable body; 404 for a wrong or missing token and for every other path; 503 only
when the database cannot be written. A transaction that loses a deadlock or a serialization
failure to another writer (a poll's write) is run again a few times before that 503, because
eSMS does not send a push again after an answer. Each outcome is counted, and so are the rows the
pushes made final, by state; `GET /stats` shows the counters, `GET /metrics` the same for
Prometheus (`esms_receiver_pushes_total{outcome}`, `esms_receiver_resolved_total{state}`).
`GET /healthz` answers "ok" when the database answers `SELECT 1` (checked at most once a second,
however many probes), 503 with the reason when not. The access log stays off: every URL carries
the token and a phone number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import hmac
import json
import logging
import math
import multiprocessing
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from enum import StrEnum
from types import FrameType
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from worker import schema, store
from worker.merge import FINAL_STATES, State
from worker.records import CallbackRecord, parse_callback_item
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

CALLBACK_PATH = "/esms/callback/{token}"
# A push is a few hundred bytes; anything far larger is not one.
MAX_BODY_BYTES = 64 * 1024
# Pushes written in one transaction at most (GetCallback's batch size).
MAX_BATCH = 200
# The token sits in a URL path: unreserved characters only, and long enough not to be guessed.
_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,}")
_DB_WARNING_EVERY_SECONDS = 10.0
_GRACE_SECONDS = 5
# Deadlock, serialization failure: the transaction lost to another writer and may simply run
# again. Rows are locked in RefId order (store.merge_callbacks), so this is rare, but a 503 would
# lose the push: eSMS sends it again only after a timeout.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
WRITE_ATTEMPTS = 4
# The first retry waits up to this long, each further one up to twice as long (full jitter, so
# two writers that collided do not collide again in step): at most 0.35 s in all, far below the
# timeout after which eSMS would send the push again.
RETRY_BACKOFF_SECONDS = 0.05
# /healthz: how long the database has to answer `SELECT 1`, and how long an answer is reused so
# that a storm of probes costs Postgres one query a second.
HEALTH_TIMEOUT_SECONDS = 1.5
HEALTH_CACHE_SECONDS = 1.0


class MalformedPush(ValueError):
    """A push that cannot be written; answered with 400 and its reason."""


class PushOutcome(StrEnum):
    ACCEPTED = "accepted"  # merged: the row moved forward, or already knew as much
    UNKNOWN = "unknown"  # no row has this SMSID


_COUNTERS = (
    "accepted",  # written: the row moved forward, or already knew as much
    "changed",  # rows the accepted pushes moved forward (duplicates and late ones do not)
    "unknown",
    "bad_token",
    "not_found",  # any other path or method
    "malformed",
    "db_unavailable",
    "retried",  # transactions run again after a deadlock or serialization failure
    # Rows the pushes made final, by state (a push never makes a row `expired`).
    *(f"resolved_{state}" for state in sorted(FINAL_STATES - {State.EXPIRED})),
)


class PushStats:
    """What the receiver has answered since it started, over all its processes.

    The counters live in shared memory made before the processes fork; each process adds to its
    own row, so no lock is needed, and `/stats` in any of them sums every row.
    """

    def __init__(self, processes: int = 1) -> None:
        self._values = multiprocessing.RawArray(ctypes.c_int64, processes * len(_COUNTERS))
        self._row = 0

    def use_row(self, process_index: int) -> None:
        self._row = process_index * len(_COUNTERS)

    def add(self, name: str, count: int = 1) -> None:
        # Each counter is added to by one thread of a process only (`retried` by the writer
        # thread, the others by the event loop), so no increment can be lost.
        self._values[self._row + _COUNTERS.index(name)] += count

    def add_resolved(self, resolved: dict[str, int]) -> None:
        for state, count in resolved.items():
            self.add(f"resolved_{state}", count)

    def as_dict(self) -> dict[str, int]:
        width = len(_COUNTERS)
        return {name: sum(self._values[i::width]) for i, name in enumerate(_COUNTERS)}


def record_from_fields(fields: dict[str, Any], callback_url: str | None) -> CallbackRecord:
    """The push's fields as a record; `callback_url` fills CallbackUrl when the push has none.

    Raises MalformedPush when the push names no SMSID or has no integer SendStatus (without one
    it says nothing about where the message stands).
    """
    record = parse_callback_item(fields)
    if record is None:
        raise MalformedPush("SMSID is missing or empty")
    if record.send_status is None:
        raise MalformedPush("SendStatus is missing or not an integer")
    if record.callback_url is None and callback_url is not None:
        record = dataclasses.replace(record, callback_url=callback_url)
    return record


@dataclasses.dataclass(frozen=True)
class Written:
    """What one transaction did: each push's outcome, in order, how many rows changed, and how
    many of them it made final, by state."""

    outcomes: list[PushOutcome]
    changed: int
    resolved: dict[str, int] = dataclasses.field(default_factory=dict)


def _retryable(error: SQLAlchemyError) -> bool:
    """A transaction another writer's locks made fail, not a fault of the database or the data."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return sqlstate in _RETRYABLE_SQLSTATES


class PushWriter:
    """Writes pushes in one short transaction; runs in the writer thread.

    The transaction locks only the rows `store.merge_callbacks` locks, in RefId order as every
    writer of `messages` does (`known_ref_ids` reads without locking), so it cannot deadlock with
    another push batch or a poll's write; a deadlock or serialization failure that comes anyway
    (a writer outside this code) runs it again, WRITE_ATTEMPTS times in all. `on_retry` is called
    before each retry."""

    def __init__(
        self,
        engine: Engine,
        on_retry: Callable[[], None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.on_retry = on_retry
        self.sleep = sleep

    def __call__(self, records: Sequence[CallbackRecord]) -> Written:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return self._write(records)
            except DBAPIError as error:
                if attempt == WRITE_ATTEMPTS or not _retryable(error):
                    raise
            self.on_retry()
            self.sleep(random.uniform(0, RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _write(self, records: Sequence[CallbackRecord]) -> Written:
        with self.engine.begin() as conn:
            completed = store.merge_callbacks(conn, records, source="push")
            ref_ids = {record.ref_id for record in records}
            # Every SMSID moved a row: all are known. Otherwise ask which have a row.
            all_changed = completed.changed == len(ref_ids)
            known = ref_ids if all_changed else store.known_ref_ids(conn, ref_ids)
        outcomes = [
            PushOutcome.ACCEPTED if record.ref_id in known else PushOutcome.UNKNOWN
            for record in records
        ]
        return Written(outcomes, completed.changed, completed.resolved)


WriteBatch = Callable[[Sequence[CallbackRecord]], Written]


def _database_down(error: SQLAlchemyError) -> bool:
    """A connection-level failure, not one this batch's data caused."""
    if isinstance(error, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


class Batcher:
    """Feeds the one writer thread: a push waits for the write in progress, then goes with every
    push that arrived meanwhile. Runs on the event loop; only the write leaves it."""

    def __init__(self, write: WriteBatch, on_written: Callable[[Written], None]) -> None:
        self._write = write
        self._on_written = on_written
        self._waiting: list[tuple[CallbackRecord, asyncio.Future[PushOutcome]]] = []
        self._draining = False

    async def submit(self, record: CallbackRecord) -> PushOutcome:
        """The push's outcome once its transaction committed; raises its SQLAlchemyError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PushOutcome] = loop.create_future()
        self._waiting.append((record, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                records = [record for record, _ in batch]
                try:
                    results, totals = await anyio.to_thread.run_sync(self._write_isolated, records)
                    self._on_written(totals)
                except Exception as error:  # every waiting push must hear of it
                    results = [error] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # the caller went away
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = False

    def _write_isolated(
        self, records: list[CallbackRecord]
    ) -> tuple[list[PushOutcome | SQLAlchemyError], Written]:
        """Each record's outcome or the error that stopped it, and what was written in all (its
        `changed` and `resolved`).

        When a batch fails for its data rather than for the database, each push is written
        alone, so that one bad push cannot cost the others their write.
        """
        try:
            written = self._write(records)
            return list(written.outcomes), written
        except SQLAlchemyError as error:
            if len(records) == 1 or _database_down(error):
                return [error] * len(records), Written([], 0)
        results: list[PushOutcome | SQLAlchemyError] = []
        changed = 0
        resolved: dict[str, int] = {}
        for record in records:
            try:
                written = self._write([record])
            except SQLAlchemyError as error:
                results.append(error)
                continue
            results.append(written.outcomes[0])
            changed += written.changed
            for state, count in written.resolved.items():
                resolved[state] = resolved.get(state, 0) + count
        return results, Written([], changed, resolved)


class DatabaseHealth:
    """Whether the database answers, for /healthz: `ping` (a `SELECT 1`) runs in a thread, one at
    a time, and its verdict is reused for HEALTH_CACHE_SECONDS, so a storm of probes costs
    Postgres one query a second; a ping that has not answered within HEALTH_TIMEOUT_SECONDS is a
    failure (it may hang for as long as a blackholed connection does, so probes never wait for
    it longer than that). Runs on the event loop."""

    def __init__(self, ping: Callable[[], None]) -> None:
        self._ping = ping
        self._checked_at = -math.inf
        self._reason: str | None = None
        self._running: asyncio.Future[str | None] | None = None

    async def problem(self) -> str | None:
        """None when the database answered, else a short reason (no address, no credentials)."""
        if time.monotonic() - self._checked_at < HEALTH_CACHE_SECONDS:
            return self._reason
        if self._running is None:
            self._running = asyncio.ensure_future(self._check())
        try:
            reason = await asyncio.wait_for(asyncio.shield(self._running), HEALTH_TIMEOUT_SECONDS)
        except TimeoutError:
            reason = f"database did not answer within {HEALTH_TIMEOUT_SECONDS:g} s"
        self._checked_at, self._reason = time.monotonic(), reason
        return reason

    async def _check(self) -> str | None:
        try:
            await anyio.to_thread.run_sync(self._ping)
        except Exception as error:  # noqa: BLE001 - whatever it is, the database did not answer
            return f"database unavailable: {type(error).__name__}"
        finally:
            self._running = None
        return None


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def create_app(
    settings: Settings,
    write: WriteBatch | None = None,
    stats: PushStats | None = None,
    ping: Callable[[], None] | None = None,
) -> Starlette:
    """The receiver for `settings`. `write` replaces the database write and `ping` the health
    check's `SELECT 1` (unit tests; with `write` and no `ping`, /healthz checks nothing); `stats`
    is shared with the other processes of the same receiver."""
    expected = (
        settings.push_token.get_secret_value().encode() if settings.push_token is not None else None
    )
    stats = stats or PushStats()
    engine: Engine | None = None
    if write is None:
        # One writer thread: one connection, and one spare for the pool's ping and /healthz.
        engine = store.make_engine(settings, pool_size=2)
        write = PushWriter(engine, on_retry=lambda: stats.add("retried"))
        ping = ping or functools.partial(_select_one, engine)
    health = DatabaseHealth(ping) if ping is not None else None

    def on_written(written: Written) -> None:
        stats.add("changed", written.changed)
        stats.add_resolved(written.resolved)

    batcher = Batcher(write, on_written)
    db_warned_at = -_DB_WARNING_EVERY_SECONDS
    called_urls: dict[tuple[Any, ...], str] = {}

    def called_url(request: Request) -> str:
        """The URL this push was sent to, without its query: the message's CallbackUrl."""
        scope = request.scope
        key = (scope["scheme"], request.headers.get("host"), scope.get("root_path"), scope["path"])
        url = called_urls.get(key)
        if url is None:
            if len(called_urls) > 64:  # only hosts and paths that carried the token get here
                called_urls.clear()
            url = called_urls[key] = str(request.url.replace(query=""))
        return url

    def token_ok(given: str) -> bool:
        if expected is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)

    async def callback(request: Request) -> Response:
        nonlocal db_warned_at
        if not token_ok(request.path_params["token"]):
            stats.add("bad_token")
            return _not_found()
        try:
            record = record_from_fields(await _fields(request), called_url(request))
        except MalformedPush as bad:
            stats.add("malformed")
            return PlainTextResponse(str(bad), status_code=400)
        try:
            outcome = await batcher.submit(record)
        except SQLAlchemyError as error:
            stats.add("db_unavailable")
            now = time.monotonic()
            if now - db_warned_at >= _DB_WARNING_EVERY_SECONDS:
                db_warned_at = now
                log.warning(
                    "push not written, database unavailable (%d so far): %s",
                    stats.as_dict()["db_unavailable"],
                    type(error).__name__,
                )
            return PlainTextResponse("database unavailable", status_code=503)
        if outcome is PushOutcome.UNKNOWN:
            stats.add("unknown")
            return PlainTextResponse("unknown SMSID")
        stats.add("accepted")
        return PlainTextResponse("OK")

    async def healthz(request: Request) -> Response:
        problem = await health.problem() if health is not None else None
        if problem is not None:
            return PlainTextResponse(problem, status_code=503)
        return PlainTextResponse("ok")

    async def show_stats(request: Request) -> Response:
        return JSONResponse(stats.as_dict())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))

    async def show_metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def refused(request: Request, error: Exception) -> Response:
        # Unknown paths and methods look alike to a caller: there is nothing here.
        stats.add("not_found")
        return _not_found()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if engine is not None:
            engine.dispose()

    app = Starlette(
        routes=[
            Route(CALLBACK_PATH, callback, methods=["GET", "POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/stats", show_stats, methods=["GET"]),
            Route("/metrics", show_metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: refused},
        lifespan=lifespan,
    )
    # `/esms/callback/<token>/` must not answer with a redirect that names the token.
    app.router.redirect_slashes = False
    app.state.stats = stats
    return app


class _StatsCollector:
    """The receiver's counters (`/stats`, every process summed) in Prometheus's format: pushes
    by outcome, and the rows pushes made final, by state."""

    def __init__(self, stats: PushStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        values = self._stats.as_dict()
        pushes = CounterMetricFamily(
            "esms_receiver_pushes",
            "Pushes answered, by outcome (db_unavailable: answered 503, the database could not "
            "be written)",
            labels=["outcome"],
        )
        resolved = CounterMetricFamily(
            "esms_receiver_resolved", "Rows pushes made final, by state", labels=["state"]
        )
        for name, value in values.items():
            if name.startswith("resolved_"):
                resolved.add_metric([name.removeprefix("resolved_")], value)
            elif name != "changed":
                pushes.add_metric([name], value)
        changed = CounterMetricFamily(
            "esms_receiver_rows_changed", "Rows the accepted pushes moved forward"
        )
        changed.add_metric([], values["changed"])
        yield from (pushes, resolved, changed)


def _not_found() -> Response:
    return PlainTextResponse("Not Found", status_code=404)


async def _fields(request: Request) -> dict[str, Any]:
    """The push's fields: the query string, and for a POST the JSON or form body on top."""
    fields: dict[str, Any] = dict(request.query_params.multi_items())
    if request.method != "POST":
        return fields
    body = await _read_body(request)
    if not body.strip():
        return fields
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        raise MalformedPush("send the fields as JSON or application/x-www-form-urlencoded")
    if "json" in content_type or (not content_type and body.lstrip().startswith(b"{")):
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            raise MalformedPush("body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise MalformedPush("JSON body must be an object")
        _check_text(parsed)
        fields.update(parsed)
    else:
        text = body.decode("utf-8", "replace")
        fields.update(parse_qsl(text, keep_blank_values=True))
    return fields


def _check_text(parsed: dict[str, Any]) -> None:
    """JSON can spell lone surrogates (\\ud800), which no database text can hold; query strings
    and forms are decoded with replacement and cannot."""
    for key, value in parsed.items():
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise MalformedPush(f"{key!r} is not valid Unicode text") from None


async def _read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise MalformedPush(f"body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; prints "push receiver listening on http://HOST:PORT"."""
    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m worker.receiver",
        description="Receive eSMS's push callbacks at /esms/callback/<PUSH_TOKEN>.",
    )
    parser.add_argument("--host", default=settings.receiver_host, help="default RECEIVER_HOST")
    parser.add_argument(
        "--port", type=int, default=settings.receiver_port, help="default RECEIVER_PORT (0: any)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=_default_processes(),
        help="processes sharing the socket (default: one per CPU, at most 4)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    token = settings.push_token.get_secret_value() if settings.push_token is not None else None
    if token is None:
        log.warning("PUSH_TOKEN is not set: every push is answered 404")
    elif not _TOKEN_PATTERN.fullmatch(token):
        print(
            "worker.receiver: PUSH_TOKEN must be at least 16 characters from A-Z a-z 0-9 . _ ~ -"
            " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            file=sys.stderr,
        )
        return 2
    try:
        schema.verify(settings)
    except schema.SchemaMismatch as mismatch:
        print(f"worker.receiver refuses to start: {mismatch}", file=sys.stderr)
        return 1
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets that say so, and without
    # it every answer on a kept-alive connection waits 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as error:
        print(f"worker.receiver: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    # One process handles about a thousand pushes a second (HTTP parsing is most of it, and the
    # GIL keeps it to one core); more share the socket. Forked before any thread or connection.
    stats = PushStats(args.processes)
    children = []
    for index in range(1, args.processes):
        pid = os.fork()
        if pid == 0:
            stats.use_row(index)
            code = _serve_process(settings, sock, stats, args.host, announce=False)
            os._exit(code)
        children.append(pid)
    code = _serve_process(settings, sock, stats, args.host, announce=True)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = code or (os.waitstatus_to_exitcode(status) != 0)
    return int(code)


def _default_processes() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


def _serve_process(
    settings: Settings, sock: socket.socket, stats: PushStats, host: str, *, announce: bool
) -> int:
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, stats=stats),
            log_level="warning",
            access_log=False,
            server_header=False,
            # Behind a TLS proxy the scheme comes from X-Forwarded-Proto, trusted from the
            # addresses in FORWARDED_ALLOW_IPS (uvicorn's own variable; default 127.0.0.1).
            proxy_headers=True,
            timeout_graceful_shutdown=_GRACE_SECONDS,
        )
    )

    # As in the emulator: uvicorn re-raises the signal it caught once it has stopped; these
    # handlers absorb it so that a requested stop exits 0.
    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    asyncio.run(_serve(server, sock, host, announce))
    return 0 if server.started else 1


async def _serve(server: uvicorn.Server, sock: socket.socket, host: str, announce: bool) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    parent = os.getppid()
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started and announce:
        shown_host = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]
        print(f"push receiver listening on http://{shown_host}:{port}", flush=True)
    # A forked process ends with the one that started it, even if that one was killed outright.
    while not serving.done():
        if not announce and os.getppid() != parent:
            server.should_exit = True
        await asyncio.wait([serving], timeout=1)
    await serving


if __name__ == "__main__":
    sys.exit(main())
