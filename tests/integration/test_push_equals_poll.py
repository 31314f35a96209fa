"""A pushed status is stored exactly as a polled one (property-based, real Postgres, real receiver).

For any sequence of statuses eSMS could report for a message, drawn with every encoding it uses
(numbers as JSON numbers, numeric strings or floats, `null` / empty / blank for a missing value,
text in ErrorInfo's many wrappings), one row is written from the GetCallback items (through
`records.parse_callback_item` and the poller's merge) and a twin row from the same statuses sent
as eSMS's push GET (every field present, a null as an empty value, numbers as text) to a real
`python -m worker.receiver` over a socket. The two rows must be equal column by column, and so
must their history, with one documented exception: `callback_url` is the URL the push was sent to.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.integration.test_receiver import start_receiver
from tests.processes import Children
from worker import store
from worker.emulator.push import PUSH_FIELDS
from worker.records import parse_callback_item

pytestmark = pytest.mark.integration

ZALO = '{"error":-118,"message":"User is not on Zalo"}'
# Columns that differ by construction: the key, the URL, and when each row was written.
NOT_COMPARED = {"ref_id", "callback_url", "created_at", "updated_at", "resolved_at"}


def _integers(values: st.SearchStrategy[int]) -> st.SearchStrategy:
    """An integer as GetCallback may spell it: absent, a number, a numeric string, a float."""
    return st.one_of(
        st.none(),
        st.just(""),
        values,
        values.map(str),
        values.map(float),
        values.map(lambda n: f"{n}.0"),
    )


_PRICES = st.sampled_from([Decimal("0"), Decimal("220"), Decimal("300"), Decimal("385.5")])
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12
)  # anything UTF-8 can carry
_BLANK = st.sampled_from(["", " ", "  ", "\t", "\r\n", " \t "])
_ERROR_INFO = st.sampled_from(
    [
        ZALO,
        ZALO + "Object reference not set to an instance of an object.",
        json.dumps(ZALO),
        quote(quote(ZALO, safe=""), safe=""),
        ZALO + "____05/03/2025 14:07:31",
        "Số điện thoại không hợp lệ",
    ]
)


def _texts(real: st.SearchStrategy[str]) -> st.SearchStrategy:
    return st.one_of(st.none(), _BLANK, real, _TEXT)


# GetCallback item name -> strategy for its value.
ITEM = {
    "SendStatus": st.sampled_from([0, 1, 2, 4, 5, 7]).flatmap(
        lambda n: st.sampled_from([n, str(n), float(n), f"{n}.0"])
    ),
    "SendFailed": _integers(st.integers(0, 1)),
    "SendSuccess": _integers(st.integers(0, 1)),
    "TotalPrice": st.one_of(
        st.none(),
        st.just(""),
        _PRICES.map(float),
        _PRICES.map(str),
        _PRICES.map(lambda d: f"{d:.1f}"),
    ),
    "TotalReceiver": _integers(st.integers(0, 2)),
    "TotalSent": _integers(st.integers(0, 2)),
    "RequestId": _texts(st.just("req-7f3a")),
    "TypeId": _integers(st.sampled_from([24, 25, 26, 27])),
    "Telcoid": _integers(st.integers(1, 9)),
    "PhoneNumber": _texts(st.just("0909090909")),
    "Partnerids": _texts(st.just("7984e9b198c40e9957d6")),
    "ErrorInfo": _texts(_ERROR_INFO),
    "OAId": st.just("1090257973118325189"),
    "ZnsTempId": st.one_of(_texts(st.just("228386")), st.just(228386)),
}
items = st.fixed_dictionaries(ITEM)


def push_value(value) -> str:
    """A value as eSMS writes it into the push's query string (a .NET double: no `.0`)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def push_query(ref_id: str, item: dict) -> str:
    fields = {**item, "SMSID": ref_id}
    pairs = [(name, push_value(fields.get(key))) for key, name in PUSH_FIELDS]
    return urlencode(pairs, quote_via=quote)


@pytest.fixture(scope="module")
def receiver(database_url, tmp_path_factory):
    children = Children(Path(tmp_path_factory.mktemp("push-equals-poll")))
    try:
        yield start_receiver(children, database_url, workers=1)
    finally:
        children.stop_all()


def rows(engine, *ref_ids: str) -> list[dict]:
    with engine.begin() as conn:
        found = conn.execute(
            text("SELECT * FROM messages WHERE ref_id = ANY(:r) ORDER BY ref_id"),
            {"r": list(ref_ids)},
        )
        return [dict(row) for row in found.mappings()]


def history(engine, ref_id: str) -> list[tuple]:
    with engine.begin() as conn:
        return conn.execute(
            text(
                "SELECT old_state, new_state, old_send_status, new_send_status, error_code "
                "FROM message_history WHERE ref_id = :r ORDER BY id"
            ),
            {"r": ref_id},
        ).all()


@given(st.lists(items, min_size=1, max_size=3))
@example(  # eSMS's own sample, then its push with `partnerids=` and `RequestId=`
    [
        {
            "SendStatus": 2,
            "SendFailed": 0,
            "SendSuccess": 0,
            "TotalPrice": 0.0,
            "TotalReceiver": 1,
            "TotalSent": 0,
            "RequestId": None,
            "TypeId": 25,
            "Telcoid": 1,
            "PhoneNumber": "0909090909",
            "Partnerids": "",
            "ErrorInfo": "",
            "OAId": "1090257973118325189",
            "ZnsTempId": "228386",
        },
        {
            "SendStatus": 5,
            "SendFailed": 1,
            "SendSuccess": 0,
            "TotalPrice": 300.0,
            "TotalReceiver": 1,
            "TotalSent": 1,
            "RequestId": None,
            "TypeId": 25,
            "Telcoid": 1,
            "PhoneNumber": "0909090909",
            "Partnerids": "7984e9b198c40e9957d6",
            "ErrorInfo": ZALO + "Object reference not set to an instance of an object.",
            "OAId": "1090257973118325189",
            "ZnsTempId": 228386,
        },
    ]
)
@hsettings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_a_pushed_status_is_stored_exactly_as_a_polled_one(engine, receiver, reports):
    polled, pushed = f"poll-{uuid.uuid4().hex}", f"push-{uuid.uuid4().hex}"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, created_at, next_poll_at) "
                "VALUES (:r, '1090257973118325189', now(), now() + interval '1 hour')"
            ),
            [{"r": polled}, {"r": pushed}],
        )
    for item in reports:
        record = parse_callback_item({**item, "SMSID": polled, "CallbackUrl": "https://x.test/cb"})
        with engine.begin() as conn:
            store.merge_callbacks(conn, [record], source="poll")
        answer = httpx.get(f"{receiver.push_url()}?{push_query(pushed, item)}", timeout=10)
        # 400 only for what the poll path cannot use either: no integer SendStatus.
        assert answer.status_code == (200 if record.send_status is not None else 400), answer.text
    by_poll, by_push = rows(engine, polled, pushed)
    differing = {
        column: (by_poll[column], by_push[column])
        for column in by_poll
        if column not in NOT_COMPARED and by_poll[column] != by_push[column]
    }
    assert differing == {}
    assert (by_poll["resolved_at"] is None) == (by_push["resolved_at"] is None)
    assert history(engine, polled) == history(engine, pushed)
    # NULL, never '': whichever path wrote it, an absent value reads as absent.
    for row in (by_poll, by_push):
        for column, value in row.items():
            assert not (isinstance(value, str) and not value.strip()), (column, value)
