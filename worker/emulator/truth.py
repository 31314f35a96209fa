"""Deterministic life of one Zalo ZNS message, as the emulator tells it.

Everything about a message (outcome, timings, phone, price, ErrorInfo text) is read from a
SHAKE-256 stream keyed by (seed, ref_id), so two processes with the same seed tell the same story;
only the absolute times and the date inside a dated ErrorInfo also depend on the registration time.
Every draw is taken in a fixed order whatever the outcome, so changing one rate does not reshuffle
the phones or prices of other messages.

A message's life, from its registration: nothing before `visible_at` (the RefId is omitted), then
SendStatus 2 (waiting), for most delivered or failed messages SendStatus 7 (handed to the carrier)
from `carrier_at`, and the final item from `final_at`. Messages "sent without CallbackUrl" never
have data. `final_item` is the item exactly as the poller should end up storing it (numbers as
numbers). With a push URL configured, a `push_rate` fraction of messages were "sent" with that
URL as CallbackUrl (`pushed`): push.py calls it at each of their status changes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, TypeVar, assert_never
from urllib.parse import quote

# The order of the provider's sample; the emulator never sends other fields.
ITEM_FIELDS = (
    "SMSID", "SendFailed", "SendSuccess", "SendStatus", "TotalPrice", "TotalReceiver", "TotalSent",
    "RequestId", "TypeId", "Telcoid", "PhoneNumber", "CallbackUrl", "Partnerids", "ErrorInfo",
    "OAId", "ZnsTempId",
)  # fmt: skip
NUMERIC_FIELDS = (
    "SendFailed", "SendSuccess", "SendStatus", "TotalPrice", "TotalReceiver", "TotalSent",
    "TypeId", "Telcoid",
)  # fmt: skip

STATUS_WAITING = 2
STATUS_REJECTED = 4
STATUS_DONE = 5
STATUS_AT_CARRIER = 7


class Outcome(StrEnum):
    """Final state of a message, named as the poller names it."""

    SENT = "sent"
    FAILED = "failed"
    REJECTED = "rejected"
    NO_CALLBACK = "no_callback"


class ErrorForm(StrEnum):
    """The shapes of ErrorInfo seen in eSMS's docs (see esms-api-facts.md)."""

    DOTNET = "dotnet"  # Zalo JSON glued to a .NET exception text: the provider's own sample
    JSON = "json"
    QUOTED = "quoted"  # the JSON text, quoted and escaped as a JSON string
    URLENCODED_TWICE = "urlencoded_twice"
    DATED = "dated"  # JSON followed by ____dd/MM/yyyy HH:mm:ss (Vietnam time)
    TEXT = "text"  # Vietnamese sentence, no code
    EMPTY = "empty"


@dataclass(frozen=True, slots=True)
class TruthKnobs:
    """The settings a message's life depends on; frozen into the message when it is registered."""

    seed: int = 0
    visible_after_s: float = 0.0
    final_after_min_s: float = 2.0
    final_after_max_s: float = 10.0
    success_rate: float = 0.85
    rejected_rate: float = 0.02
    no_callback_rate: float = 0.0
    templates_per_oa: int = 20
    push_url: str | None = None
    push_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Message:
    """One registered RefId and its whole life. `final_item` is shared: copy before changing."""

    ref_id: str
    oa_id: str
    api_key: str | None  # None: any account may read it (registered by the admin API without one)
    registered_at: float
    outcome: Outcome
    visible_at: float
    carrier_at: float | None  # None: goes from waiting straight to final
    final_at: float
    final_item: dict[str, Any] | None  # None only for NO_CALLBACK
    error_code: int | None  # the Zalo code a parser can read from ErrorInfo, None if it has none
    error_form: ErrorForm | None
    pushed: bool = False  # its CallbackUrl is the emulator's push URL: each change is pushed


