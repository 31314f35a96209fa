"""Provider data parsed into typed records: the edge where eSMS's loose JSON becomes our types.

eSMS documents every `Data_callback` field as "string" yet sends numbers, floats and nulls; the push
callback sends everything as query strings, with an empty value where GetCallback has null (its own
sample ends in `partnerids=`). `parse_callback_item` is the one normalisation for both paths: it
returns a `CallbackRecord` with real ints, an exact `Decimal` price and text, or `None` when an item
cannot name its SMSID. An empty or blank value is absent (`None`, stored as NULL) in every field, so
`"ErrorInfo": ""` and `error_info=` store what `"ErrorInfo": null` stores; `5`, `"5"`, `5.0` and
`"5.0"` are the same integer, and `300`, `300.0`, `"300.0"` and `"3E+2"` the same price (its
shortest exact spelling, `Decimal("300")`). A bad field becomes `None`; it never poisons the item,
and a bad item never poisons the batch. Nothing past this module sees a raw dict or a string-typed
number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from worker.error_info import parse_error_code

# Postgres text cannot hold NUL, and nothing legitimate sends one.
_NUL = "\x00"


# Not frozen: a frozen dataclass sets each of its 16 fields through object.__setattr__, which
# tripled the cost of building the 200 records of an answer. Nothing changes a record.
@dataclass(slots=True)
class CallbackRecord:
    """One message's status as the provider reported it, in our column names and types."""

    ref_id: str
    send_status: int | None = None
    send_success: int | None = None
    send_failed: int | None = None
    total_receiver: int | None = None
    total_sent: int | None = None
    type_id: int | None = None
    telco_id: int | None = None
    total_price: Decimal | None = None
    request_id: str | None = None
    phone_number: str | None = None
    callback_url: str | None = None
    partner_ids: str | None = None
    error_info: str | None = None
    oa_id: str | None = None
    zns_temp_id: str | None = None

    @property
    def error_code(self) -> int | None:
        return parse_error_code(self.error_info)


# Provider field name -> (record attribute, coercion). Lookup is case-insensitive because the
# GetCallback body says `Telcoid` while the push callback says `telcoid`.
_INT_FIELDS = {
    "sendstatus": "send_status",
    "sendsuccess": "send_success",
    "sendfailed": "send_failed",
    "totalreceiver": "total_receiver",
    "totalsent": "total_sent",
    "typeid": "type_id",
    "telcoid": "telco_id",
}
_TEXT_FIELDS = {
    "requestid": "request_id",
    "phonenumber": "phone_number",
    "callbackurl": "callback_url",
    "partnerids": "partner_ids",
    "errorinfo": "error_info",
    "error_info": "error_info",
    "oaid": "oa_id",
    "znstempid": "zns_temp_id",
    "tempid": "zns_temp_id",
}
_PRICE_FIELD = "totalprice"
_REF_FIELD = "smsid"
# An integer column is a Postgres integer; anything outside it is not a real count or code.
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
# What Postgres numeric can store (131072 digits before the point, 16383 after), checked on the
# exponent alone so that a hostile "1e999999999" costs nothing.
_DECIMAL_MAX_ADJUSTED = 131071
_DECIMAL_MIN_EXPONENT = -16383


def to_int(value: Any) -> int | None:
    """An integer from a JSON number, an integral float or a numeric string; else None."""
    if type(value) is int:  # the common case, first
        return value if _INT_MIN <= value <= _INT_MAX else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float | Decimal | str):
        # Through Decimal, range-checked before int(): "1e999999999" must not build a
        # billion-digit integer.
        decimal = _decimal(value)
        if decimal is None or not _INT_MIN <= decimal <= _INT_MAX:
            return None
        if decimal != decimal.to_integral_value():
            return None
        number = int(decimal)
    else:
        return None
    return number if _INT_MIN <= number <= _INT_MAX else None


def to_decimal(value: Any) -> Decimal | None:
    """An exact Decimal from a number or numeric string (floats through their shortest repr).

    Values Postgres `numeric` cannot hold, or that no price or count could be, are None.
    """
    # A price list has a few dozen values: remembered by type and value (220 and 220.0 are
    # equal keys as values, not as types), 2.7 µs each otherwise.
    key = (type(value), value) if type(value) in _CACHED_TYPES else None
    if key is not None:
        known = _DECIMALS.get(key)
        if known is not None:
            return known
    found = _to_decimal(value)
    if key is not None and found is not None and len(_DECIMALS) < 1024:
        _DECIMALS[key] = found
    return found


