"""The emulator's push: what eSMS does with a CallbackUrl, at each status change of a message.

Messages drawn as `pushed` (a `push_rate` fraction, see truth.py) have `--push-url` as their
CallbackUrl. At each of their status changes (visible with SendStatus 2, handed to the carrier
with 7, final) the emulator sends one GET to that URL with the item as query parameters, in
eSMS's names and case (`SMSID, SendFailed, SendStatus, ..., TypeId, telcoid, phonenumber,
partnerids, error_info, oaid, tempid`; a null field is sent empty, `RequestId=`, as eSMS's
sample does). ErrorInfo goes in whichever of
its documented forms the message drew, URL-encoded once more for the query string. A push that
gets no answer within `push_timeout_s` (a timeout, or no connection at all) is sent again, at
most 5 more times; any HTTP answer ends it, as eSMS documents.

One asyncio task on the server's loop sleeps until the next change is due, so a registry of many
thousands of messages costs nothing between changes; each delivery is its own task, at most
`MAX_IN_FLIGHT` at once, over kept-alive connections of a small HTTP/1.1 client written for this
(a general client costs several milliseconds of CPU per request, which caps the pushes at a
couple of hundred per second on a small machine). Every delivery is recorded (status, when the
change happened, first sent, answered, attempts, HTTP status) for `GET /_emulator/truth` and
`/_emulator/pushes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from worker.emulator.config import EmulatorConfig
from worker.emulator.registry import Registry
from worker.emulator.truth import STATUS_AT_CARRIER, STATUS_WAITING, Message, item_at

# GetCallback item name -> push query name, in the order the provider documents them.
PUSH_FIELDS = (
    ("SMSID", "SMSID"),
    ("SendFailed", "SendFailed"),
    ("SendStatus", "SendStatus"),
    ("SendSuccess", "SendSuccess"),
    ("TotalPrice", "TotalPrice"),
    ("TotalReceiver", "TotalReceiver"),
    ("TotalSent", "TotalSent"),
    ("RequestId", "RequestId"),
    ("TypeId", "TypeId"),
    ("Telcoid", "telcoid"),
    ("PhoneNumber", "phonenumber"),
    ("Partnerids", "partnerids"),
    ("ErrorInfo", "error_info"),
    ("OAId", "oaid"),
    ("ZnsTempId", "tempid"),
)
RETRIES = 5
# Seconds before each retry; eSMS does not say, so a short doubling wait.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
MAX_IN_FLIGHT = 256
_MAX_HEADER_LINES = 100


class NoAnswer(Exception):
    """The push got no HTTP answer: refused, reset, timed out or garbled. eSMS sends it again."""


class PushClient:
    """GET over HTTP/1.1 keep-alive connections to the one origin of `base_url`."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._tls else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, url: str, timeout: float) -> int:
        """The HTTP status of GET `url` (same origin as `base_url`); raises NoAnswer."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            "User-Agent: esms-emulator-push\r\nAccept: */*\r\n\r\n"
        ).encode("ascii")
        try:
            async with asyncio.timeout(timeout):
                while self._idle:
                    # A kept-alive connection the server has closed meanwhile fails at once;
                    # that is not the push's fault, so it goes again on a fresh one.
                    connection = self._idle.pop()
                    with contextlib.suppress(OSError, EOFError, ValueError):
                        return await self._exchange(connection, request)
                connection = await asyncio.open_connection(self._host, self._port, ssl=self._tls)
                return await self._exchange(connection, request)
        except (TimeoutError, OSError, EOFError, ValueError) as error:
            raise NoAnswer(type(error).__name__) from None

    async def _exchange(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> int:
        reader, writer = connection
        try:
            writer.write(request)
            status_line = await reader.readline()
            if not status_line:
                raise EOFError("connection closed")
            version, status, *_ = status_line.decode("latin-1").split(" ", 2)
            if not version.startswith("HTTP/1."):
                raise ValueError("not an HTTP/1 answer")
            length, chunked, close = None, False, version == "HTTP/1.0"
            for _ in range(_MAX_HEADER_LINES):
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding":
                    chunked = "chunked" in value
                elif name == "connection":
                    close = "close" in value
            if chunked:
                while size := int((await reader.readline()).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readline()
            elif length is not None:
                await reader.readexactly(length)
            else:
                await reader.read()
                close = True
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self._idle.append(connection)
        return int(status)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


@dataclass(slots=True)
class Delivery:
    """One status change of one message, and what became of its push."""

    ref_id: str
    send_status: int
    changed_at: float  # when the status changed at the emulated provider
    sent_at: float | None = None  # first attempt
    answered_at: float | None = None
    attempts: int = 0
    http_status: int | None = None
    gave_up: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "send_status": self.send_status,
            "changed_at": self.changed_at,
            "sent_at": self.sent_at,
            "answered_at": self.answered_at,
            "attempts": self.attempts,
            "http_status": self.http_status,
            "gave_up": self.gave_up,
        }


def status_changes(message: Message) -> list[tuple[float, int]]:
    """(time, SendStatus) of each change a pushed message goes through, in order."""
    final = message.final_item
    if final is None:
        return []
    changes: list[tuple[float, int]] = []
    if message.visible_at < message.final_at:
        changes.append((message.visible_at, STATUS_WAITING))
        if message.carrier_at is not None:
            changes.append((message.carrier_at, STATUS_AT_CARRIER))
    changes.append((max(message.final_at, message.visible_at), final["SendStatus"]))
    return changes


def push_query(item: dict[str, Any]) -> str:
    """The item as eSMS's push query string: its names, every value as text, a null as an empty
    value (eSMS's own sample ends in `partnerids=`)."""
    pairs = [(name, _as_text(item.get(key))) for key, name in PUSH_FIELDS]
    return urlencode(pairs, quote_via=quote)


def push_target(base_url: str, item: dict[str, Any]) -> str:
    return f"{base_url}{'&' if '?' in base_url else '?'}{push_query(item)}"


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


class Pusher:
    """Schedules and sends the pushes of the registry's pushed messages."""

    def __init__(self, config: EmulatorConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self._due: list[tuple[float, int, str, int]] = []  # (time, seq, ref_id, SendStatus)
        self._seq = itertools.count()
        self.deliveries: dict[str, list[Delivery]] = {}
        self._counts: Counter[str] = Counter()
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._client: PushClient | None = None

    @property
    def enabled(self) -> bool:
        return self.config.push_url is not None

    def message_registered(self, ref_id: str) -> None:
        """Registry hook: schedule the changes of `ref_id` if it is pushed."""
        if not self.enabled or self.config.push_rate <= 0:
            return
        message = self.registry.get(ref_id)
        if message is None or not message.pushed:
            return
        earliest = self._due[0][0] if self._due else None
        for at, status in status_changes(message):
            heapq.heappush(self._due, (at, next(self._seq), ref_id, status))
        self._counts["scheduled"] += 1
        if self._wake is not None and (earliest is None or self._due[0][0] < earliest):
            self._wake.set()

    def take_due(self, now: float) -> list[Delivery]:
        """Remove and return the changes due at `now`, each as a new, recorded Delivery."""
        taken = []
        while self._due and self._due[0][0] <= now:
            at, _, ref_id, status = heapq.heappop(self._due)
            delivery = Delivery(ref_id, status, at)
            self.deliveries.setdefault(ref_id, []).append(delivery)
            taken.append(delivery)
        return taken

    def clear(self) -> None:
        self._due.clear()
        self.deliveries.clear()
        self._counts.clear()

    def describe(self, ref_id: str) -> list[dict[str, Any]]:
        return [delivery.to_json() for delivery in self.deliveries.get(ref_id, ())]

    def stats(self) -> dict[str, Any]:
        return {
            **{key: self._counts[key] for key in ("scheduled", "sent", "answered", "gave_up")},
            "attempts": self._counts["attempts"],
            "by_http_status": {
                key.split(":", 1)[1]: count
                for key, count in sorted(self._counts.items())
                if key.startswith("http:")
            },
            "waiting": len(self._due),
            "in_flight": len(self._sending),
        }

    async def start(self) -> None:
        if not self.enabled:
            return
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        assert self.config.push_url is not None
        self._client = PushClient(self.config.push_url)
        self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [task for task in (self._runner, *self._sending) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            self._client.close()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            for delivery in self.take_due(self.config.clock()):
                task = asyncio.create_task(self._deliver(delivery))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            wait = self._due[0][0] - self.config.clock() if self._due else None
            if wait is not None and wait <= 0:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _deliver(self, delivery: Delivery) -> None:
        assert self._client is not None and self._slots is not None
        message = self.registry.get(delivery.ref_id)
        base_url = self.config.push_url
        item = None if message is None else item_at(message, delivery.changed_at)
        if item is None or base_url is None:  # reset meanwhile
            return
        url = push_target(base_url, item)
        clock = self.config.clock
        for attempt in range(RETRIES + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS[attempt - 1])
            async with self._slots:
                delivery.attempts += 1
                self._counts["attempts"] += 1
                if delivery.sent_at is None:
                    delivery.sent_at = clock()
                    self._counts["sent"] += 1
                try:
                    status = await self._client.get(url, timeout=self.config.push_timeout_s)
                except NoAnswer:
                    continue
            delivery.answered_at = clock()
            delivery.http_status = status
            self._counts["answered"] += 1
            self._counts[f"http:{status}"] += 1
            return
        delivery.gave_up = True
        self._counts["gave_up"] += 1