_TELCOS = ((1, 0.40), (2, 0.20), (3, 0.20), (4, 0.06), (5, 0.03), (6, 0.04), (7, 0.04), (9, 0.03))
_TYPE_IDS = ((24, 0.35), (25, 0.60), (26, 0.05))
_PRICES = (220.0, 300.0, 385.5, 440.0)
_CALLBACK_URLS = (
    "https://api.esms.vn/zalo-zns/zns/receive-callback",
    "https://shop.example.vn/esms/zns-callback",
    "https://crm.example.com/hooks/esms?source=zns",
)
_FAILURE_CODES = ((-124, 0.2), (-108, 0.2), (-114, 0.25), (-118, 0.2), (-137, 0.05), (-100, 0.1))
_REJECTION_CODES = ((-109, 0.7), (-137, 0.3))
_FORMS = tuple((form, 1 / len(ErrorForm)) for form in ErrorForm)
_ZALO_MESSAGES = {
    0: "Success",
    -100: "Unknown error",
    -108: "Phone number is invalid",
    -109: "Template id is invalid",
    -114: "User is inactive, has rejected the message or uses an old Zalo version",
    -118: "Zalo account does not exist or has been disabled",
    -124: "Access token is invalid",
    -137: "Payment for ZNS failed",
}
_VIETNAMESE_MESSAGES = {
    -100: "Lỗi không xác định, vui lòng thử lại sau",
    -108: "Số điện thoại không hợp lệ",
    -109: "Mã template không hợp lệ",
    -114: "Người dùng không nhận được tin do không hoạt động hoặc đã từ chối nhận tin",
    -118: "Số điện thoại chưa đăng ký tài khoản Zalo",
    -124: "Access token không hợp lệ",
    -137: "Thanh toán phí ZNS thất bại",
}
# Compact, as Zalo writes it; rendered once because registration must stay cheap.
_ZALO_JSON = {
    code: json.dumps({"error": code, "message": text}, separators=(",", ":"))
    for code, text in _ZALO_MESSAGES.items()
}
_DOTNET_TAIL = "Object reference not set to an instance of an object."
_VIETNAM = timezone(timedelta(hours=7))
_WORDS = 24
_TWO_POW_MINUS_53 = 2.0**-53

T = TypeVar("T")


class _Draws:
    """Reads uniform numbers and hex ids, in order, from SHAKE-256 of (seed, ref_id)."""

    def __init__(self, seed: int, ref_id: str) -> None:
        raw = hashlib.shake_256(f"{seed}:{ref_id}".encode()).digest(8 * _WORDS)
        self._words = struct.unpack(f">{_WORDS}Q", raw)
        self._pos = 0

    def word(self) -> int:
        self._pos += 1
        return self._words[self._pos - 1]

    def unit(self) -> float:
        return (self.word() >> 11) * _TWO_POW_MINUS_53

    def hex(self, length: int) -> str:
        return f"{self.word():016x}{self.word():016x}"[:length]

    def weighted(self, table: tuple[tuple[T, float], ...]) -> T:
        point = self.unit()
        for value, weight in table:
            point -= weight
            if point < 0:
                return value
        return table[-1][0]


def _template(oa_id: str, point: float, per_oa: int) -> str:
    """The ZnsTempId of a message drawn at `point` (0..1): one of the OA's `per_oa` approved
    templates (an OA sends from a few dozen at most), or with `per_oa` 0 any of 100,000."""
    if per_oa <= 0:
        return str(200000 + int(point * 100000))
    first = zlib.crc32(oa_id.encode()) % 100000
    return str(200000 + (first + int(point * per_oa) * 7919) % 100000)


