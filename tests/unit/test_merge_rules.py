"""Unit tests for worker.merge: state derivation, status ranks and choosing among duplicates."""

from __future__ import annotations

import re
import sqlite3

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.merge import (
    FINAL_STATES,
    STATUS_RANK,
    State,
    derive_state,
    most_advanced,
    record_rank,
    sql_status_rank,
    status_rank,
)
from worker.records import CallbackRecord

# --- derive_state -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("send_status", "send_success", "expected"),
    [
        (5, 1, State.SENT),
        (5, 2, State.SENT),
        (5, 100, State.SENT),
        (5, 0, State.FAILED),
        (5, None, State.PENDING),
        (5, -1, State.PENDING),
        (4, 0, State.REJECTED),
        (4, None, State.REJECTED),
        (4, 1, State.REJECTED),
        (0, None, State.PENDING),
        (1, None, State.PENDING),
        (2, None, State.PENDING),
        (2, 1, State.PENDING),
        (7, 1, State.PENDING),
        (7, None, State.PENDING),
        (3, None, State.PENDING),
        (6, 1, State.PENDING),
        (99, 1, State.PENDING),
        (-1, None, State.PENDING),
        (None, None, State.PENDING),
        (None, 1, State.PENDING),
    ],
)
def test_derive_state(send_status, send_success, expected):
    record = CallbackRecord(ref_id="r1", send_status=send_status, send_success=send_success)
    assert derive_state(record) is expected


@pytest.mark.parametrize(
    ("send_success", "send_failed", "expected"),
    [
        (1, 1, State.SENT),  # one success is a delivered message, whatever else failed
        (1, None, State.SENT),
        (0, 0, State.FAILED),
        (0, None, State.FAILED),  # done, and nothing succeeded
        (None, 1, State.FAILED),
        (-1, 1, State.FAILED),
        (None, None, State.PENDING),  # done, but not how: the outcome is not guessed
        (None, 0, State.PENDING),
        (-1, None, State.PENDING),
        (-1, 0, State.PENDING),
    ],
)
def test_sent_status_is_final_only_with_an_outcome(send_success, send_failed, expected):
    record = CallbackRecord(
        ref_id="r1", send_status=5, send_success=send_success, send_failed=send_failed
    )
    assert derive_state(record) is expected


def test_a_report_with_an_outcome_beats_its_twin_without_one():
    done = CallbackRecord(ref_id="r", send_status=5, send_success=1)
    vague = CallbackRecord(ref_id="r", send_status=5)
    assert most_advanced([done, vague]) == [done]
    assert most_advanced([vague, done]) == [done]


def test_final_states():
    assert FINAL_STATES == {State.SENT, State.FAILED, State.REJECTED, State.EXPIRED}
    assert State.PENDING not in FINAL_STATES
    assert {state.value for state in State} == {"pending", "sent", "failed", "rejected", "expired"}


# --- status_rank --------------------------------------------------------------------------------


def test_status_rank_order():
    chain = [None, 0, 1, 2, 99, 7, 4]
    ranks = [status_rank(status) for status in chain]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks), "each step strictly beats the one before"
    assert status_rank(4) == status_rank(5)


@pytest.mark.parametrize("unknown", [3, 6, 8, 9, 99, -1, 12345, 2**31 - 1])
def test_unknown_statuses_rank_between_waiting_and_carrier(unknown):
    assert status_rank(2) < status_rank(unknown) < status_rank(7)
    assert status_rank(unknown) == status_rank(3)


def test_record_rank_is_status_rank():
    for status in [None, 0, 1, 2, 3, 4, 5, 7, 99]:
        assert record_rank(CallbackRecord(ref_id="r", send_status=status)) == status_rank(status)


def test_final_statuses_rank_highest():
    top = max(status_rank(status) for status in [None, 0, 1, 2, 3, 7, 99, *STATUS_RANK])
    assert status_rank(4) == status_rank(5) == top


# --- most_advanced ------------------------------------------------------------------------------


