"""Unit tests for worker.records: the edge where the provider's loose JSON becomes typed records."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.samples import SAMPLE_ERROR_INFO, SAMPLE_RECORD
from worker.records import (
    CallbackRecord,
    parse_callback_item,
    parse_callback_items,
    to_decimal,
    to_int,
    to_text,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# The response sample of the provider's GetCallback page, verbatim (including the trailing space).
SAMPLE_RESPONSE = r"""{
  "Code": 100,
  "Message": "Success",
  "Data_callback": [
    {
      "SMSID": "4a496110-9fd3-4838-ac8b-bcaa36616f7011",
      "SendFailed": 1,
      "SendSuccess": 0,
      "SendStatus": 5,
      "TotalPrice": 0.0,
      "TotalReceiver": 1,
      "TotalSent": 1,
      "RequestId": null,
      "TypeId": 25,
      "Telcoid": 1,
      "PhoneNumber": "0909090909",
      "CallbackUrl": "https://api.esms.vn/zalo-zns/zns/receive-callback",
      "Partnerids": "7984e9b198c40e9957d6",
      "ErrorInfo": "{\"error\":-124,\"message\":\"Access token is invalid\"}Object reference not set to an instance of an object.",
      "OAId": "1090257973118325189",
      "ZnsTempId": "228386"
    } 
          ]
 } """  # noqa: E501, W291
# Provider key (as GetCallback spells it) -> record attribute.
INT_KEYS = {
    "SendStatus": "send_status",
    "SendSuccess": "send_success",
    "SendFailed": "send_failed",
    "TotalReceiver": "total_receiver",
    "TotalSent": "total_sent",
    "TypeId": "type_id",
    "Telcoid": "telco_id",
}
TEXT_KEYS = {
    "RequestId": "request_id",
    "PhoneNumber": "phone_number",
    "CallbackUrl": "callback_url",
    "Partnerids": "partner_ids",
    "ErrorInfo": "error_info",
    "OAId": "oa_id",
    "ZnsTempId": "zns_temp_id",
}
DATA_ATTRIBUTES = (*INT_KEYS.values(), *TEXT_KEYS.values(), "total_price")


def _sample_item(**json_kwargs) -> dict:
    return json.loads(SAMPLE_RESPONSE, **json_kwargs)["Data_callback"][0]


def _only(record: CallbackRecord | None, attribute: str):
    """The one data attribute that was set; every other one must still be None."""
    assert record is not None
    others = {name: getattr(record, name) for name in DATA_ATTRIBUTES if name != attribute}
    assert others == dict.fromkeys(others)
    return getattr(record, attribute)


# --- to_int -----------------------------------------------------------------------------------

INT_CASES = [
    (5, 5),
    (0, 0),
    (-3, -3),
    ("5", 5),
    ("0", 0),
    ("0.0", 0),
    ("5.000", 5),
    (" 7 ", 7),
    ("\t25\n", 25),
    ("-118", -118),
    ("+4", 4),
    ("1e2", 100),
    (5.0, 5),
    (0.0, 0),
    (-0.0, 0),
    (Decimal("5"), 5),
    (Decimal("5.00"), 5),
    (Decimal("0.0"), 0),
    (None, None),
    ("", None),
    ("   ", None),
    ("abc", None),
    ("5abc", None),
    ("5.5", None),
    ("0x10", None),
    ("NaN", None),
    ("Infinity", None),
    ("-inf", None),
    (5.5, None),
    (float("nan"), None),
    (float("inf"), None),
    (float("-inf"), None),
    (Decimal("5.5"), None),
    (Decimal("NaN"), None),
    (Decimal("Infinity"), None),
    ([], None),
    ([5], None),
    ({}, None),
    ({"value": 5}, None),
    (True, None),
    (False, None),
    (b"5", None),
    (INT32_MAX, INT32_MAX),
    (INT32_MIN, INT32_MIN),
    (INT32_MAX + 1, None),
    (INT32_MIN - 1, None),
    (str(INT32_MAX), INT32_MAX),
    (str(INT32_MAX + 1), None),
    (str(INT32_MIN - 1), None),
    ("99999999999999999999", None),
    (1e10, None),
    (-1e10, None),
    (1e300, None),
    (Decimal("1E+400"), None),
    ("1e400", None),
]


@pytest.mark.parametrize(("raw", "expected"), INT_CASES, ids=repr)
def test_to_int(raw, expected):
    result = to_int(raw)
    assert result == expected
    assert result is None or type(result) is int


def _to_int_in_subprocess(text: str) -> subprocess.CompletedProcess:
    code = f"from worker.records import to_int; print(to_int({text!r}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=2,
    )


def test_to_int_huge_exponent_string_is_rejected_quickly():
    # A subprocess, because the current code holds the GIL for minutes on this input.
    done = _to_int_in_subprocess("1e999999999")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


@given(st.integers(min_value=INT32_MIN, max_value=INT32_MAX))
@hsettings(max_examples=200, deadline=None)
def test_to_int_agrees_across_spellings(number):
    assert to_int(number) == number
    assert to_int(str(number)) == number
    assert to_int(f"  {number} ") == number
    assert to_int(Decimal(number)) == number
    as_float = float(number)  # every int32 is exact as a float
    assert int(as_float) == number
    assert to_int(as_float) == number
    assert to_int(repr(as_float)) == number


@given(st.integers().filter(lambda n: not INT32_MIN <= n <= INT32_MAX))
@hsettings(max_examples=100, deadline=None)
def test_to_int_outside_int32_is_none(number):
    assert to_int(number) is None
    assert to_int(str(number)) is None


# --- to_decimal -------------------------------------------------------------------------------

DECIMAL_CASES = [
    (0.0, Decimal("0.0")),
    (0, Decimal(0)),
    (385.5, Decimal("385.5")),
    (0.1, Decimal("0.1")),
    (220, Decimal(220)),
    ("0.0", Decimal("0.0")),
    ("385.5", Decimal("385.5")),
    (" 385.5 ", Decimal("385.5")),
    ("440", Decimal(440)),
    ("-1.25", Decimal("-1.25")),
    ("1e3", Decimal(1000)),
    (Decimal("0.0"), Decimal("0.0")),
    (Decimal("385.5"), Decimal("385.5")),
    (None, None),
    ("", None),
    ("  ", None),
    ("abc", None),
    ("385,5", None),
    ("NaN", None),
    ("Infinity", None),
    ("-Infinity", None),
    (float("nan"), None),
    (float("inf"), None),
    (Decimal("NaN"), None),
    (Decimal("-Infinity"), None),
    ([], None),
    ({}, None),
    (True, None),
    (False, None),
]


@pytest.mark.parametrize(("raw", "expected"), DECIMAL_CASES, ids=repr)
def test_to_decimal(raw, expected):
    result = to_decimal(raw)
    assert result == expected
    assert result is None or type(result) is Decimal


def test_to_decimal_is_exact_not_binary_float():
    assert to_decimal(0.1) == Decimal("0.1")
    assert to_decimal(0.1) != Decimal(0.1)  # the binary expansion 0.1000000000000000055...
    assert to_decimal(385.5) == Decimal("385.5")
    assert str(to_decimal("385.5")) == "385.5"


@pytest.mark.parametrize(
    ("spellings", "canonical"),
    [
        (["300.0", 300.0, "300", 300, "3E+2", " 300.00 ", Decimal("300.000")], "300"),
        (["385.50", 385.5, "385.5", "3.855E+2"], "385.5"),
        (["0.0", 0.0, "0", 0, "-0.0", "0E-7"], "0"),
        (["0.10", 0.1, "1E-1"], "0.1"),
    ],
)
def test_every_spelling_of_a_price_ends_identical(spellings, canonical):
    # Postgres numeric keeps the scale it is given: "300.0" and "300" would be stored apart.
    assert {str(to_decimal(spelling)) for spelling in spellings} == {canonical}


@given(st.decimals(allow_nan=False, allow_infinity=False))
@hsettings(max_examples=200, deadline=None)
def test_to_decimal_round_trips_its_text(number):
    assert to_decimal(str(number)) == number
    assert to_decimal(number) == number


@given(st.floats(allow_nan=False, allow_infinity=False))
@hsettings(max_examples=200, deadline=None)
def test_to_decimal_of_float_is_its_shortest_repr(number):
    result = to_decimal(number)
    assert result == Decimal(repr(number))
    assert float(result) == number


@pytest.mark.parametrize(
    "raw", ["1e999999999", "-1e999999999", "1e-999999999", Decimal("1E+999999"), "1E+131072"]
)
def test_to_decimal_rejects_values_postgres_numeric_cannot_store(raw):
    assert to_decimal(raw) is None


# --- to_text ----------------------------------------------------------------------------------

TEXT_CASES = [
    ("abc", "abc"),
    (" padded ", " padded "),
    ("Số điện thoại", "Số điện thoại"),
    (228386, "228386"),
    (0, "0"),
    (-124, "-124"),
    (5.0, "5"),
    (0.5, "0.5"),
    ("a\x00b\x00", "ab"),
    ("\x00", None),
    ("", None),
    (" ", None),
    ("\t\r\n ", None),
    (None, None),
    ([], None),
    (["a"], None),
    ({}, None),
    ({"a": 1}, None),
    (True, None),
    (False, None),
]


@pytest.mark.parametrize(("raw", "expected"), TEXT_CASES, ids=repr)
def test_to_text(raw, expected):
    assert to_text(raw) == expected


def test_to_text_keeps_very_long_strings():
    long_text = "x" * 1_000_000 + "ý"
    assert to_text(long_text) == long_text


# --- parse_callback_item: the provider's sample -------------------------------------------------


def test_sample_item_field_by_field():
    record = parse_callback_item(_sample_item())
    assert record is not None
    assert record.ref_id == "4a496110-9fd3-4838-ac8b-bcaa36616f7011"
    assert record.send_failed == 1
    assert record.send_success == 0
    assert record.send_status == 5
    assert record.total_price == Decimal("0.0")
    assert isinstance(record.total_price, Decimal)
    assert record.total_receiver == 1
    assert record.total_sent == 1
    assert record.request_id is None
    assert record.type_id == 25
    assert record.telco_id == 1
    assert record.phone_number == "0909090909"
    assert record.callback_url == "https://api.esms.vn/zalo-zns/zns/receive-callback"
    assert record.partner_ids == "7984e9b198c40e9957d6"
    assert record.error_info == SAMPLE_ERROR_INFO
    assert record.oa_id == "1090257973118325189"
    assert record.zns_temp_id == "228386"
    assert record.error_code == -124
    assert record == SAMPLE_RECORD


def test_sample_item_parsed_with_decimal_floats_is_the_same():
    # The client decodes bodies with parse_float=Decimal.
    item = _sample_item(parse_float=Decimal)
    assert item["TotalPrice"] == Decimal("0.0")
    assert parse_callback_item(item) == SAMPLE_RECORD


def test_sample_item_with_every_number_as_string_is_the_same():
    item = {
        key: str(value) if isinstance(value, int | float) else value
        for key, value in _sample_item().items()
    }
    assert item["SendStatus"] == "5" and item["TotalPrice"] == "0.0"
    assert parse_callback_item(item) == SAMPLE_RECORD


def test_push_style_lower_case_keys():
    # The push callback: a GET whose query parameters are all strings and partly lower-case.
    params = {
        "SMSID": "4a496110-9fd3-4838-ac8b-bcaa36616f7011",
        "SendFailed": "1",
        "SendStatus": "5",
        "SendSuccess": "0",
        "TotalPrice": "0.0",
        "TotalReceiver": "1",
        "TotalSent": "1",
        "RequestId": "req-1",
        "TypeId": "25",
        "telcoid": "1",
        "phonenumber": "0909090909",
        "partnerids": "7984e9b198c40e9957d6",
        "error_info": SAMPLE_ERROR_INFO,
        "oaid": "1090257973118325189",
        "tempid": "228386",
    }
    record = parse_callback_item(params)
    # The GetCallback sample's data; a push names its RequestId and carries no CallbackUrl.
    assert record == dataclasses.replace(SAMPLE_RECORD, request_id="req-1", callback_url=None)
    assert record.error_code == -124


@pytest.mark.parametrize("key", ["SMSID", "smsid", "SmsId"])
def test_keys_are_case_insensitive(key):
    record = parse_callback_item({key: "r1", "SENDSTATUS": 2, "telcoID": "3", "totalprice": "1"})
    assert record == CallbackRecord(ref_id="r1", send_status=2, telco_id=3, total_price=Decimal(1))


def test_missing_fields_are_none_and_unknown_keys_ignored():
    record = parse_callback_item({"SMSID": "r1", "Unexpected": 5, "FinalStatus": True, 7: "x"})
    assert record == CallbackRecord(ref_id="r1")
    assert all(getattr(record, name) is None for name in DATA_ATTRIBUTES)
    assert record.error_code is None


# --- parse_callback_item: every field in every spelling -----------------------------------------

INT_FIELD_VALUES = [
    (5, 5),
    ("5", 5),
    ("0.0", 0),
    (" 7 ", 7),
    (5.0, 5),
    (Decimal("5"), 5),
    (Decimal("5.0"), 5),
    (None, None),
    ("", None),
    ("abc", None),
    ([], None),
    ({}, None),
    (True, None),
    (5.5, None),
    (2**31, None),
    (-(2**31) - 1, None),
    ("9999999999", None),
]


@pytest.mark.parametrize(("key", "attribute"), INT_KEYS.items())
@pytest.mark.parametrize(("raw", "expected"), INT_FIELD_VALUES, ids=repr)
def test_int_field_spellings(key, attribute, raw, expected):
    record = parse_callback_item({"SMSID": "r1", key: raw})
    assert record is not None and record.ref_id == "r1"
    assert _only(record, attribute) == expected


TEXT_FIELD_VALUES = [
    ("abc", "abc"),
    ("", None),
    ("   ", None),
    ("228386", "228386"),
    (228386, "228386"),
    (228386.0, "228386"),
    ("0909\x000909", "09090909"),
    (None, None),
    ([], None),
    ({}, None),
    (True, None),
]


@pytest.mark.parametrize(("key", "attribute"), TEXT_KEYS.items())
@pytest.mark.parametrize(("raw", "expected"), TEXT_FIELD_VALUES, ids=repr)
def test_text_field_spellings(key, attribute, raw, expected):
    record = parse_callback_item({"SMSID": "r1", key: raw})
    assert _only(record, attribute) == expected


PRICE_VALUES = [
    (0.0, Decimal("0.0")),
    (0, Decimal(0)),
    (385.5, Decimal("385.5")),
    (0.1, Decimal("0.1")),
    ("0.0", Decimal("0.0")),
    ("385.5", Decimal("385.5")),
    (" 440 ", Decimal(440)),
    (Decimal("385.5"), Decimal("385.5")),
    (None, None),
    ("", None),
    ("abc", None),
    ([], None),
    ({}, None),
    (True, None),
    ("NaN", None),
]


@pytest.mark.parametrize(("raw", "expected"), PRICE_VALUES, ids=repr)
def test_total_price_spellings(raw, expected):
    record = parse_callback_item({"SMSID": "r1", "TotalPrice": raw})
    price = _only(record, "total_price")
    assert price == expected
    assert price is None or type(price) is Decimal


def test_one_bad_field_does_not_poison_the_item():
    item = dict(_sample_item(), SendFailed="abc", TotalPrice=[], PhoneNumber={})
    record = parse_callback_item(item)
    assert record is not None
    assert (record.send_failed, record.total_price, record.phone_number) == (None, None, None)
    assert record.send_status == 5 and record.oa_id == "1090257973118325189"


def test_very_long_strings_are_kept():
    error_info = '{"error":-118,"message":"' + "m" * 200_000 + '"}'
    record = parse_callback_item({"SMSID": "r" * 5000, "ErrorInfo": error_info})
    assert record.ref_id == "r" * 5000
    assert record.error_info == error_info
    assert record.error_code == -118


def test_nul_characters_are_removed_everywhere():
    record = parse_callback_item(
        {"SMSID": "r\x001", "ErrorInfo": '\x00{"error":-108}', "OAId": "oa\x00", "TotalPrice": "1"}
    )
    assert record.ref_id == "r1"
    assert record.error_info == '{"error":-108}'
    assert record.oa_id == "oa"
    assert record.error_code == -108


# --- parse_callback_item: items that cannot name their SMSID ------------------------------------


@pytest.mark.parametrize(
    "item",
    [
        {},
        {"SendStatus": 5},
        {"SMSID": None},
        {"SMSID": ""},
        {"SMSID": "   "},
        {"SMSID": "\x00"},
        {"SMSID": []},
        {"SMSID": {}},
        {"SMSID": True},
        None,
        [],
        ["SMSID", "r1"],
        "r1",
        5,
        Decimal(5),
    ],
    ids=repr,
)
def test_item_without_usable_smsid_is_none(item):
    assert parse_callback_item(item) is None


@pytest.mark.parametrize(
    ("raw", "expected"), [(" r1 ", "r1"), ("r1\n", "r1"), (12345, "12345"), ("R-1", "R-1")]
)
def test_smsid_is_text_stripped(raw, expected):
    assert parse_callback_item({"SMSID": raw}).ref_id == expected


def test_parse_callback_items_keeps_good_items_in_order():
    first = {"SMSID": "a", "SendStatus": 2}
    second = {"SMSID": "b", "SendStatus": "garbage", "TotalPrice": "x"}
    items = [first, None, {"SendStatus": 5}, "junk", {"SMSID": ""}, [], 7, second, _sample_item()]
    records = parse_callback_items(items)
    assert [record.ref_id for record in records] == [
        "a",
        "b",
        "4a496110-9fd3-4838-ac8b-bcaa36616f7011",
    ]
    assert records[0].send_status == 2
    assert records[1].send_status is None and records[1].total_price is None
    assert records[2] == SAMPLE_RECORD


@pytest.mark.parametrize("items", [None, {}, {"SMSID": "a"}, "abc", 5, []], ids=repr)
def test_parse_callback_items_of_non_list_or_empty_is_empty(items):
    assert parse_callback_items(items) == []


def test_parse_callback_items_keeps_duplicates():
    # Choosing among duplicates is merge's job, not the parser's.
    items = [{"SMSID": "a", "SendStatus": 2}, {"SMSID": "a", "SendStatus": 5}]
    records = parse_callback_items(items)
    assert [(r.ref_id, r.send_status) for r in records] == [("a", 2), ("a", 5)]


# --- properties ---------------------------------------------------------------------------------

KNOWN_KEYS = [
    "SMSID", "smsid", *INT_KEYS, *TEXT_KEYS, "TotalPrice", "totalprice", "telcoid",
    "phonenumber", "partnerids", "error_info", "oaid", "tempid",
]  # fmt: skip
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from(["5", "0.0", " 7 ", "", "abc", "1e3", "NaN", '{"error":-118}'])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
ITEMS = (
    st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=10), JSON_VALUES, max_size=10)
    | JSON_VALUES
)


def _assert_well_typed(record: CallbackRecord) -> None:
    assert isinstance(record.ref_id, str) and record.ref_id == record.ref_id.strip()
    assert record.ref_id and "\x00" not in record.ref_id
    for attribute in INT_KEYS.values():
        value = getattr(record, attribute)
        assert value is None or (type(value) is int and INT32_MIN <= value <= INT32_MAX)
    for attribute in TEXT_KEYS.values():
        value = getattr(record, attribute)
        assert value is None or (type(value) is str and "\x00" not in value)
    price = record.total_price
    assert price is None or (type(price) is Decimal and price.is_finite())
    code = record.error_code
    assert code is None or (type(code) is int and INT32_MIN <= code <= INT32_MAX)


@given(ITEMS)
@hsettings(max_examples=120, deadline=None)
def test_parse_callback_item_never_raises(item):
    record = parse_callback_item(item)
    if record is not None:
        _assert_well_typed(record)


@given(st.lists(ITEMS, max_size=5))
@hsettings(max_examples=30, deadline=None)
def test_parse_callback_items_is_item_by_item(items):
    records = parse_callback_items(items)
    expected = [parse_callback_item(item) for item in items]
    assert records == [record for record in expected if record is not None]
