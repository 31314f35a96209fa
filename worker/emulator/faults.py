"""The ways the emulated provider misbehaves, chosen per request or per item from the fault knobs.

Request-level faults are mutually exclusive: one draw per request against the cumulative rates of
"5xx", "slow", "broken_body" and "code", so each happens at exactly its rate. Item-level faults
("stale", "duplicate") apply only to otherwise normal answers. The request log names the fault kind
in `fault` and the variant in `fault_detail` (HTTP status, broken-body shape, Code, item counts).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from worker.emulator.config import EmulatorConfig
from worker.emulator.truth import STATUS_WAITING, Message, waiting_item

# Messages eSMS attaches to its result codes (esms-api-facts.md).
CODE_MESSAGES = {
    99: "Unknown error",
    101: "Authorize Failed",
    103: "Balance not enough",
    105: "SMSID not found",
    140: "IP not allowed",
    143: "Account is locked",
    160: "TPS limit exceeded",
    204: "OAID does not exist",
    799: "OAID is inactive or not added to this account",
}

_SERVER_ERRORS = (
    (500, "text/plain; charset=utf-8", "Internal Server Error"),
    (
        502,
        "text/html",
        "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n",
    ),
    (
        503,
        "text/html; charset=us-ascii",
        '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN">\r\n<HTML><HEAD>'
        "<TITLE>Service Unavailable</TITLE></HEAD>\r\n<BODY><h2>Service Unavailable</h2>\r\n"
        "<hr><p>HTTP Error 503. The service is unavailable.</p>\r\n</BODY></HTML>\r\n",
    ),
)
# An ASP.NET error page served with HTTP 200, as some gateways do.
_HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\r\n<html><head><title>Runtime Error</title></head><body>"
    "<h1>Server Error in '/' Application.</h1><h2><i>Runtime Error</i></h2></body></html>\r\n"
)
BROKEN_BODY_SHAPES = ("truncated", "html", "null_data", "missing_data")


@dataclass(frozen=True, slots=True)
class Mangled:
    """A faulted answer: what to send and what to log about it."""

    status: int
    media_type: str
    body: bytes
    code: int | None  # the Code the body carries, None when it carries none
    detail: str


def pick_request_fault(rng: random.Random, config: EmulatorConfig) -> str | None:
    """One draw against the cumulative request-fault rates."""
    point = rng.random()
    for name, rate in config.request_fault_rates().items():
        if point < rate:
            return name
        point -= rate
    return None


def server_error(rng: random.Random) -> Mangled:
    status, media_type, text = rng.choice(_SERVER_ERRORS)
    return Mangled(status, media_type, text.encode(), None, str(status))


def fault_code(rng: random.Random, config: EmulatorConfig) -> Mangled:
    code = rng.choice(config.fault_codes)
    body = {"Code": code, "Message": CODE_MESSAGES.get(code, "Error")}
    return Mangled(200, "application/json", encode_json(body), code, str(code))


def broken_body(rng: random.Random, payload: dict[str, Any]) -> Mangled:
    shape = rng.choice(BROKEN_BODY_SHAPES)
    match shape:
        case "truncated":
            whole = encode_json(payload)
            return Mangled(200, "application/json", whole[: len(whole) // 2], None, shape)
        case "html":
            return Mangled(200, "text/html; charset=utf-8", _HTML_ERROR_PAGE.encode(), None, shape)
        case "null_data":
            body = {**payload, "Data_callback": None}
        case _:  # "missing_data"
            body = {key: value for key, value in payload.items() if key != "Data_callback"}
    return Mangled(200, "application/json", encode_json(body), payload["Code"], shape)


def mangle_items(
    rng: random.Random, config: EmulatorConfig, shown: list[tuple[Message, dict[str, Any]]]
) -> tuple[list[dict[str, Any]], int, int]:
    """Items with stale and duplicate faults applied, and how many of each happened.

    Stale: a final item is replaced by the message's waiting item (SendStatus 2). Duplicate: an
    item past waiting gets a waiting-status twin, placed before or after it.
    """
    items: list[dict[str, Any]] = []
    stale = duplicate = 0
    for message, item in shown:
        if config.fault_stale_rate and item is message.final_item:
            if rng.random() < config.fault_stale_rate:
                item = waiting_item(message)
                stale += 1
        if config.fault_duplicate_rate and item["SendStatus"] != STATUS_WAITING:
            if rng.random() < config.fault_duplicate_rate:
                twin = waiting_item(message)
                items.extend((twin, item) if rng.random() < 0.5 else (item, twin))
                duplicate += 1
                continue
        items.append(item)
    return items, stale, duplicate


def encode_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()
