"""Unit tests for the scheduler's pure parts: grouping, interleaving and `batches_wanted`."""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.scheduler import (
    batches_wanted,
    group_into_batches,
    hold_partial_batches,
    interleave_accounts,
)
from worker.settings import Settings
from worker.store import Batch, DueRow


def _rows(spec: str) -> list[DueRow]:
    """'AABA' -> rows a0 (OA A), a1 (OA A), b2 (OA B), a3 (OA A): oldest first."""
    return [DueRow(f"{oa.lower()}{index}", oa) for index, oa in enumerate(spec)]


def _shape(batches: list[Batch]) -> list[tuple[str, tuple[str, ...]]]:
    return [(batch.oa_id, batch.ref_ids) for batch in batches]


# --- group_into_batches: examples -----------------------------------------------------------------


def test_no_rows_no_batches():
    assert group_into_batches("shop", [], 200, 10) == []
    assert group_into_batches("shop", iter([]), 200, 10) == []


def test_batch_fields():
    [batch] = group_into_batches("shop", _rows("AA"), 200, 10)
    assert isinstance(batch, Batch)
    assert isinstance(batch.id, uuid.UUID)
    assert batch.account == "shop"
    assert batch.oa_id == "A"
    assert batch.ref_ids == ("a0", "a1")
    assert isinstance(batch.ref_ids, tuple)


def test_batch_ids_are_unique():
    batches = group_into_batches("shop", _rows("AB" * 50), 1, 1000)
    assert len({batch.id for batch in batches}) == len(batches) == 100


def test_one_oa_split_by_batch_size():
    rows = [DueRow(f"r{index:03d}", "oa") for index in range(450)]
    batches = group_into_batches("shop", rows, 200, 10)
    assert [len(batch.ref_ids) for batch in batches] == [200, 200, 50]
    assert [ref for batch in batches for ref in batch.ref_ids] == [row.ref_id for row in rows]
    assert {batch.oa_id for batch in batches} == {"oa"}


def test_interleaved_oas_are_grouped():
    batches = group_into_batches("shop", _rows("ABABCA"), 200, 10)
    assert _shape(batches) == [
        ("A", ("a0", "a2", "a5")),
        ("B", ("b1", "b3")),
        ("C", ("c4",)),
    ]


def test_batch_order_follows_oldest_row():
    batches = group_into_batches("shop", _rows("BAAB" + "C" + "AB"), 2, 10)
    assert _shape(batches) == [
        ("B", ("b0", "b3")),
        ("A", ("a1", "a2")),
        ("C", ("c4",)),
        ("A", ("a5",)),
        ("B", ("b6",)),
    ]


def test_max_batches_drops_youngest_rows():
    batches = group_into_batches("shop", _rows("AABBCCAA"), 2, 2)
    assert _shape(batches) == [("A", ("a0", "a1")), ("B", ("b2", "b3"))]


def test_cut_still_fills_requests_already_going_out():
    # A younger row of an OA whose request is not full costs no extra request.
    batches = group_into_batches("shop", _rows("ABCA"), 2, 1)
    assert _shape(batches) == [("A", ("a0", "a3"))]


def test_max_batches_zero_is_nothing():
    assert group_into_batches("shop", _rows("AB"), 200, 0) == []


def test_batch_size_one():
    batches = group_into_batches("shop", _rows("AAB"), 1, 10)
    assert _shape(batches) == [("A", ("a0",)), ("A", ("a1",)), ("B", ("b2",))]


def test_same_ref_in_two_oas_stays_with_its_own_oa():
    rows = [DueRow("x", "A"), DueRow("y", "B"), DueRow("z", "A")]
    batches = group_into_batches("shop", rows, 200, 10)
    assert _shape(batches) == [("A", ("x", "z")), ("B", ("y",))]


# --- group_into_batches: properties ---------------------------------------------------------------


@given(
    oas=st.lists(st.sampled_from(["A", "B", "C", "D"]), max_size=60),
    batch_size=st.integers(min_value=1, max_value=8),
    max_batches=st.integers(min_value=0, max_value=12),
)
@hsettings(max_examples=200, deadline=None)
def test_grouping_properties(oas, batch_size, max_batches):
    rows = [DueRow(f"r{index}", oa) for index, oa in enumerate(oas)]
    age = {row.ref_id: index for index, row in enumerate(rows)}
    oa_of = {row.ref_id: row.oa_id for row in rows}
    batches = group_into_batches("acct", rows, batch_size, max_batches)

    assert len(batches) <= max_batches
    placed = [ref for batch in batches for ref in batch.ref_ids]
    assert len(placed) == len(set(placed)), "a RefId goes out at most once"
    for batch in batches:
        assert batch.account == "acct"
        assert 1 <= len(batch.ref_ids) <= batch_size
        assert all(oa_of[ref] == batch.oa_id for ref in batch.ref_ids)
        ages = [age[ref] for ref in batch.ref_ids]
        assert ages == sorted(ages), "oldest first inside a request"

    firsts = [age[batch.ref_ids[0]] for batch in batches]
    assert firsts == sorted(firsts), "requests go out oldest first"

    for oa in set(oas):
        mine = [row.ref_id for row in rows if row.oa_id == oa]
        kept = [ref for ref in placed if oa_of[ref] == oa]
        assert kept == mine[: len(kept)], "an OA's rows are kept oldest first, without gaps"
        sizes = [len(batch.ref_ids) for batch in batches if batch.oa_id == oa]
        assert all(size == batch_size for size in sizes[:-1]), "only an OA's last request is short"

    dropped = [row for row in rows if row.ref_id not in set(placed)]
    if dropped:
        assert len(batches) == max_batches, "rows are dropped only at the cut"
    for row in dropped:
        assert all(first < age[row.ref_id] for first in firsts), "the youngest rows are dropped"
        assert all(
            len(batch.ref_ids) == batch_size for batch in batches if batch.oa_id == row.oa_id
        ), "no room was left in a request of the dropped row's OA"

    needed = sum(math.ceil(oas.count(oa) / batch_size) for oa in set(oas))
    if needed <= max_batches:
        assert sorted(placed) == sorted(row.ref_id for row in rows), "nothing dropped"
        assert len(batches) == needed, "as few requests as possible"


