"""Unit tests for worker.esms_client: the GetCallback wire format, its errors, and the HTTP call.

No network: responses are parsed directly, and requests go through `httpx.MockTransport`.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal

import httpx
import pytest
from pydantic import SecretStr

from tests.samples import SAMPLE_OA_ID, SAMPLE_RECORD
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
from worker.esms_client import EsmsClient, parse_get_callback_response
from worker.records import CallbackRecord
from worker.settings import Account

API_KEY = "APIKEY-7f3c9a1e5b2d4c6e8a0b"
SECRET_KEY = "SECRET-Qm9vYmFyYmF6cXV4MTIzNDU2"
ACCOUNT = Account("shop", SecretStr(API_KEY), SecretStr(SECRET_KEY))
BASE_URL = "https://status-sms.esms.vn"
ENDPOINT = "https://status-sms.esms.vn/ZaloCallback/GetCallback"
OA_ID = SAMPLE_OA_ID

SAMPLE_ITEM = {
    "SMSID": "4a496110-9fd3-4838-ac8b-bcaa36616f7011",
    "SendFailed": 1,
    "SendSuccess": 0,
    "SendStatus": 5,
    "TotalPrice": 0.0,
    "TotalReceiver": 1,
    "TotalSent": 1,
    "RequestId": None,
    "TypeId": 25,
    "Telcoid": 1,
    "PhoneNumber": "0909090909",
    "CallbackUrl": "https://api.esms.vn/zalo-zns/zns/receive-callback",
    "Partnerids": "7984e9b198c40e9957d6",
    "ErrorInfo": '{"error":-124,"message":"Access token is invalid"}'
    "Object reference not set to an instance of an object.",
    "OAId": OA_ID,
    "ZnsTempId": "228386",
}


def _body(payload) -> bytes:
    return json.dumps(payload).encode()


def _ok(items) -> bytes:
    return _body({"Code": 100, "Message": "Success", "Data_callback": items})


# --- parse_get_callback_response: success ---------------------------------------------------------


def test_code_100_with_items():
    second = {"SMSID": "r2", "SendStatus": "2", "TotalPrice": "0.0"}
    records = parse_get_callback_response(200, _ok([SAMPLE_ITEM, second]))
    assert records == [SAMPLE_RECORD, CallbackRecord(ref_id="r2", send_status=2, total_price=0)]
    assert records[0].error_code == -124


def test_the_provider_sample_body_verbatim():
    body = (
        b'{\n  "Code": 100,\n  "Message": "Success",\n  "Data_callback": [\n    {\n'
        b'      "SMSID": "4a496110-9fd3-4838-ac8b-bcaa36616f7011",\n      "SendFailed": 1,\n'
        b'      "SendSuccess": 0,\n      "SendStatus": 5,\n      "TotalPrice": 0.0,\n'
        b'      "TotalReceiver": 1,\n      "TotalSent": 1,\n      "RequestId": null,\n'
        b'      "TypeId": 25,\n      "Telcoid": 1,\n      "PhoneNumber": "0909090909",\n'
        b'      "CallbackUrl": "https://api.esms.vn/zalo-zns/zns/receive-callback",\n'
        b'      "Partnerids": "7984e9b198c40e9957d6",\n'
        b'      "ErrorInfo": "{\\"error\\":-124,\\"message\\":\\"Access token is invalid\\"}'
        b'Object reference not set to an instance of an object.",\n'
        b'      "OAId": "1090257973118325189",\n      "ZnsTempId": "228386"\n    } \n'
        b"          ]\n } "
    )
    assert parse_get_callback_response(200, body) == [SAMPLE_RECORD]


def test_price_is_decoded_exactly():
    body = b'{"Code":100,"Data_callback":[{"SMSID":"a","TotalPrice":0.1},{"SMSID":"b","TotalPrice":385.5}]}'  # noqa: E501
    records = parse_get_callback_response(200, body)
    assert [r.total_price for r in records] == [Decimal("0.1"), Decimal("385.5")]
    assert all(type(r.total_price) is Decimal for r in records)


@pytest.mark.parametrize("code", ["100", " 100 ", 100])
def test_code_as_number_or_string(code):
    body = _body({"Code": code, "Data_callback": [SAMPLE_ITEM]})
    assert parse_get_callback_response(200, body) == [SAMPLE_RECORD]


@pytest.mark.parametrize("key", ["CodeResult", "CodeResponse"])
def test_sibling_api_code_names(key):
    body = _body({key: "100", "Data_callback": [SAMPLE_ITEM]})
    assert parse_get_callback_response(200, body) == [SAMPLE_RECORD]


@pytest.mark.parametrize(
    "payload",
    [
        {"Code": 100, "Message": "Success", "Data_callback": None},
        {"Code": 100, "Message": "Success"},
        {"Code": 100, "Data_callback": []},
    ],
    ids=["null", "missing", "empty"],
)
def test_no_callback_data_is_empty(payload):
    assert parse_get_callback_response(200, _body(payload)) == []


def test_bad_items_do_not_drop_good_ones():
    items = [None, "junk", {"SendStatus": 5}, {"SMSID": ""}, SAMPLE_ITEM, 7, {"SMSID": "b"}]
    records = parse_get_callback_response(200, _ok(items))
    assert [r.ref_id for r in records] == [SAMPLE_RECORD.ref_id, "b"]


def test_unknown_top_level_keys_are_ignored():
    body = _body({"Code": 100, "Message": "Success", "Data_callback": [], "Extra": {"x": 1}})
    assert parse_get_callback_response(200, body) == []


# --- parse_get_callback_response: malformed -------------------------------------------------------

MALFORMED = {
    "html": b"<!DOCTYPE html><html><body><h1>Server Error in '/' Application.</h1></body></html>",
    "truncated": b'{"Code": 100, "Message": "Success", "Data_callback": [{"SMSID": "a"',
    "empty": b"",
    "whitespace": b"  \r\n",
    "json_array": b'[{"SMSID": "a"}]',
    "json_string": b'"Success"',
    "json_null": b"null",
    "json_number": b"100",
    "not_utf8": b"\x80\x81\xfe{",
    "no_code": b'{"Message": "Success", "Data_callback": []}',
    "code_null": b'{"Code": null, "Data_callback": []}',
    "code_bool": b'{"Code": true, "Data_callback": []}',
    "code_text": b'{"Code": "Success", "Data_callback": []}',
    "code_object": b'{"Code": {"value": 100}, "Data_callback": []}',
    "data_object": b'{"Code": 100, "Data_callback": {"SMSID": "a"}}',
    "data_string": b'{"Code": 100, "Data_callback": "[]"}',
    "data_number": b'{"Code": 100, "Data_callback": 0}',
    "data_true": b'{"Code": 100, "Data_callback": true}',
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bodies(name):
    with pytest.raises(MalformedResponse) as caught:
        parse_get_callback_response(200, MALFORMED[name])
    assert caught.value.retryable is True
    assert caught.value.reason == str(caught.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 415])
def test_client_errors_are_not_success(status):
    with pytest.raises(MalformedResponse):
        parse_get_callback_response(status, _ok([SAMPLE_ITEM]))
    with pytest.raises(MalformedResponse):
        parse_get_callback_response(status, b"<html>Not Found</html>")


def test_non_json_reason_is_short():
    with pytest.raises(MalformedResponse) as caught:
        parse_get_callback_response(200, b"<html>" + b"x" * 100_000 + b"</html>")
    assert len(caught.value.reason) < 400


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"Code":100,"Data_callback":' + b"[" * 100_000],
    ids=["array", "inside_object"],
)
def test_deeply_nested_body_is_malformed(body):
    with pytest.raises(MalformedResponse):
        parse_get_callback_response(200, body)


# --- parse_get_callback_response: provider errors -------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520])
def test_server_errors_are_unavailable(status):
    for body in (b"", b"<html>Bad Gateway</html>", _ok([SAMPLE_ITEM])):
        with pytest.raises(ProviderUnavailable) as caught:
            parse_get_callback_response(status, body)
        assert caught.value.retryable is True
        assert str(status) in caught.value.reason


@pytest.mark.parametrize("body", [b"", b"Too Many Requests", _ok([SAMPLE_ITEM])])
def test_http_429_is_rate_limited(body):
    with pytest.raises(RateLimited) as caught:
        parse_get_callback_response(429, body)
    assert caught.value.retryable is True


@pytest.mark.parametrize("code", [160, "160"])
def test_code_160_is_rate_limited(code):
    body = _body({"Code": code, "Message": "TPS limit exceeded"})
    with pytest.raises(RateLimited) as caught:
        parse_get_callback_response(200, body)
    assert caught.value.code == 160
    assert caught.value.retryable is True


@pytest.mark.parametrize("code", [101, 140, 143])
def test_account_codes(code):
    with pytest.raises(AccountRejected) as caught:
        parse_get_callback_response(200, _body({"Code": code, "Message": "Authorize Failed"}))
    assert caught.value.code == code
    assert caught.value.retryable is False
    assert str(code) in caught.value.reason


@pytest.mark.parametrize("code", [204, 799])
def test_oa_codes(code):
    with pytest.raises(OARejected) as caught:
        parse_get_callback_response(200, _body({"Code": code, "Message": "OAID không tồn tại"}))
    assert caught.value.code == code
    assert caught.value.retryable is False


@pytest.mark.parametrize("code", [99, 102, 103, 105, 124, 12345, -1, 0])
def test_other_codes_are_provider_rejected(code):
    with pytest.raises(ProviderRejected) as caught:
        parse_get_callback_response(200, _body({"Code": code, "Data_callback": [SAMPLE_ITEM]}))
    assert caught.value.code == code
    assert caught.value.retryable is True
    assert not isinstance(caught.value, AccountRejected | OARejected | RateLimited)


def test_error_code_wins_over_client_status():
    with pytest.raises(AccountRejected):
        parse_get_callback_response(401, _body({"Code": 101, "Message": "Authorize Failed"}))


def test_long_message_is_cut():
    body = _body({"Code": 99, "Message": "m" * 50_000})
    with pytest.raises(ProviderRejected) as caught:
        parse_get_callback_response(200, body)
    assert len(caught.value.reason) < 400


def test_reason_is_one_line():
    message = "Object reference not set.\r\n   at Esms.Zalo.GetCallback()\n   at Main()"
    with pytest.raises(ProviderRejected) as caught:
        parse_get_callback_response(200, _body({"Code": 99, "Message": message}))
    assert "\n" not in caught.value.reason and "\r" not in caught.value.reason


# --- EsmsClient.get_callback over a mock transport ------------------------------------------------


class Recorder:
    """A MockTransport handler that records requests and answers with a canned response."""

    def __init__(self, respond):
        self.requests: list[httpx.Request] = []
        self._respond = respond

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._respond(request)


@pytest.fixture
def make_client():
    clients: list[EsmsClient] = []

    def build(respond, base_url: str = BASE_URL) -> tuple[EsmsClient, Recorder]:
        recorder = Recorder(respond)
        client = EsmsClient(base_url, 5.0)
        client._http.close()
        client._http = httpx.Client(transport=httpx.MockTransport(recorder))
        clients.append(client)
        return client, recorder

    yield build
    for client in clients:
        client.close()


@pytest.mark.parametrize("base_url", [BASE_URL, BASE_URL + "/"])
def test_request_shape(make_client, base_url):
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_ok([SAMPLE_ITEM]))

    client, recorder = make_client(respond, base_url)
    ref_ids = ("r3", SAMPLE_RECORD.ref_id, "r1")
    records = client.get_callback(ACCOUNT, OA_ID, ref_ids)

    assert records == [SAMPLE_RECORD]
    [request] = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == ENDPOINT
    assert request.headers["content-type"].startswith("application/json")
    assert json.loads(request.content) == {
        "ApiKey": API_KEY,
        "SecretKey": SECRET_KEY,
        "ListRefid": ["r3", SAMPLE_RECORD.ref_id, "r1"],
        "OAId": OA_ID,
    }


def test_one_request_per_call_and_no_retry(make_client):
    client, recorder = make_client(lambda r: httpx.Response(503, content=b"busy"))
    with pytest.raises(ProviderUnavailable):
        client.get_callback(ACCOUNT, OA_ID, ["r1"])
    assert len(recorder.requests) == 1


def test_two_hundred_refids_in_order(make_client):
    client, recorder = make_client(lambda r: httpx.Response(200, content=_ok(None)))
    ref_ids = [f"{index:032x}{index}" for index in range(200)]
    assert client.get_callback(ACCOUNT, OA_ID, ref_ids) == []
    assert json.loads(recorder.requests[0].content)["ListRefid"] == ref_ids


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _assert_no_keys(exc: BaseException) -> None:
    for link in _chain(exc):
        for text in (str(link), repr(link), *(str(arg) for arg in link.args)):
            assert SECRET_KEY not in text
            assert API_KEY not in text
    if isinstance(exc, ProviderError):
        assert SECRET_KEY not in exc.reason and API_KEY not in exc.reason


TRANSPORT_FAILURES = {
    "read_timeout": (httpx.ReadTimeout, "timeout"),
    "connect_timeout": (httpx.ConnectTimeout, "timeout"),
    "write_timeout": (httpx.WriteTimeout, "timeout"),
    "pool_timeout": (httpx.PoolTimeout, "timeout"),
    "connect_error": (httpx.ConnectError, "transport"),
    "read_error": (httpx.ReadError, "transport"),
    "remote_protocol_error": (httpx.RemoteProtocolError, "transport"),
    "decoding_error": (httpx.DecodingError, "transport"),
}


@pytest.mark.parametrize("name", sorted(TRANSPORT_FAILURES))
def test_transport_failures_are_unavailable(make_client, name):
    error_type, kind = TRANSPORT_FAILURES[name]

    def fail(request: httpx.Request) -> httpx.Response:
        raise error_type("[Errno 111] Connection refused / timed out", request=request)

    client, _ = make_client(fail)
    with pytest.raises(ProviderUnavailable) as caught:
        client.get_callback(ACCOUNT, OA_ID, ["r1"])
    assert caught.value.retryable is True
    assert kind in caught.value.reason
    _assert_no_keys(caught.value)


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (200, {"Code": 101, "Message": "Authorize Failed"}, AccountRejected),
        (200, {"Code": 140, "Message": "IP not allowed"}, AccountRejected),
        (200, {"Code": 799, "Message": "OA inactive"}, OARejected),
        (200, {"Code": 160, "Message": "TPS limit exceeded"}, RateLimited),
        (200, {"Code": 105, "Message": "SMSID not found"}, RefIdsNotFound),
        (200, {"Code": "105"}, RefIdsNotFound),
        (200, [], MalformedResponse),
        (429, {}, RateLimited),
        (502, {}, ProviderUnavailable),
    ],
)
def test_errors_through_the_client_hide_the_keys(make_client, status, payload, expected):
    client, _ = make_client(lambda r: httpx.Response(status, content=_body(payload)))
    with pytest.raises(expected) as caught:
        client.get_callback(ACCOUNT, OA_ID, ["r1"])
    _assert_no_keys(caught.value)


def _echo_as_html(request: httpx.Request) -> httpx.Response:
    return httpx.Response(400, content=b"<pre>Bad request: " + request.content + b"</pre>")


def _echo_in_message(request: httpx.Request) -> httpx.Response:
    sent = json.loads(request.content)
    message = f"Authorize Failed: ApiKey {sent['ApiKey']} SecretKey {sent['SecretKey']}"
    return httpx.Response(200, content=_body({"Code": 101, "Message": message}))


@pytest.mark.parametrize("respond", [_echo_as_html, _echo_in_message], ids=["html", "message"])
def test_provider_echoing_the_request_does_not_leak_keys(make_client, respond):
    client, _ = make_client(respond)
    with pytest.raises(ProviderError) as caught:
        client.get_callback(ACCOUNT, OA_ID, ["r1"])
    _assert_no_keys(caught.value)


def test_close_twice_is_harmless():
    client = EsmsClient(BASE_URL, 1.0)
    client.close()
    client.close()


def test_the_request_deadline_stands_still_while_before_send_waits() -> None:
    """The time `before_send` spends waiting for a later rate slot is not the request's."""
    from worker.esms_client import _RequestDeadline

    deadline = _RequestDeadline(0.1)
    with deadline.running():
        with deadline.paused():
            time.sleep(0.2)
        assert not deadline.passed()
        time.sleep(0.15)
        assert deadline.passed()
