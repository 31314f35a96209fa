"""Unit tests for worker.error_info: Zalo's error code out of every ErrorInfo wrapping eSMS uses."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.error_info import parse_error_code
from worker.records import CallbackRecord

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
DOTNET_TAIL = "Object reference not set to an instance of an object."
DATED_SUFFIX = "____29/11/2026 10:00:00"
ZALO_124 = '{"error":-124,"message":"Access token is invalid"}'
ZALO_118 = '{"error":-118,"message":"Zalo account does not exist or has been disabled"}'
ZALO_0 = '{"error":0,"message":"Success"}'


def _wrappings(as_json: str) -> dict[str, str]:
    """Every ErrorInfo form seen in eSMS's docs, built around one Zalo JSON text."""
    return {
        "json": as_json,
        "dotnet": as_json + DOTNET_TAIL,
        "dated": as_json + DATED_SUFFIX,
        "quoted": json.dumps(as_json),
        "quoted_unicode": json.dumps(as_json, ensure_ascii=False),
        "quoted_dated": json.dumps(as_json) + DATED_SUFFIX,
        "quoted_twice": json.dumps(json.dumps(as_json)),
        "quoted_three_times": json.dumps(json.dumps(json.dumps(as_json))),
        "urlencoded": quote(as_json, safe=""),
        "urlencoded_twice": quote(quote(as_json, safe=""), safe=""),
        "urlencoded_dotnet": quote(as_json + DOTNET_TAIL, safe=""),
        "urlencoded_dated": quote(as_json + DATED_SUFFIX, safe=""),
        "urlencoded_twice_dated": quote(quote(as_json + DATED_SUFFIX, safe=""), safe=""),
        "urlencoded_quoted": quote(json.dumps(as_json), safe=""),
        "quoted_urlencoded": json.dumps(quote(as_json, safe="")),
        "leading_whitespace": " \r\n\t" + as_json,
        "trailing_newline": as_json + "\r\n",
    }


FORMS = sorted(_wrappings(ZALO_124))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("as_json", "code"), [(ZALO_124, -124), (ZALO_118, -118), (ZALO_0, 0)])
def test_every_documented_form(form, as_json, code):
    assert parse_error_code(_wrappings(as_json)[form]) == code


def test_provider_sample_verbatim():
    sample = (
        '{"error":-124,"message":"Access token is invalid"}'
        "Object reference not set to an instance of an object."
    )
    assert parse_error_code(sample) == -124


@pytest.mark.parametrize(("as_json", "code"), [(ZALO_124, -124), (ZALO_118, -118)])
def test_form_encoded_as_dotnet_does(as_json, code):
    # .NET's HttpUtility.UrlEncode: "+" for spaces and lower-case hex.
    once = quote_plus(as_json).replace("%7B", "%7b").replace("%3A", "%3a")
    assert parse_error_code(once) == code
    assert parse_error_code(quote_plus(once)) == code


def test_success_code_zero_is_not_none():
    result = parse_error_code(ZALO_0)
    assert result == 0 and result is not None


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "\n",
        "Số điện thoại chưa đăng ký tài khoản Zalo",
        "Access token không hợp lệ",
        "Thanh toán phí ZNS thất bại",
        "Lỗi 100%",
        "100% lỗi %zz %",
        "Object reference not set to an instance of an object.",
        "-118",
        "error -118",
        '"-118"',
        '"Số điện thoại không hợp lệ"',
        "%22plain%20text%22",
        "[-118]",
        '[{"error":-118}]',
        '"',
        '""',
        "{",
        "}{",
        "null",
        "true",
    ],
    ids=repr,
)
def test_text_without_a_leading_object_is_none(text):
    assert parse_error_code(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"error":"-118","message":"x"}', -118),
        ('{"error":" -118 ","message":"x"}', -118),
        ('{"error":-118.0}', -118),
        ('{"error":-118}', -118),
        ('{ "error" : -118 , "message" : "x" }', -118),
        ('{"message":"x","error":-108}', -108),
        ('{"error":-118.5}', None),
        ('{"error":"abc"}', None),
        ('{"error":""}', None),
        ('{"error":null}', None),
        ('{"error":true}', None),
        ('{"error":false}', None),
        ('{"error":[-118]}', None),
        ('{"error":{"code":-118}}', None),
        ('{"message":"no code"}', None),
        ("{}", None),
        ('{"error":2147483647}', INT32_MAX),
        ('{"error":-2147483648}', INT32_MIN),
        ('{"error":2147483648}', None),
        ('{"error":"99999999999"}', None),
        ('{"error":1e400}', None),
        ('{"error":NaN}', None),
    ],
    ids=repr,
)
def test_error_value_spellings(text, expected):
    assert parse_error_code(text) == expected


