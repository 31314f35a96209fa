"""GetCallback as the emulated eSMS answers it: checks, credentials, 20TPS, OAId, items, faults.

`Provider.answer` decides the whole reply, and writes the request-log entry, synchronously at the
moment the request arrives; the route then sleeps the chosen delay (latency, or a slow fault)
before sending. Deciding in one step on the event loop keeps arrival order, timestamps and the rate
window exact while hundreds of requests sleep concurrently, and keeps per-request CPU to a dict
lookup and a small computation per RefId.

Checks run in this order: JSON body (HTTP 400, Code 99) → ApiKey/SecretKey (101) → rate limit (160;
only requests with valid credentials count, and requests refused with 160 are logged but do not
take a place in the window, see ratelimit.py) → OAId (204 unknown or empty, 799 another account's) →
RefIds (the first max_refids, unknown ones auto-registered when enabled) → faults. Items show the
status at arrival time; RefIds registered under another OAId or account are omitted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from worker.emulator import faults
from worker.emulator.config import Account, EmulatorConfig
from worker.emulator.ratelimit import SlidingWindowLimiter
from worker.emulator.registry import Registry
from worker.emulator.requestlog import LogEntry, RequestLog
from worker.emulator.truth import Message, item_at, with_numbers_as_strings

_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """What the route sends, after sleeping `delay_s`."""

    status: int
    media_type: str
    body: bytes
    delay_s: float


@dataclass(frozen=True, slots=True)
class _Request:
    api_key: str
    secret_key: str
    refids: list[str]
    oa_id: str


class _BadRequest(Exception):
    """A malformed body; `api_key` is kept when readable so the log can attribute the request."""

    def __init__(self, reason: str, api_key: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.api_key = api_key


class Provider:
    """The emulated GetCallback endpoint, with its registry, rate windows and request log."""

    def __init__(self, config: EmulatorConfig, registry: Registry, log: RequestLog) -> None:
        self.config = config
        self.registry = registry
        self.log = log
        self._limiter = SlidingWindowLimiter()
        self._rng = random.Random(config.seed)
        self._accounts = {account.api_key: account for account in config.accounts}

    def reset(self) -> None:
        """Forget messages, the request log and the rate windows."""
        self.registry.clear()
        self.log.clear()
        self._limiter.clear()

    def answer(self, raw: bytes) -> Reply:
        config = self.config
        t = config.clock()
        try:
            request = _parse(raw)
        except _BadRequest as bad:
            entry = LogEntry(t, bad.api_key, None, 0, 0, 0, [], 99, 400)
            return self._send(entry, {"Code": 99, "Message": bad.reason})
        entry = LogEntry(
            t, request.api_key, request.oa_id, len(request.refids), 0, 0, [], None, 200
        )
        account = self._accounts.get(request.api_key)
        if account is None or account.secret_key != request.secret_key:
            return self._send_code(entry, 101)
        entry.admitted = self._limiter.admit(
            request.api_key, t, config.rate_limit, config.rate_window_s, config.count_refused
        )
        if not entry.admitted:
            entry.over_limit = True
            return self._send_code(entry, 160)
        oa_code = self._oa_code(account, request.oa_id)
        if oa_code is not None:
            return self._send_code(entry, oa_code)

        shown, not_found = self._read(request, entry, t)
        if not_found and config.not_found_code:
            entry.fault_detail = f"not found: {not_found}"
            return self._send_code(entry, 105)
        fault = entry.fault = faults.pick_request_fault(self._rng, config)
        if fault == "5xx":
            return self._send_mangled(entry, faults.server_error(self._rng))
        if fault == "code":
            return self._send_mangled(entry, faults.fault_code(self._rng, config))
        if fault == "broken_body":
            payload = _success([item for _, item in shown])
            return self._send_mangled(entry, faults.broken_body(self._rng, payload))
        if fault == "slow":  # a normal answer, sent too late
            items = [item for _, item in shown]
            entry.fault_detail = f"{config.slow_seconds:g}s"
        else:
            items, stale, duplicate = faults.mangle_items(self._rng, config, shown)
            counts = {"stale": stale, "duplicate": duplicate}
            happened = [name for name, count in counts.items() if count]
            if happened:
                entry.fault = "+".join(happened)
                entry.fault_detail = ",".join(f"{name}={counts[name]}" for name in happened)
        if config.numbers_as_strings_rate and self._rng.random() < config.numbers_as_strings_rate:
            entry.numbers_as_strings = True
            items = [with_numbers_as_strings(item) for item in items]
        entry.n_items = len(items)
        return self._send(entry, _success(items))

    def _read(
        self, request: _Request, entry: LogEntry, t: float
    ) -> tuple[list[tuple[Message, dict[str, Any]]], int]:
        """Visible (message, item) pairs for the RefIds read, registering new ones if enabled,
        and how many of the RefIds read are unknown or have no data yet."""
        config = self.config
        knobs = config.truth_knobs() if config.auto_register else None
        read: list[str] = []
        shown: list[tuple[Message, dict[str, Any]]] = []
        seen: set[str] = set()
        not_found = 0
        for ref_id in request.refids[: config.max_refids]:
            message = self.registry.get(ref_id)
            if message is None and knobs is not None:
                self.registry.register(ref_id, request.oa_id, request.api_key, t, knobs)
                message = self.registry.get(ref_id)
            if message is None:
                read.append(ref_id)
                not_found += 1
                continue
            read.append(message.ref_id)  # the registry's string: the log then costs a pointer
            if ref_id in seen or not _owned_by(message, request):
                continue
            seen.add(ref_id)
            item = item_at(message, t)
            if item is not None:
                shown.append((message, item))
            elif t < message.visible_at or message.final_item is None:
                not_found += 1  # not queryable yet, or never (sent without CallbackUrl)
        entry.refids = read
        entry.n_read = len(read)
        return shown, not_found

    def _oa_code(self, account: Account, oa_id: str) -> int | None:
        if not oa_id:
            return 204
        if account.oa_ids is None or oa_id in account.oa_ids:
            return None
        if any(oa_id in (other.oa_ids or ()) for other in self._accounts.values()):
            return 799
        return 204

    def _send_code(self, entry: LogEntry, code: int) -> Reply:
        return self._send(entry, {"Code": code, "Message": faults.CODE_MESSAGES[code]})

    def _send(self, entry: LogEntry, payload: dict[str, Any]) -> Reply:
        entry.code = payload["Code"]
        return self._finish(entry, _JSON, faults.encode_json(payload))

    def _send_mangled(self, entry: LogEntry, mangled: faults.Mangled) -> Reply:
        entry.code, entry.http_status = mangled.code, mangled.status
        entry.fault_detail = mangled.detail
        return self._finish(entry, mangled.media_type, mangled.body)

    def _finish(self, entry: LogEntry, media_type: str, body: bytes) -> Reply:
        """Pick the delay, log the request, and hand the reply to the route."""
        config = self.config
        if entry.fault == "slow":
            delay = config.slow_seconds
        elif config.latency_max_ms > 0:
            delay = self._rng.uniform(config.latency_min_ms, config.latency_max_ms) / 1000
        else:
            delay = 0.0
        entry.delay_ms = round(delay * 1000, 3)
        self.log.append(entry)
        return Reply(entry.http_status, media_type, body, delay)


def _success(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Code": 100, "Message": "Success", "Data_callback": items}


def _owned_by(message: Message, request: _Request) -> bool:
    if message.oa_id != request.oa_id:
        return False
    return message.api_key is None or message.api_key == request.api_key


def _parse(raw: bytes) -> _Request:
    try:
        data = json.loads(raw)
    except ValueError:
        raise _BadRequest("Request body is not valid JSON", None) from None
    if not isinstance(data, dict):
        raise _BadRequest("Request body must be a JSON object", None)
    api_key = data.get("ApiKey") if isinstance(data.get("ApiKey"), str) else None
    missing = [name for name in ("ApiKey", "SecretKey", "ListRefid", "OAId") if name not in data]
    if missing:
        raise _BadRequest(f"Missing required fields: {', '.join(missing)}", api_key)
    refids = data["ListRefid"]
    if not all(isinstance(data[name], str) for name in ("ApiKey", "SecretKey", "OAId")):
        raise _BadRequest("ApiKey, SecretKey and OAId must be strings", api_key)
    if not isinstance(refids, list) or not all(isinstance(ref, str) for ref in refids):
        raise _BadRequest("ListRefid must be a list of strings", api_key)
    return _Request(data["ApiKey"], data["SecretKey"], refids, data["OAId"])
