"""The eSMS GetCallback client: the only code that knows the provider's wire format.

`EsmsClient.get_callback` sends one request (one account, one OAId, at most the batch size of
RefIds) and returns the parsed records, or raises one of the errors in `worker.errors`. It never
retries and never sleeps: rate and retries are the scheduler's business. The SecretKey is unwrapped
only inside the request body and never reaches a log line, an exception or a repr.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal

import httpx
import msgspec

from worker.errors import (
    AccountRejected,
    MalformedResponse,
    OARejected,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
    RefIdsNotFound,
)
from worker.records import CallbackRecord, parse_callback_items
from worker.settings import Account

GET_CALLBACK_PATH = "/ZaloCallback/GetCallback"
CODE_SUCCESS = 100
CODE_TPS_EXCEEDED = 160
CODE_SMSID_NOT_FOUND = 105
ACCOUNT_CODES = {101: "wrong ApiKey/SecretKey", 140: "IP not whitelisted", 143: "account locked"}
OA_CODES = {204: "OAId does not exist", 799: "OAId inactive or not on the account"}
_BODY_SAMPLE = 120
# An idle connection is used again for at most this long. A poll may then hold it up to a
# second more for its rate slot (worker.poller): together under the 5 s after which Apache and
# uvicorn close an idle keep-alive connection.
KEEPALIVE_SECONDS = 3.0
# msgspec decodes an answer of 200 items in a third of the time of the json module; floats come
# as exact Decimals, as they are written, like json.loads(parse_float=Decimal).
_JSON = msgspec.json.Decoder(float_hook=Decimal)


class EsmsClient:
    """A pooled HTTP client for one provider base URL; share it across threads of one process."""

    def __init__(self, base_url: str, timeout_seconds: float, *, max_connections: int = 64) -> None:
        self._url = base_url.rstrip("/") + GET_CALLBACK_PATH
        self._timeout = timeout_seconds
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_seconds), limits=limits)

    def close(self) -> None:
        self._http.close()

    def get_callback(
        self,
        account: Account,
        oa_id: str,
        ref_ids: Sequence[str],
        before_send: Callable[[], object] | None = None,
    ) -> list[CallbackRecord]:
        """`before_send` runs when the connection is ready and the request's first byte is
        about to be written (the rate limiter's last word); whatever it raises ends the call
        with nothing sent. It may wait (for a later rate slot, holding the connection): that
        time is not the request's, and the deadline stands still meanwhile."""
        body = {
            "ApiKey": account.api_key.get_secret_value(),
            "SecretKey": account.secret_key.get_secret_value(),
            "ListRefid": list(ref_ids),
            "OAId": oa_id,
        }
        deadline = _RequestDeadline(self._timeout)
        extensions = {"trace": _call_before_headers(before_send, deadline)} if before_send else None
        try:
            with deadline.running():
                status_code, content = self._post(body, extensions, deadline)
        except _DeadlinePassed:
            raise ProviderUnavailable(f"no whole answer within {self._timeout:g}s") from None
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"timeout ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"transport error ({type(exc).__name__})") from None
        try:
            return parse_get_callback_response(status_code, content)
        except ProviderError as exc:
            # A provider that echoes the request in an error page must not put our keys into
            # a log line.
            exc.reason = _redact(exc.reason, body["ApiKey"], body["SecretKey"])
            exc.args = (exc.reason,)
            raise

    def _post(
        self, body: dict, extensions: dict | None, deadline: _RequestDeadline
    ) -> tuple[int, bytes]:
        """The answer's status and body, read as it comes: an answer that trickles in past the
        deadline is given up between two pieces (httpx's own timeouts bound each read only)."""
        with self._http.stream("POST", self._url, json=body, extensions=extensions) as response:
            chunks = []
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if deadline.passed():
                    raise _DeadlinePassed
            return response.status_code, b"".join(chunks)


class _DeadlinePassed(Exception):
    """The whole-request deadline passed."""


class _RequestDeadline:
    """One deadline for a whole request: connecting, sending and the whole answer, but not the
    time `before_send` waits. Under gevent (the worker) it interrupts whatever the request
    waits on at that very moment: the connection pool, connecting, sending, or a read.
    Elsewhere (tests, tools), `_post` checks it between the pieces of the answer, and httpx's
    per-read timeout bounds the wait for each piece."""

    def __init__(self, seconds: float) -> None:
        self._left = seconds
        self._since: float | None = None
        self._green = _gevent_sockets()
        self._timer = None

    @contextmanager
    def running(self) -> Iterator[None]:
        self._start()
        try:
            yield
        finally:
            self._stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._stop()
        try:
            yield
        finally:
            self._start()

    def passed(self) -> bool:
        return self._since is not None and time.monotonic() - self._since > self._left

    def _start(self) -> None:
        self._since = time.monotonic()
        if self._green:
            import gevent

            self._timer = gevent.Timeout(max(self._left, 0.001), _DeadlinePassed)
            self._timer.start()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._since is not None:
            self._left -= time.monotonic() - self._since
            self._since = None


def _gevent_sockets() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def _call_before_headers(
    before_send: Callable[[], object], deadline: _RequestDeadline
) -> Callable[[str, dict], None]:
    """An httpcore trace callback that runs `before_send` as the request headers are about to
    be written: after any connecting, with nothing left between it and the socket."""

    def trace(event: str, _info: dict) -> None:
        if event == "http11.send_request_headers.started":
            with deadline.paused():
                before_send()

    return trace


def _redact(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_BODY_SAMPLE]


def parse_get_callback_response(status_code: int, content: bytes) -> list[CallbackRecord]:
    """Records from a GetCallback answer, or the error that answer means."""
    if status_code == 429:
        raise RateLimited("HTTP 429")
    if status_code >= 500:
        raise ProviderUnavailable(f"HTTP {status_code}")
    payload = _decode_json(content, status_code)
    code = _result_code(payload)
    if code is None:
        raise MalformedResponse(f"HTTP {status_code}, no numeric Code in body")
    if code != CODE_SUCCESS:
        raise _error_for_code(code, payload)
    if status_code >= 400:
        raise MalformedResponse(f"HTTP {status_code} with Code {code}")
    items = payload.get("Data_callback")
    if items is None:
        # A .NET service serialises an empty list as null; with Code 100 that means "no
        # callback for any of these yet", which changes no data either way.
        return []
    if not isinstance(items, list):
        raise MalformedResponse(f"Data_callback is {type(items).__name__}, not an array")
    return parse_callback_items(items)


def _decode_json(content: bytes, status_code: int) -> dict:
    try:
        payload = _JSON.decode(content)
    except (ValueError, RecursionError):
        sample = _one_line(content[: _BODY_SAMPLE * 2].decode("utf-8", "replace"))
        raise MalformedResponse(f"HTTP {status_code}, body is not JSON: {sample!r}") from None
    if not isinstance(payload, dict):
        raise MalformedResponse(
            f"HTTP {status_code}, body is {type(payload).__name__}, not an object"
        )
    return payload


def _result_code(payload: dict) -> int | None:
    # The poll API sends `Code` as a number; sibling APIs send `CodeResult`/`CodeResponse` strings.
    for key in ("Code", "CodeResult", "CodeResponse"):
        value = payload.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, str | Decimal):
            try:
                return int(str(value).strip())
            except ValueError:
                continue
    return None


def _error_for_code(code: int, payload: dict) -> Exception:
    message = payload.get("Message")
    detail = f"Code {code}" + (f" ({_one_line(str(message))})" if message else "")
    if code == CODE_TPS_EXCEEDED:
        return RateLimited(detail, code=code)
    if code in ACCOUNT_CODES:
        return AccountRejected(f"{detail}: {ACCOUNT_CODES[code]}", code=code)
    if code in OA_CODES:
        return OARejected(f"{detail}: {OA_CODES[code]}", code=code)
    if code == CODE_SMSID_NOT_FOUND:
        return RefIdsNotFound(detail, code=code)
    return ProviderRejected(detail, code=code)