def test_nested_json_string_of_json_string():
    inner = json.dumps({"error": -137, "message": "Payment for ZNS failed"})
    assert parse_error_code(json.dumps(json.dumps(inner))) == -137
    assert parse_error_code(quote(json.dumps(json.dumps(inner)), safe="")) == -137


@pytest.mark.parametrize(
    "text",
    [
        '{"error":-118,"mess',
        '{"error":-118',
        quote('{"error":-118,"mess', safe=""),
        '"{\\"error\\":-118',
    ],
    ids=repr,
)
def test_truncated_object_does_not_raise(text):
    assert parse_error_code(text) in (None, -118)


def test_deep_url_encoding_terminates():
    text = ZALO_118
    for _ in range(40):
        text = quote(text, safe="")
    assert parse_error_code(text) in (None, -118)


def test_error_code_of_record_uses_the_parser():
    record = CallbackRecord(ref_id="r1", error_info=quote(quote(ZALO_118, safe=""), safe=""))
    assert record.error_code == -118
    assert CallbackRecord(ref_id="r1").error_code is None
    assert CallbackRecord(ref_id="r1", error_info="Lỗi").error_code is None


DEEP = 100_000
DEEP_INPUTS = {
    "unclosed_array": '{"error":-118,"detail":' + "[" * DEEP,
    "closed_array": '{"error":-118,"detail":' + "[" * DEEP + "]" * DEEP + "}",
    "quoted": json.dumps('{"error":-118,"detail":' + "[" * DEEP),
    "urlencoded": quote('{"error":-118,"detail":' + "[" * DEEP, safe=""),
}


@pytest.mark.parametrize("name", sorted(DEEP_INPUTS))
def test_deeply_nested_error_info_does_not_raise(name):
    assert parse_error_code(DEEP_INPUTS[name]) in (None, -118)
    assert CallbackRecord(ref_id="r1", error_info=DEEP_INPUTS[name]).error_code in (None, -118)


# --- properties ---------------------------------------------------------------------------------

NOISY_TEXT = st.text(alphabet=st.sampled_from('{}[]"\\%:,-0123456789 eErorx2FB7D_/\n'), max_size=60)


@given(st.text() | NOISY_TEXT)
@hsettings(max_examples=200, deadline=None)
def test_never_raises_on_arbitrary_text(text):
    result = parse_error_code(text)
    assert result is None or (type(result) is int and INT32_MIN <= result <= INT32_MAX)


@given(st.text(max_size=40), st.text(max_size=40))
@hsettings(max_examples=100, deadline=None)
def test_arbitrary_text_after_an_object_does_not_matter(message, tail):
    as_json = json.dumps({"error": -118, "message": message})
    assert parse_error_code(as_json + tail) == -118


@given(st.integers(min_value=INT32_MIN, max_value=INT32_MAX), st.text(max_size=40))
@hsettings(max_examples=200, deadline=None)
def test_every_wrapping_of_any_code_and_message(code, message):
    compact = json.dumps({"error": code, "message": message}, separators=(",", ":"))
    spaced_unicode = json.dumps({"error": code, "message": message}, ensure_ascii=False)
    for as_json in (compact, spaced_unicode):
        for form, text in _wrappings(as_json).items():
            assert parse_error_code(text) == code, form


@given(
    st.integers().filter(lambda n: not INT32_MIN <= n <= INT32_MAX),
    st.text(max_size=20),
)
@hsettings(max_examples=50, deadline=None)
def test_codes_outside_int32_are_none(code, message):
    for text in _wrappings(json.dumps({"error": code, "message": message})).values():
        assert parse_error_code(text) is None
