"""Unit tests for the scheduler's pure parts: interleaving and `batches_wanted`. (Grouping into
batches happens in Postgres: tests/integration/test_claim.py.)"""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.scheduler import batches_wanted, interleave_accounts
from worker.settings import Settings
from worker.store import Batch

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