def decide(
    ref_id: str, oa_id: str, api_key: str | None, registered_at: float, knobs: TruthKnobs
) -> Message:
    """The whole life of `ref_id`, registered under `oa_id` at `registered_at` (unix time)."""
    draws = _Draws(knobs.seed, ref_id)
    no_callback = draws.unit() < knobs.no_callback_rate
    outcome_point = draws.unit()
    final_point = draws.unit()
    has_carrier_stage = draws.unit() < 0.7
    carrier_fraction = 0.3 + 0.4 * draws.unit()
    has_request_id = draws.unit() < 0.5
    request_id = f"req-{draws.hex(12)}"
    static = {
        "RequestId": request_id if has_request_id else None,
        "TypeId": draws.weighted(_TYPE_IDS),
        "Telcoid": draws.weighted(_TELCOS),
        "PhoneNumber": f"0{'35789'[int(draws.unit() * 5)]}{int(draws.unit() * 1e8):08d}",
        "CallbackUrl": _CALLBACK_URLS[int(draws.unit() * len(_CALLBACK_URLS))],
        "Partnerids": draws.hex(20),
        "ZnsTempId": _template(oa_id, draws.unit(), knobs.templates_per_oa),
    }
    price = _PRICES[int(draws.unit() * len(_PRICES))]
    success_has_json = draws.unit() < 0.6
    failure_code = draws.weighted(_FAILURE_CODES)
    rejection_code = draws.weighted(_REJECTION_CODES)
    form = draws.weighted(_FORMS)
    push_point = draws.unit()

    if no_callback:
        outcome = Outcome.NO_CALLBACK
    elif outcome_point < knobs.success_rate:
        outcome = Outcome.SENT
    elif outcome_point < knobs.success_rate + knobs.rejected_rate:
        outcome = Outcome.REJECTED
    else:
        outcome = Outcome.FAILED

    # Sent with the receiver as CallbackUrl: GetCallback then reports that URL too.
    pushed = (
        knobs.push_url is not None
        and outcome is not Outcome.NO_CALLBACK
        and push_point < knobs.push_rate
    )
    if pushed:
        static["CallbackUrl"] = knobs.push_url

    span = knobs.final_after_max_s - knobs.final_after_min_s
    final_at = registered_at + knobs.final_after_min_s + final_point * span
    visible_at = registered_at + knobs.visible_after_s
    carrier_at = None
    if has_carrier_stage and outcome in (Outcome.SENT, Outcome.FAILED) and final_at > visible_at:
        carrier_at = visible_at + (final_at - visible_at) * carrier_fraction

    error_code: int | None
    if outcome is Outcome.NO_CALLBACK:
        final_item, error_code, error_form = None, None, None
    elif outcome is Outcome.SENT:
        error_form = ErrorForm.JSON if success_has_json else ErrorForm.EMPTY
        error_info, error_code = _render_error(0, error_form, final_at)
        final_item = _item(ref_id, oa_id, static, STATUS_DONE, 1, 0, 1, price, error_info)
    else:
        code = failure_code if outcome is Outcome.FAILED else rejection_code
        error_info, error_code = _render_error(code, form, final_at)
        error_form = form
        if outcome is Outcome.FAILED:
            final_item = _item(ref_id, oa_id, static, STATUS_DONE, 0, 1, 1, 0.0, error_info)
        else:
            # Rejected by eSMS before reaching Zalo: nothing sent, no Zalo message id.
            static = {**static, "Partnerids": ""}
            final_item = _item(ref_id, oa_id, static, STATUS_REJECTED, 0, 1, 0, 0.0, error_info)

    return Message(
        ref_id=ref_id,
        oa_id=oa_id,
        api_key=api_key,
        registered_at=registered_at,
        outcome=outcome,
        visible_at=visible_at,
        carrier_at=carrier_at,
        final_at=final_at,
        final_item=final_item,
        error_code=error_code,
        error_form=error_form,
        pushed=pushed,
    )


def item_at(message: Message, now: float) -> dict[str, Any] | None:
    """The Data_callback item the provider shows at `now`, or None when the RefId is omitted."""
    final = message.final_item
    if final is None or now < message.visible_at:
        return None
    if now >= message.final_at:
        return final
    if message.carrier_at is not None and now >= message.carrier_at:
        return _in_progress(final, STATUS_AT_CARRIER)
    return _in_progress(final, STATUS_WAITING)