# --- batches_wanted -------------------------------------------------------------------------------


def _settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def test_batches_wanted_with_defaults():
    settings = _settings(
        esms_rate_limit_per_second=20, esms_rate_safety_margin=0.04, schedule_lookahead_seconds=2
    )
    target = math.ceil(20 * 0.96 * 2)
    assert target == 39
    assert batches_wanted(settings, 0) == 39
    assert batches_wanted(settings, 10) == 29
    assert batches_wanted(settings, 39) == 0
    assert batches_wanted(settings, 40) == 0
    assert batches_wanted(settings, 10_000) == 0


def test_batches_wanted_rounds_up_a_fraction():
    settings = _settings(
        esms_rate_limit_per_second=1, esms_rate_safety_margin=0, schedule_lookahead_seconds=0.1
    )
    assert batches_wanted(settings, 0) == 1
    assert batches_wanted(settings, 1) == 0


@pytest.mark.parametrize("in_flight", [0, 1, 5])
def test_batches_wanted_scales_with_rate(in_flight):
    slow = _settings(esms_rate_limit_per_second=1, schedule_lookahead_seconds=2)
    fast = _settings(esms_rate_limit_per_second=100, schedule_lookahead_seconds=2)
    assert batches_wanted(fast, in_flight) > batches_wanted(slow, in_flight)


@given(
    rate=st.floats(min_value=0.01, max_value=1000),
    margin=st.floats(min_value=0, max_value=0.49),
    lookahead=st.floats(min_value=0.01, max_value=30),
    in_flight=st.integers(min_value=0, max_value=100_000),
)
@hsettings(max_examples=200, deadline=None)
def test_batches_wanted_property(rate, margin, lookahead, in_flight):
    settings = _settings(
        esms_rate_limit_per_second=rate,
        esms_rate_safety_margin=margin,
        schedule_lookahead_seconds=lookahead,
    )
    wanted = batches_wanted(settings, in_flight)
    target = math.ceil(settings.effective_rate_per_second * settings.schedule_lookahead_seconds)
    assert settings.effective_rate_per_second == pytest.approx(rate * (1 - margin))
    assert isinstance(wanted, int)
    assert wanted >= 0
    assert wanted == max(0, target - in_flight)
    if in_flight == 0:
        assert wanted >= 1, "an idle account always gets at least one request"


# --- interleave_accounts ------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=6), max_size=4))
def test_interleave_keeps_every_batch_and_each_accounts_order(sizes):
    per_account = [
        [Batch(uuid.uuid4(), f"acct{a}", "oa", (f"r{a}-{i}",)) for i in range(n)]
        for a, n in enumerate(sizes)
    ]
    merged = interleave_accounts(per_account)
    assert sorted(b.id.int for b in merged) == sorted(b.id.int for bs in per_account for b in bs)
    for batches in per_account:
        assert [b for b in merged if b in batches] == batches
    # No account gets two turns in a row while another still has batches waiting.
    for index in range(1, len(merged)):
        if merged[index].account == merged[index - 1].account:
            rest = {b.account for b in merged[index:]}
            assert rest == {merged[index].account}


# --- hold_partial_batches -------------------------------------------------------------------------


def test_hold_keeps_full_batches_and_short_ones_with_a_row_that_may_not_wait():
    rows = [DueRow("a0", "A", True), DueRow("a1", "A", True), DueRow("b0", "B", True)]
    rows += [DueRow("b1", "B", False), DueRow("c0", "C", True), DueRow("c1", "C", True)]
    batches = group_into_batches("shop", rows, 2, 10)
    batches += group_into_batches("shop", [DueRow("d0", "D", True)], 2, 10)
    kept = hold_partial_batches(batches, rows + [DueRow("d0", "D", True)], 2)
    # A, B and C are full; D is short and all its rows may wait.
    assert [b.oa_id for b in kept] == ["A", "B", "C"]
    short = group_into_batches("shop", [DueRow("e0", "E", False)], 2, 10)
    assert hold_partial_batches(short, [DueRow("e0", "E", False)], 2) == short


@given(st.lists(st.tuples(st.sampled_from("ABC"), st.booleans()), max_size=30))
def test_hold_only_drops_short_batches_whose_rows_all_may_wait(spec):
    rows = [DueRow(f"r{i}", oa, may_wait) for i, (oa, may_wait) in enumerate(spec)]
    batches = group_into_batches("shop", rows, 4, 100)
    kept = hold_partial_batches(batches, rows, 4)
    waiting = {row.ref_id for row in rows if row.may_wait}
    for batch in batches:
        held = len(batch.ref_ids) < 4 and set(batch.ref_ids) <= waiting
        assert (batch not in kept) == held