_CACHED_TYPES = (int, float, str)
_DECIMALS: dict[tuple[type, Any], Decimal] = {}


def _to_decimal(value: Any) -> Decimal | None:
    number = _decimal(value)
    if number is None:
        return None
    # One spelling per value, whichever encoding it came in: "300.0", 300.0, "300" and "3E+2"
    # are all Decimal("300"), "385.50" is Decimal("385.5") (numeric keeps the scale it is given,
    # so "300.0" and "300" would otherwise be stored differently by the two paths).
    if number.is_zero():  # "-0.0" too
        return _ZERO
    number = number.normalize(_EXACT)
    if number.as_tuple().exponent > 0:  # 3E+2: spelled 300
        number = number.quantize(_ONE, context=_EXACT)
    return number


_ONE, _ZERO = Decimal(1), Decimal(0)
# Precise enough for every value Postgres numeric holds: nothing is rounded.
_EXACT = Context(prec=_DECIMAL_MAX_ADJUSTED + 1 - _DECIMAL_MIN_EXPONENT)


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int):
            number = Decimal(value)
        elif isinstance(value, float):
            number = Decimal(repr(value))
        elif isinstance(value, str):
            number = Decimal(value.strip())
        else:
            return None
    except (InvalidOperation, ValueError):
        return None
    if not number.is_finite():
        return None
    if (
        number.adjusted() > _DECIMAL_MAX_ADJUSTED
        or number.as_tuple().exponent < _DECIMAL_MIN_EXPONENT
    ):
        return None
    return number


def to_text(value: Any) -> str | None:
    """Text as received; numbers become their JSON spelling, containers are not text, and empty or
    blank text (nothing but whitespace) is None: the push's `partnerids=` is GetCallback's null."""
    if type(value) is str:  # the common case, first
        text = value.replace(_NUL, "") if _NUL in value else value
    elif value is None or isinstance(value, dict | list | bool):
        return None
    else:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = str(value)
        text = text.replace(_NUL, "") if _NUL in text else text
    return text if text and not text.isspace() else None


# Provider field name (lower case) -> (record attribute, coercion).
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    **{key: (name, to_int) for key, name in _INT_FIELDS.items()},
    **{key: (name, to_text) for key, name in _TEXT_FIELDS.items()},
    _PRICE_FIELD: ("total_price", to_decimal),
    _REF_FIELD: ("ref_id", to_text),
}
# The same, by the spellings seen so far ("SendStatus", "sendstatus"), so that the usual item
# costs no lower(); bounded, so that a provider inventing names cannot grow it.
_FIELDS_AS_SPELLED: dict[str, tuple[str, Callable[[Any], Any]]] = {}


def parse_callback_item(item: Any) -> CallbackRecord | None:
    """One `Data_callback` item (or one push's parameters) as a record; None without an SMSID."""
    if not isinstance(item, dict):
        return None
    fields: dict[str, Any] = {}
    for raw_key, raw_value in item.items():
        field = _FIELDS_AS_SPELLED.get(raw_key)
        if field is None:
            if not isinstance(raw_key, str):
                continue
            key = raw_key.lower()
            field = _FIELDS.get(key)
            if field is not None and len(_FIELDS_AS_SPELLED) < 256:
                _FIELDS_AS_SPELLED[raw_key] = field
        if field is not None:
            name, convert = field
            fields[name] = convert(raw_value)
    ref_id = fields.pop("ref_id", None)
    if ref_id is None:
        return None
    ref_id = ref_id.strip()
    if not ref_id:
        return None
    return CallbackRecord(ref_id=ref_id, **fields)


def parse_callback_items(items: Any) -> list[CallbackRecord]:
    """Every usable item of a `Data_callback` array, in order; anything else yields nothing."""
    if not isinstance(items, list):
        return []
    records = (parse_callback_item(item) for item in items)
    return [record for record in records if record is not None]
