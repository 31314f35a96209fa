"""`store.claim_batches`: a tick's claim, grouped into requests by Postgres, against a reference.

The reference model below is the grouping the scheduler did in Python before the claim moved into
one SQL statement: rows oldest-due first, one OAId per batch, at most `batch_size` RefIds, a
batch's place that of its oldest row, the youngest batches cut at `wanted`, and each OA's batches
filled from its due rows past the cut (twice the rows wanted are considered; when that many are
due, short batches come after every full one).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import text

from worker import store
from worker.notfound import ClaimLimits

pytestmark = pytest.mark.integration


def reference(oas: list[str], batch_size: int, wanted: int) -> list[tuple[str, list[str]]]:
    """Rows r0, r1, ... (oldest first) of the given OAs, grouped as the claim must group them."""
    considered = 2 * wanted * batch_size
    rows = [(f"r{index:04d}", oa) for index, oa in enumerate(oas)][:considered]
    truncated = len(rows) == considered
    chunks: dict[tuple[str, int], list[str]] = {}
    seen: dict[str, int] = {}
    for ref_id, oa in rows:
        chunk = seen.get(oa, 0) // batch_size
        seen[oa] = seen.get(oa, 0) + 1
        chunks.setdefault((oa, chunk), []).append(ref_id)
    ordered = sorted(
        chunks.items(),
        key=lambda item: (
            truncated and len(item[1]) < batch_size,
            min(item[1]),
            item[0][0],
            item[0][1],
        ),
    )
    return [(oa, sorted(refs)) for (oa, _), refs in ordered[:wanted]]


def load(engine, oas: list[str], *, polled=(), due_seconds_ago: float = 60) -> None:
    """One pending row per entry of `oas`, due in that order (r0 the oldest)."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE messages, poll_batches"))
        if not oas:
            return
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, next_poll_at, poll_count) VALUES "
                "(:ref_id, :oa_id, now() - make_interval(secs => :ago), :polls)"
            ),
            [
                {
                    "ref_id": f"r{index:04d}",
                    "oa_id": oa,
                    "ago": due_seconds_ago - index * 0.001,
                    "polls": 1 if f"r{index:04d}" in polled else 0,
                }
                for index, oa in enumerate(oas)
            ],
        )


def claim(engine, wanted: int, batch_size: int, **options) -> list[store.Batch]:
    with engine.begin() as conn:
        return store.claim_batches(conn, "default", wanted, batch_size, 60, **options)


def shape(batches: list[store.Batch]) -> list[tuple[str, list[str]]]:
    return [(batch.oa_id, sorted(batch.ref_ids)) for batch in batches]


@hsettings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    oas=st.lists(st.sampled_from("ABCD"), min_size=0, max_size=60),
    batch_size=st.integers(min_value=1, max_value=7),
    wanted=st.integers(min_value=1, max_value=6),
)
def test_claim_groups_like_the_reference(engine, oas, batch_size, wanted):
    load(engine, oas)
    batches = claim(engine, wanted, batch_size)
    assert shape(batches) == reference(oas, batch_size, wanted)
    # Leased: each row points at its batch, and nothing claimed is due again.
    with engine.begin() as conn:
        leases = dict(
            conn.execute(
                text("SELECT ref_id, lease_id FROM messages WHERE lease_id IS NOT NULL")
            ).all()
        )
        recorded = conn.execute(text("SELECT count(*) FROM poll_batches")).scalar()
    assert leases == {ref: batch.id for batch in batches for ref in batch.ref_ids}
    assert recorded == len(batches)


def test_a_big_backlog_due_at_one_moment_goes_out_in_full_requests(engine):
    # 5 OAs, every row due at the same instant (a sender's bulk insert), far more than a tick
    # takes: every batch is full.
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE messages, poll_batches"))
        conn.execute(
            text(
                "INSERT INTO messages (ref_id, oa_id, next_poll_at) "
                "SELECT 'm' || g, 'oa' || (g % 5), now() - interval '1 minute' "
                "FROM generate_series(1, 5000) AS g"
            )
        )
    batches = claim(engine, 12, 100)
    assert [len(batch.ref_ids) for batch in batches] == [100] * 12


def test_one_oa_split_by_batch_size_and_filled_past_the_cut(engine):
    # Wanted 2 batches of 3 from OAs A and B: A's second batch takes a row past the 6 wanted.
    load(engine, list("AABABAA"))
    assert shape(claim(engine, 2, 3)) == [
        ("A", ["r0000", "r0001", "r0003"]),
        ("B", ["r0002", "r0004"]),
    ]


def test_nothing_due_nothing_claimed(engine):
    load(engine, list("AB"), due_seconds_ago=-30)
    assert claim(engine, 5, 10) == []
    load(engine, list("AB"))
    assert claim(engine, 0, 10) == []


def test_cooling_off_oas_are_skipped(engine):
    load(engine, list("ABAB"))
    assert shape(claim(engine, 5, 10, skip_oas=["A"])) == [("B", ["r0001", "r0003"])]