def _rec(ref_id: str, status: int | None, tag: str = "") -> CallbackRecord:
    return CallbackRecord(ref_id=ref_id, send_status=status, request_id=tag or None)


@pytest.mark.parametrize(("older", "newer"), [(2, 5), (7, 5), (None, 2), (0, 1), (2, 99), (99, 7)])
def test_higher_rank_wins_whatever_the_order(older, newer):
    low, high = _rec("a", older, "low"), _rec("a", newer, "high")
    assert most_advanced([low, high]) == [high]
    assert most_advanced([high, low]) == [high]


# (4, 5) is not here: a SendStatus 5 without an outcome does not beat a rejection (the test of
# twins with and without an outcome).
@pytest.mark.parametrize(("first", "second"), [(5, 5), (2, 2), (5, 4), (None, None)])
def test_equal_rank_later_wins(first, second):
    earlier, later = _rec("a", first, "earlier"), _rec("a", second, "later")
    assert most_advanced([earlier, later]) == [later]


def test_order_of_first_appearance_is_kept():
    records = [
        _rec("b", 2, "b1"),
        _rec("a", 5, "a1"),
        _rec("c", None, "c1"),
        _rec("b", 5, "b2"),
        _rec("a", 2, "a2"),
        _rec("c", 7, "c2"),
        _rec("d", 4, "d1"),
    ]
    chosen = most_advanced(records)
    assert [(r.ref_id, r.request_id) for r in chosen] == [
        ("b", "b2"),
        ("a", "a1"),
        ("c", "c2"),
        ("d", "d1"),
    ]


def test_most_advanced_of_nothing_and_of_a_generator():
    assert most_advanced([]) == []
    records = [_rec("a", 2), _rec("b", 5), _rec("a", 5)]
    assert most_advanced(iter(records)) == [records[2], records[1]]


STATUSES = st.sampled_from([None, 0, 1, 2, 3, 4, 5, 7, 99])


def _advance(record):
    return (record_rank(record), derive_state(record) is not State.PENDING)


@given(st.lists(st.tuples(st.sampled_from("abcde"), STATUSES), max_size=30))
@hsettings(max_examples=200, deadline=None)
def test_most_advanced_property(pairs):
    records = [_rec(ref_id, status, str(index)) for index, (ref_id, status) in enumerate(pairs)]
    chosen = most_advanced(records)

    first_seen = list(dict.fromkeys(r.ref_id for r in records))
    assert [r.ref_id for r in chosen] == first_seen
    for record in chosen:
        same = [r for r in records if r.ref_id == record.ref_id]
        best = max(_advance(r) for r in same)
        assert _advance(record) == best
        # Of the records that far along (with an outcome, if one has it), the last one as the
        # provider listed them.
        assert record is [r for r in same if _advance(r) == best][-1]


# --- sql_status_rank ----------------------------------------------------------------------------


def test_sql_status_rank_mentions_every_status():
    sql = sql_status_rank("m.send_status")
    assert "CASE" in sql and sql.rstrip().endswith(")")
    assert "m.send_status IS NULL" in sql
    for status, rank in STATUS_RANK.items():
        assert re.search(rf"WHEN\s+{status}\s+THEN\s+{rank}\b", sql), (status, rank)
    assert "{" not in sql and "}" not in sql


def _evaluate_in_sql(send_status: int | None) -> int:
    # SQLite, in memory, only as an interpreter of standard SQL CASE expressions.
    with sqlite3.connect(":memory:") as conn:
        row = conn.execute(f"SELECT {sql_status_rank('x')} FROM (SELECT ? AS x)", (send_status,))
        return row.fetchone()[0]


@pytest.mark.parametrize("send_status", [None, 0, 1, 2, 3, 4, 5, 6, 7, 8, 99, -1, 2**31 - 1])
def test_sql_status_rank_agrees_with_status_rank(send_status):
    assert _evaluate_in_sql(send_status) == status_rank(send_status)