def waiting_item(message: Message) -> dict[str, Any]:
    """The item as it looked while the message waited (SendStatus 2): what stale answers show."""
    if message.final_item is None:
        raise ValueError(f"{message.ref_id} never has callback data")
    return _in_progress(message.final_item, STATUS_WAITING)


def state_at(message: Message, now: float) -> str:
    """'pending' until the final status, then the outcome ('no_callback' from the start)."""
    if message.outcome is Outcome.NO_CALLBACK or now >= message.final_at:
        return message.outcome.value
    return "pending"


def describe(message: Message, now: float) -> dict[str, Any]:
    """The truth about one message at `now`, as GET /_emulator/truth reports it."""
    never = message.outcome is Outcome.NO_CALLBACK
    return {
        "oa_id": message.oa_id,
        "api_key": message.api_key,
        "registered_at": message.registered_at,
        "visible_at": None if never else message.visible_at,
        "carrier_at": message.carrier_at,
        "final_at": None if never else message.final_at,
        "state": state_at(message, now),
        "final_state": message.outcome.value,
        "item": message.final_item,
        "error_code": message.error_code,
        "error_form": None if message.error_form is None else message.error_form.value,
    }


def with_numbers_as_strings(item: dict[str, Any]) -> dict[str, Any]:
    """The same item with every numeric field sent as a string ("5", "0.0")."""
    return {key: str(value) if key in NUMERIC_FIELDS else value for key, value in item.items()}


def _item(
    ref_id: str,
    oa_id: str,
    static: dict[str, Any],
    status: int,
    success: int,
    failed: int,
    sent: int,
    price: float,
    error_info: str,
) -> dict[str, Any]:
    return {
        "SMSID": ref_id,
        "SendFailed": failed,
        "SendSuccess": success,
        "SendStatus": status,
        "TotalPrice": price,
        "TotalReceiver": 1,
        "TotalSent": sent,
        "RequestId": static["RequestId"],
        "TypeId": static["TypeId"],
        "Telcoid": static["Telcoid"],
        "PhoneNumber": static["PhoneNumber"],
        "CallbackUrl": static["CallbackUrl"],
        "Partnerids": static["Partnerids"],
        "ErrorInfo": error_info,
        "OAId": oa_id,
        "ZnsTempId": static["ZnsTempId"],
    }


def _in_progress(final: dict[str, Any], status: int) -> dict[str, Any]:
    at_carrier = status == STATUS_AT_CARRIER
    return {
        **final,
        "SendFailed": 0,
        "SendSuccess": 0,
        "SendStatus": status,
        "TotalPrice": 0.0,
        "TotalSent": 1 if at_carrier else 0,
        # Zalo assigns its message id only once eSMS hands the message over.
        "Partnerids": final["Partnerids"] if at_carrier else "",
        "ErrorInfo": "",
    }


def _render_error(code: int, form: ErrorForm, final_at: float) -> tuple[str, int | None]:
    """ErrorInfo text for Zalo `code` in `form`, and the code a parser can read back from it."""
    as_json = _ZALO_JSON[code]
    match form:
        case ErrorForm.DOTNET:
            return as_json + _DOTNET_TAIL, code
        case ErrorForm.JSON:
            return as_json, code
        case ErrorForm.QUOTED:
            return json.dumps(as_json, ensure_ascii=False), code
        case ErrorForm.URLENCODED_TWICE:
            return quote(quote(as_json, safe=""), safe=""), code
        case ErrorForm.DATED:
            stamp = datetime.fromtimestamp(final_at, _VIETNAM).strftime("%d/%m/%Y %H:%M:%S")
            return f"{as_json}____{stamp}", code
        case ErrorForm.TEXT:
            return _VIETNAMESE_MESSAGES[code], None
        case ErrorForm.EMPTY:
            return "", None
    assert_never(form)