def test_short_batches_of_first_polls_may_wait_for_more(engine):
    # Due for 2 s, never polled: with a 10 s fill wait a short batch waits; a full one goes,
    # and so does a short one holding a row already polled (its gap must not grow).
    load(engine, list("AAAB" + "C"), polled={"r0004"}, due_seconds_ago=2)
    assert shape(claim(engine, 5, 3, fill_seconds=10)) == [
        ("A", ["r0000", "r0001", "r0002"]),
        ("C", ["r0004"]),
    ]
    # Due for longer than the fill wait: it goes now.
    with engine.begin() as conn:
        conn.execute(text("UPDATE messages SET next_poll_at = next_poll_at - interval '20 s'"))
    assert shape(claim(engine, 5, 3, fill_seconds=10)) == [("B", ["r0003"])]


def test_a_row_another_transaction_holds_waits_for_the_next_tick(engine):
    load(engine, list("AAA"))
    with engine.connect() as holder:
        holder.begin()
        holder.execute(text("SELECT 1 FROM messages WHERE ref_id = 'r0001' FOR UPDATE"))
        (batch,) = claim(engine, 1, 10)
        holder.rollback()
    assert batch.ref_ids == ("r0000", "r0002")
    (later,) = claim(engine, 1, 10)
    assert later.ref_ids == ("r0001",)


def test_lease_moves_the_rows_next_poll(engine):
    load(engine, list("A"))
    (batch,) = claim(engine, 1, 10)
    with engine.begin() as conn:
        gap = conn.execute(
            text("SELECT next_poll_at - now() FROM messages WHERE ref_id = 'r0000'")
        ).scalar()
    assert timedelta(seconds=59) < gap <= timedelta(seconds=60)
    assert batch.account == "default"


def reference_with_kinds(
    rows: list[tuple[str, str]], batch_size: int, wanted: int, limits: ClaimLimits
) -> list[tuple[str, str, list[str]]]:
    """The reference grouping with the kinds of worker.notfound: (OA, kind) per row, oldest
    first; a kind's batch size (`new` only when its size is smaller, else it counts as known);
    at most `new_limit` new and `lone_limit` lone batches, the oldest of each kind first."""
    considered = 2 * wanted * batch_size
    named = [(f"r{index:04d}", oa, kind) for index, (oa, kind) in enumerate(rows)][:considered]
    truncated = len(named) == considered
    separate_new = limits.new_size < batch_size
    size_of = {"known": batch_size, "new": limits.new_size, "lone": 1}
    chunks: dict[tuple[str, str, int], list[str]] = {}
    seen: dict[tuple[str, str], int] = {}
    for ref_id, oa, kind in named:
        if kind == "new" and not separate_new:
            kind = "known"
        count = seen.get((oa, kind), 0)
        seen[(oa, kind)] = count + 1
        chunks.setdefault((oa, kind, count // size_of[kind]), []).append(ref_id)
    limit_of = {"known": len(chunks), "new": limits.new_limit, "lone": limits.lone_limit}
    allowed = []
    for kind in ("known", "new", "lone"):
        of_kind = sorted((min(refs), key) for key, refs in chunks.items() if key[1] == kind)
        allowed += [key for _, key in of_kind[: limit_of[kind]]]
    ordered = sorted(
        allowed,
        key=lambda key: (truncated and len(chunks[key]) < size_of[key[1]], min(chunks[key])),
    )
    return [(oa, kind, sorted(chunks[(oa, kind, chunk)])) for oa, kind, chunk in ordered[:wanted]]


@hsettings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from("AB"), st.sampled_from(["known", "new", "lone"])), max_size=50
    ),
    batch_size=st.integers(min_value=2, max_value=7),
    wanted=st.integers(min_value=1, max_value=8),
    new_size=st.integers(min_value=1, max_value=7),
    new_limit=st.integers(min_value=1, max_value=4),
    lone_limit=st.integers(min_value=1, max_value=4),
)
def test_claim_keeps_kinds_apart_like_the_reference(
    engine, rows, batch_size, wanted, new_size, new_limit, lone_limit
):
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE messages, poll_batches"))
        if rows:
            conn.execute(
                text(
                    "INSERT INTO messages (ref_id, oa_id, next_poll_at, poll_count,"
                    " not_found_count) VALUES (:ref_id, :oa_id,"
                    " now() - make_interval(secs => :ago), :polls, :nf)"
                ),
                [
                    {
                        "ref_id": f"r{index:04d}",
                        "oa_id": oa,
                        "ago": 60 - index * 0.001,
                        "polls": 1 if kind == "known" else 0,
                        "nf": 1 if kind == "lone" else 0,
                    }
                    for index, (oa, kind) in enumerate(rows)
                ],
            )
    limits = ClaimLimits(min(new_size, batch_size), new_limit, lone_limit)
    batches = claim(engine, wanted, batch_size, limits=limits)
    got = [(batch.oa_id, batch.kind, sorted(batch.ref_ids)) for batch in batches]
    assert got == reference_with_kinds(rows, batch_size, wanted, limits)
