"""The push receiver: eSMS calls the sender's CallbackUrl at each status change; write it at once.

`python -m worker.receiver` serves `/esms/callback/<PUSH_TOKEN>` on RECEIVER_HOST:RECEIVER_PORT.
eSMS sends a GET whose query names mix case (`SMSID, SendStatus, ..., telcoid, phonenumber,
partnerids, error_info, oaid, tempid`) and whose empty values stand for null; a POST with the same
fields as JSON or as a form is accepted too. The fields go through `records.parse_callback_item`,
the same edge as GetCallback's items (an empty value is NULL there too), and then through
`store.merge_callbacks(..., source="push")`, the same forward-only merge the poller uses. In each
worker process one writer thread runs the transactions: pushes that arrive while it writes wait
for the next one and go in together, so a burst costs a few short transactions rather than one
per push, and the event loop never waits on Postgres (nor on the GIL of a crowd of threads). A
push carries no CallbackUrl field because it *is* the call to that URL: the record gets the URL
the receiver was called at, without its query, which is what GetCallback reports for the same
message.

Processes: uvicorn's own supervisor (`uvicorn.supervisors.Multiprocess`, what `uvicorn
--workers` runs) starts `--workers` processes on one socket bound here, restarts one that dies,
and adds, removes or replaces them on SIGTTIN, SIGTTOU and SIGHUP. Their counters are
prometheus_client metrics in multiprocess mode (worker.receiver_metrics), served summed by the
supervisor on RECEIVER_METRICS_PORT at `/metrics`.

Answers: 200 when the push was written or changed nothing (duplicate, older than the row, row
already final), 200 as well for an SMSID with no row (eSMS retries only on timeouts, and a row
inserted later is polled anyway); 400 with the reason for a push without SMSID or SendStatus or
with an unreadable body; 404 for a wrong or missing token and for every other path; 503 only
when the database cannot be written. A transaction that loses a deadlock or a serialization
failure to another writer (a poll's write) is run again a few times before that 503, because
eSMS does not send a push again after an answer. Each outcome is counted, and so are the rows the
pushes made final, by state (`esms_receiver_pushes_total{outcome}`,
`esms_receiver_resolved_total{state}` and more, worker.receiver_metrics); `GET /stats` shows the
same counters as JSON, summed over the workers. `GET /healthz` answers "ok" when the database
answers `SELECT 1` (checked at most once a second, however many probes), 503 with the reason
when not. The access log stays off: every URL carries the token and a phone number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import math
import os
import random
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.supervisors import Multiprocess

from worker import receiver_metrics, schema, store
from worker.receiver_metrics import ReceiverMetrics
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
    push that arrived meanwhile. Runs on the event loop; only the write leaves it. `on_written`
    hears what each batch wrote, how many pushes it held and how long its write took."""

    def __init__(
        self, write: WriteBatch, on_written: Callable[[Written, int, float], None]
    ) -> None:
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
                started = time.perf_counter()
                try:
                    results, totals = await anyio.to_thread.run_sync(self._write_isolated, records)
                    self._on_written(totals, len(records), time.perf_counter() - started)
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
    ping: Callable[[], None] | None = None,
    metrics: ReceiverMetrics | None = None,
) -> Starlette:
    """The receiver for `settings`. `write` replaces the database write and `ping` the health
    check's `SELECT 1` (unit tests; with `write` and no `ping`, /healthz checks nothing). Its
    counters are `metrics`, or new ones (in multiprocess mode when the supervisor set
    PROMETHEUS_MULTIPROC_DIR)."""
    expected = (
        settings.push_token.get_secret_value().encode() if settings.push_token is not None else None
    )
    if metrics is None:
        metrics = ReceiverMetrics(settings.prometheus_multiproc_dir)
    engine: Engine | None = None
    if write is None:
        # One writer thread: one connection, and one spare for the pool's ping and /healthz.
        engine = store.make_engine(settings, pool_size=2, application_name="esms-receiver")
        write = PushWriter(engine, on_retry=metrics.retries.inc)
        ping = ping or functools.partial(_select_one, engine)
    health = DatabaseHealth(ping) if ping is not None else None

    def on_written(written: Written, pushes: int, seconds: float) -> None:
        metrics.rows_changed.inc(written.changed)
        metrics.add_resolved(written.resolved)
        metrics.batch_pushes.observe(pushes)
        metrics.write_seconds.observe(seconds)

    batcher = Batcher(write, on_written)
    db_warned_at = -_DB_WARNING_EVERY_SECONDS
    db_failures = 0
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
        nonlocal db_warned_at, db_failures
        if not token_ok(request.path_params["token"]):
            metrics.count("bad_token")
            return _not_found()
        try:
            record = record_from_fields(await _fields(request), called_url(request))
        except MalformedPush as bad:
            metrics.count("malformed")
            return PlainTextResponse(str(bad), status_code=400)
        try:
            outcome = await batcher.submit(record)
        except SQLAlchemyError as error:
            metrics.count("db_unavailable")
            db_failures += 1
            now = time.monotonic()
            if now - db_warned_at >= _DB_WARNING_EVERY_SECONDS:
                db_warned_at = now
                log.warning(
                    "push not written, database unavailable (%d so far in process %d): %s",
                    db_failures,
                    os.getpid(),
                    type(error).__name__,
                )
            return PlainTextResponse("database unavailable", status_code=503)
        if outcome is PushOutcome.UNKNOWN:
            metrics.count("unknown")
            return PlainTextResponse("unknown SMSID")
        metrics.count("accepted")
        return PlainTextResponse("OK")

    async def healthz(request: Request) -> Response:
        problem = await health.problem() if health is not None else None
        if problem is not None:
            return PlainTextResponse(problem, status_code=503)
        return PlainTextResponse("ok")

    async def show_stats(request: Request) -> Response:
        # The same numbers /metrics serves, read from every worker's files: file reads, so off
        # the event loop.
        return JSONResponse(await anyio.to_thread.run_sync(metrics.snapshot))

    async def refused(request: Request, error: Exception) -> Response:
        # Unknown paths and methods look alike to a caller: there is nothing here.
        metrics.count("not_found")
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
        ],
        exception_handlers={HTTPException: refused},
        lifespan=lifespan,
    )
    # `/esms/callback/<token>/` must not answer with a redirect that names the token.
    app.router.redirect_slashes = False
    app.state.metrics = metrics
    return app


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


