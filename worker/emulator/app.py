"""The emulator's HTTP surface: eSMS's GetCallback route, the `/_emulator` admin API and /healthz.

Routes stay thin: the provider decides every GetCallback answer at arrival (provider.py) and the
route only sleeps the chosen delay, so many slow answers can be in flight at once. The admin API
lets tests register messages, read the truth they must end up with, audit the request log and
change knobs while the server runs. No route ever returns a SecretKey.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from worker.emulator.config import ConfigError, EmulatorConfig
from worker.emulator.provider import Provider
from worker.emulator.push import Pusher
from worker.emulator.registry import Registry
from worker.emulator.requestlog import RequestLog
from worker.emulator.truth import describe


class _AdminError(ValueError):
    """A malformed admin request; answered with HTTP 400."""


def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """A Starlette app emulating eSMS GetCallback with `config` (defaults when None)."""
    config = config or EmulatorConfig()
    config.validate()
    registry = Registry()
    log = RequestLog(config.request_log_path)
    provider = Provider(config, registry, log)
    pusher = Pusher(config, registry)
    registry.on_new = pusher.message_registered

    async def get_callback(request: Request) -> Response:
        reply = provider.answer(await request.body())
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        return Response(reply.body, reply.status, media_type=reply.media_type)

    async def register_messages(request: Request) -> Response:
        entries = (await _json_object(request)).get("messages")
        if not isinstance(entries, list):
            raise _AdminError('expected {"messages": [{"ref_id", "oa_id", "api_key"?}, ...]}')
        checked = [_message_spec(entry) for entry in entries]
        now = config.clock()
        knobs = config.truth_knobs()
        new = sum(registry.register(*spec, now, knobs) for spec in checked)
        known = len(checked) - new
        return JSONResponse({"registered": new, "known": known, "total": len(registry)})

    async def truth(request: Request) -> Response:
        now = config.clock()
        messages = {message.ref_id: describe(message, now) for message in registry}
        if pusher.enabled:
            for message in registry:
                entry = messages[message.ref_id]
                entry["pushed"] = message.pushed
                entry["pushes"] = pusher.describe(message.ref_id)
        return JSONResponse({"now": now, "messages": messages})

    async def pushes(request: Request) -> Response:
        deliveries = [
            {"ref_id": ref_id, **delivery.to_json()}
            for ref_id, each in pusher.deliveries.items()
            for delivery in each
        ]
        return JSONResponse({"pushes": deliveries, **pusher.stats()})

    async def requests(request: Request) -> Response:
        since = max(_int_param(request, "since", 0) or 0, 0)
        limit = _int_param(request, "limit", None)
        if limit is not None and limit < 0:
            raise _AdminError("limit must not be negative")
        with_refids = request.query_params.get("refids", "1") not in ("0", "false")
        entries = log.since(since, limit)
        return JSONResponse(
            {
                "requests": [entry.to_json(with_refids) for entry in entries],
                "next": since + len(entries),
            }
        )

    async def stats(request: Request) -> Response:
        summary = {**log.stats(config.rate_window_s), "messages": len(registry)}
        if pusher.enabled:
            summary["pushes"] = pusher.stats()
        return JSONResponse(summary)

    async def get_config(request: Request) -> Response:
        return JSONResponse(config.knobs())

    async def set_config(request: Request) -> Response:
        try:
            config.update(await _json_object(request))
        except ConfigError as error:
            raise _AdminError(str(error)) from None
        return JSONResponse(config.knobs())

    async def reset(request: Request) -> Response:
        provider.reset()
        pusher.clear()
        return JSONResponse({"ok": True})

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def admin_error(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": str(error)}, status_code=400)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pusher.start()
        yield
        await pusher.stop()
        log.close()

    app = Starlette(
        routes=[
            Route("/ZaloCallback/GetCallback", get_callback, methods=["POST"]),
            Route("/_emulator/messages", register_messages, methods=["POST"]),
            Route("/_emulator/truth", truth, methods=["GET"]),
            Route("/_emulator/requests", requests, methods=["GET"]),
            Route("/_emulator/stats", stats, methods=["GET"]),
            Route("/_emulator/pushes", pushes, methods=["GET"]),
            Route("/_emulator/config", get_config, methods=["GET"]),
            Route("/_emulator/config", set_config, methods=["POST"]),
            Route("/_emulator/reset", reset, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        exception_handlers={_AdminError: admin_error},
        lifespan=lifespan,
    )
    app.state.config = config
    return app


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _AdminError("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _AdminError("body must be a JSON object")
    return body


def _message_spec(entry: Any) -> tuple[str, str, str | None]:
    if not isinstance(entry, dict):
        raise _AdminError("each message must be an object")
    ref_id, oa_id, api_key = entry.get("ref_id"), entry.get("oa_id"), entry.get("api_key")
    if not isinstance(ref_id, str) or not ref_id or not isinstance(oa_id, str) or not oa_id:
        raise _AdminError(f"message needs non-empty string ref_id and oa_id: {entry!r}")
    if api_key is not None and not isinstance(api_key, str):
        raise _AdminError(f"api_key must be a string: {entry!r}")
    return ref_id, oa_id, api_key


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise _AdminError(f"{name} must be an integer") from None
