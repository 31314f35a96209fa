"""Command line: serve the emulator on loopback until SIGTERM or SIGINT.

    python -m worker.emulator [--host 127.0.0.1] [--port 8099]
        [--account API_KEY:SECRET_KEY[:OA1,OA2]]... [--request-log PATH] [--push-url URL]
        [--<knob> VALUE]...

Every knob of EmulatorConfig has a flag of the same name with dashes (`--latency-min-ms 250`,
`--no-auto-register`, `--fault-codes 99,105`). Once the socket accepts connections the command
prints exactly one line, "eSMS emulator listening on http://HOST:PORT" (with `--port 0` the port is
the one the OS picked), so scripts can wait for it. SIGTERM and SIGINT stop it gracefully: in-flight
answers get a short grace period, the request log is closed, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from worker.emulator.app import create_app
from worker.emulator.config import KNOBS, Account, ConfigError, EmulatorConfig, parse_account

# Slow-fault answers sleep far beyond any client timeout; shutdown should not wait for them.
_GRACE_SECONDS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esms-emulator", description="Emulate eSMS.vn's Zalo ZNS GetCallback API on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8099, help="port to bind, 0 for any free one")
    parser.add_argument(
        "--account",
        action="append",
        type=_account,
        metavar="API_KEY:SECRET_KEY[:OA1,OA2]",
        help="an accepted account, repeatable (default demo-key:demo-secret, any OA)",
    )
    parser.add_argument("--request-log", metavar="PATH", help="also write the log as JSON lines")
    parser.add_argument(
        "--push-url",
        metavar="URL",
        help="push the status changes of --push-rate of the messages here, as eSMS does",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")
    knobs = parser.add_argument_group("knobs (also settable at runtime: POST /_emulator/config)")
    for knob in KNOBS:
        flag = "--" + knob.name.replace("_", "-")
        help_text = f"{knob.metadata['help']} (default {_show(knob.default)})"
        options: dict[str, Any] = {"dest": knob.name, "default": None, "help": help_text}
        if isinstance(knob.default, bool):
            knobs.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif isinstance(knob.default, tuple):
            knobs.add_argument(flag, type=_codes, metavar="CODE,CODE", **options)
        else:
            knobs.add_argument(flag, type=type(knob.default), **options)
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """The EmulatorConfig the parsed flags describe; raises ConfigError when it is inconsistent."""
    given = {knob.name: getattr(args, knob.name) for knob in KNOBS}
    extra: dict[str, Any] = {"request_log_path": args.request_log, "push_url": args.push_url}
    if args.account:
        extra["accounts"] = tuple(args.account)
    config = EmulatorConfig(**extra, **{k: v for k, v in given.items() if v is not None})
    config.validate()
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        print(f"esms-emulator: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    # Arrival stamps are what the rate audit reads. A full collection over a registry of 100,000
    # messages stalls the loop for a noticeable fraction of a second, and every request that
    # arrives meanwhile would be stamped at the end of the stall, bunched together.
    gc.set_threshold(50_000, 50, 1_000)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=_GRACE_SECONDS,
        )
    )

    # Installed before the loop starts so an early signal is a clean stop too. While serving,
    # uvicorn swaps in its own handlers, then restores these and re-raises the signal it caught:
    # these handlers absorb it, so a requested stop exits 0 instead of dying by the signal.
    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    asyncio.run(_serve(server, sock, args.host))
    return 0 if server.started else 1


async def _serve(server: uvicorn.Server, sock: socket.socket, host: str) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        shown_host = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]
        print(f"eSMS emulator listening on http://{shown_host}:{port}", flush=True)
    await serving


def _account(spec: str) -> Account:
    try:
        return parse_account(spec)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _codes(spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(code) for code in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {spec!r}") from None


def _show(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


if __name__ == "__main__":
    sys.exit(main())