def app_from_environment() -> Starlette:
    """The app of one worker process: uvicorn's factory, called in each worker it starts."""
    return create_app(get_settings())


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, which says once when every first worker answers, and whether it
    stopped because it was asked to (SIGTERM, SIGINT) or because a worker could not start."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, announce: str) -> None:
        super().__init__(config, sockets=[sock])
        self._announce = announce
        self.asked_to_stop = False

    def init_processes(self) -> None:
        super().init_processes()
        timeout = self.config.timeout_worker_healthcheck * 6
        if all(p.wait_until_ready(timeout, self.should_exit) for p in self.processes):
            print(self._announce, flush=True)
        elif not self.should_exit.is_set():
            log.error("a worker did not start within %d s", timeout)
            self.should_exit.set()

    def handle_int(self) -> None:
        self.asked_to_stop = True
        super().handle_int()

    def handle_term(self) -> None:
        self.asked_to_stop = True
        super().handle_term()


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
        "--workers",
        "--processes",
        dest="workers",
        type=int,
        default=settings.receiver_workers or _default_workers(),
        help="worker processes sharing the socket (default RECEIVER_WORKERS, else one per CPU, "
        "at most 4); SIGTTIN and SIGTTOU add and remove one while it runs",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=settings.receiver_metrics_port,
        help="/metrics of all workers, on --host (default RECEIVER_METRICS_PORT; 0: off)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
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
    # Bound here, before the supervisor starts, so that a bad address is one clear line and the
    # port chosen for port 0 can be announced. IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY
    # only on sockets that say so, and without it every answer on a kept-alive connection waits
    # 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)
    except OSError as error:
        print(f"worker.receiver: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    # The workers' metric files: set before they start (they import prometheus_client then).
    directory, made_here = receiver_metrics.fresh_directory(settings.prometheus_multiproc_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        if args.metrics_port:
            try:
                metrics_port = receiver_metrics.serve(args.host, args.metrics_port, directory)
            except OSError as error:
                print(
                    f"worker.receiver: cannot serve metrics on {args.host}:{args.metrics_port}: "
                    f"{error}",
                    file=sys.stderr,
                )
                return 1
            shown = f"http://{shown_host}:{metrics_port}/metrics"
            print(f"push receiver metrics on {shown}", flush=True)
        config = uvicorn.Config(
            "worker.receiver:app_from_environment",
            factory=True,
            workers=args.workers,
            log_level="warning",
            access_log=False,
            server_header=False,
            # Behind a TLS proxy the scheme comes from X-Forwarded-Proto, trusted from the
            # addresses in FORWARDED_ALLOW_IPS (uvicorn's own variable; default 127.0.0.1).
            proxy_headers=True,
            timeout_graceful_shutdown=_GRACE_SECONDS,
        )
        port = sock.getsockname()[1]
        supervisor = _Supervisor(
            config, sock, f"push receiver listening on http://{shown_host}:{port}"
        )
        supervisor.run()
    finally:
        sock.close()
        if made_here:
            receiver_metrics.remove_directory(directory)
    return 0 if supervisor.asked_to_stop else 1


def _default_workers() -> int:
    # A worker is one Python process: the GIL keeps it (HTTP parsing is most of its work) to one
    # core, so one per core.
    return max(1, min(os.cpu_count() or 1, 4))


if __name__ == "__main__":
    sys.exit(main())
