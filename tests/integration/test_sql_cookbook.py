"""docs/sql.md cannot rot: every `sql` block in it runs against a database holding messages in every
state, with their history, a request in flight and a heartbeat, and returns what it promises.

The views' documented column tables are compared with the columns Postgres reports, and the
views' migration is taken down and up again.
"""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL, _server_url, alembic_config
from worker import store
from worker.records import CallbackRecord

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "sql.md"
VIEWS = ("message_counts", "pending_backlog", "resolved_hourly", "failures_by_error")

OA_X = "1090257973118325189"
OA_Y = "4318249720583317428"
OA_B = "7725900316449816055"
REF_X = "4a496110-9fd3-4838-ac8b-bcaa36616f7011"
VARIABLES = {"ref_id": REF_X, "oa_id": OA_X}
_VARIABLE = re.compile(r":'(\w+)'")


# --- the document -----------------------------------------------------------------------------


def sql_blocks(markdown: str) -> list[tuple[str, str]]:
    """(nearest heading above, body) of every ```sql block, headings without backticks."""
    blocks, heading, body = [], "", None
    for line in markdown.splitlines():
        if body is not None:
            if line.strip() == "```":
                blocks.append((heading, "\n".join(body)))
                body = None
            else:
                body.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip().replace("`", "")
        elif line.strip() == "```sql":
            body = []
    assert body is None, "unterminated ```sql block"
    return blocks


def column_tables(markdown: str) -> dict[str, list[tuple[str, str]]]:
    """For each `### `view`` heading, the (column, type) rows of the table beneath it."""
    tables: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in markdown.splitlines():
        heading = re.fullmatch(r"### `(\w+)`", line.strip())
        if heading:
            current = tables.setdefault(heading.group(1), [])
            continue
        cell = re.match(r"\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|", line)
        if current is not None and cell:
            current.append((cell.group(1), cell.group(2)))
    return tables


def with_variables(sql: str) -> str:
    """psql's `:'name'` interpolation: the variable's value as a quoted literal."""

    def literal(match: re.Match) -> str:
        name = match.group(1)
        assert name in VARIABLES, f"docs/sql.md uses :'{name}', which the test does not set"
        return "'" + VARIABLES[name].replace("'", "''") + "'"

    return _VARIABLE.sub(literal, sql)


BLOCKS = sql_blocks(DOC.read_text())


# --- the data ---------------------------------------------------------------------------------


def zalo_error(code: int, message: str) -> str:
    # As eSMS stores it: Zalo's compact JSON object, then a .NET exception message.
    compact = json.dumps({"error": code, "message": message}, separators=(",", ":"))
    return compact + "Object reference not set to an instance of an object."


ERR_118 = zalo_error(-118, "Zalo account does not exist or has been disabled")
ERR_118_OLD = zalo_error(-118, "Số điện thoại chưa đăng ký tài khoản Zalo")
ERR_124 = zalo_error(-124, "Access token is invalid")
ERR_108 = zalo_error(-108, "Phone number is invalid")
OK_INFO = '{"error":0,"message":"Success"}'


def sent(ref_id: str, price: str, temp: str = "231001") -> CallbackRecord:
    return CallbackRecord(
        ref_id, send_status=5, send_success=1, send_failed=0, total_receiver=1, total_sent=1,
        type_id=24, telco_id=1, total_price=Decimal(price), request_id=f"req-{ref_id}",
        phone_number="84901234567", partner_ids="order-1", error_info=OK_INFO, zns_temp_id=temp,
    )  # fmt: skip


def failed(ref_id: str, info: str) -> CallbackRecord:
    return CallbackRecord(
        ref_id, send_status=5, send_success=0, send_failed=1, total_receiver=1, total_sent=0,
        total_price=Decimal("0"), phone_number="84907654321", error_info=info, zns_temp_id="231001",
    )  # fmt: skip


def fill(engine) -> None:
    """Messages in every state over two accounts and three OAs; see the checks for the counts."""
    rows = [
        # ref_id, account, oa_id, created ago, next poll in (None: not yet scheduled)
        (REF_X, "default", OA_X, "20 minutes", "0 seconds"),
        ("x-sent-2", "default", OA_X, "10 minutes", "0 seconds"),
        ("x-sent-3", "default", OA_X, "10 minutes", "0 seconds"),
        ("x-failed-118", "default", OA_X, "10 minutes", "0 seconds"),
        ("x-failed-124", "default", OA_X, "10 minutes", "0 seconds"),
        ("x-rejected", "default", OA_X, "10 minutes", "0 seconds"),
        ("x-sent-old", "default", OA_X, "11 days", "0 seconds"),
        ("x-failed-old", "default", OA_X, "11 days", "0 seconds"),
        ("x-expired", "default", OA_X, "4 days", "-1 hour"),
        ("p-overdue", "default", OA_X, "2 hours", "-1 hour"),
        ("p-later", "default", OA_X, "1 minute", "5 minutes"),
        ("p-old", "default", OA_X, "2 days", "1 minute"),
        ("y-sent", "default", OA_Y, "10 minutes", "0 seconds"),
        ("y-inflight", "default", OA_Y, "3 minutes", "-10 seconds"),
        ("y-new", "default", OA_Y, "1 second", None),
        ("b-failed", "shopb", OA_B, "10 minutes", "0 seconds"),
        ("b-pending", "shopb", OA_B, "1 minute", "-10 seconds"),
    ]
    with engine.begin() as conn:
        store.track(
            conn, [store.NewMessage(ref, oa_id=oa, account=acc) for ref, acc, oa, *_ in rows]
        )
        for ref_id, _, _, ago, due_in in rows:
            conn.execute(
                text(
                    "UPDATE messages SET created_at = now() - CAST(:ago AS interval), "
                    "next_poll_at = now() + CAST(:due_in AS interval) WHERE ref_id = :ref_id"
                ),
                {"ref_id": ref_id, "ago": ago, "due_in": due_in},
            )
    # RefId X moves step by step, one poll at a time.
    for record in (CallbackRecord(REF_X, send_status=2), CallbackRecord(REF_X, send_status=7)):
        with engine.begin() as conn:
            store.merge_callbacks(conn, [record], batch_id=uuid.uuid4())
    with engine.begin() as conn:
        store.merge_callbacks(
            conn,
            [
                sent(REF_X, "385.5"),
                sent("x-sent-2", "385.5"),
                sent("x-sent-3", "200", temp="231002"),
                failed("x-failed-118", ERR_118),
                failed("x-failed-124", ERR_124),
                CallbackRecord("x-rejected", send_status=4, error_info=ERR_108),
                sent("x-sent-old", "999"),
                failed("x-failed-old", ERR_118_OLD),
                sent("y-sent", "150"),
                CallbackRecord("p-overdue", send_status=2),
            ],
            batch_id=uuid.uuid4(),
        )
        store.merge_callbacks(conn, [failed("b-failed", ERR_118)], source="push")
        # Two messages became final ten days ago: outside "today", "this week", "last hour".
        conn.execute(
            text(
                "UPDATE messages SET resolved_at = now() - interval '10 days' "
                "WHERE ref_id IN ('x-sent-old', 'x-failed-old')"
            )
        )
        conn.execute(
            text(
                "UPDATE message_history SET at = now() - interval '10 days' "
                "WHERE ref_id IN ('x-sent-old', 'x-failed-old')"
            )
        )
        assert store.expire_old(conn, 259200, []) == 1  # no account configured: the age alone
        batch = store.Batch(uuid.uuid4(), "default", OA_Y, ("y-inflight",))
        store.lease_batches(conn, "default", [batch], 60)
        store.heartbeat(conn)
    # resolved_at was changed by hand above: the counts of final rows are recounted, as an
    # operator does after such a change (docs/scale.md).
    store.recount(engine)


# --- what each question must answer -----------------------------------------------------------


def by(rows, *keys):
    return {tuple(row[key] for key in keys): row for row in rows}


def check_counts(rows):
    table = by(rows, "account", "oa_id", "state")
    assert table["default", OA_X, "sent"]["messages"] == 4
    assert table["default", OA_X, "sent"]["total_price"] == Decimal("1970.0")
    assert table["default", OA_X, "pending"]["messages"] == 3
    assert table["default", OA_X, "pending"]["total_price"] == 0
    assert table["default", OA_X, "expired"]["messages"] == 1
    assert table["shopb", OA_B, "failed"]["messages"] == 1
    assert sum(row["messages"] for row in rows) == 17


def check_backlog(rows):
    table = by(rows, "account", "oa_id")
    assert {
        key: (row["pending"], row["overdue"], row["in_flight"]) for key, row in table.items()
    } == {
        ("default", OA_X): (3, 1, 0),
        ("default", OA_Y): (2, 0, 1),
        ("shopb", OA_B): (1, 1, 0),
    }
    assert table["default", OA_X]["oldest_age"].days == 2


def check_backlog_view(rows):
    check_backlog(rows)
    assert all(row["oldest_created_at"] is not None for row in rows)


def check_hourly(rows):
    # The ten-day-old rows are outside the last 24 hours.
    assert sum(row["messages"] for row in rows) == 9
    assert {row["state"] for row in rows} == {"sent", "failed", "rejected", "expired"}
    spent = by([r for r in rows if r["state"] == "sent"], "oa_id", "zns_temp_id")
    assert spent[OA_X, "231001"]["total_price"] == Decimal("771.0")
    assert spent[OA_X, "231002"]["total_price"] == Decimal("200")


def check_failures_view(rows):
    table = by(rows, "account", "error_code")
    assert {key: row["messages"] for key, row in table.items()} == {
        ("default", -118): 2,
        ("default", -124): 1,
        ("default", -108): 1,
        ("shopb", -118): 1,
    }
    assert table["default", -118]["sample_error_info"] == ERR_118


def check_failed_today(rows):
    assert {(row["state"], row["error_code"]): row["messages"] for row in rows} == {
        ("failed", -118): 2,
        ("failed", -124): 1,
        ("rejected", -108): 1,
    }
    assert by(rows, "error_code")[-124,]["latest_error_info"] == ERR_124


def check_failed_today_rows(rows):
    assert {row["ref_id"] for row in rows} == {
        "x-failed-118", "x-failed-124", "x-rejected", "b-failed"
    }  # fmt: skip
    assert all(row["error_info"] for row in rows)


def check_oa_spend(rows):
    (row,) = rows
    # 3 sent, 2 failed, 1 rejected, 1 expired this week; last week's 999 is not counted.
    assert (row["messages"], row["sent"], row["spent"]) == (7, 3, Decimal("971.0"))


def check_spend_per_day(rows):
    assert sum(row["spent"] for row in rows) == Decimal("1121.0")
    assert {row["oa_id"] for row in rows} == {OA_X, OA_Y, OA_B}


def check_stuck(rows):
    assert [row["ref_id"] for row in rows] == ["p-old", "p-overdue"]
    assert all(not row["in_flight"] for row in rows)


def check_history(rows):
    assert [(r["source"], r["old_state"], r["new_state"], r["new_send_status"]) for r in rows] == [
        ("poll", "pending", "pending", 2),
        ("poll", "pending", "pending", 7),
        ("poll", "pending", "sent", 5),
    ]
    assert all(row["batch_id"] is not None for row in rows)
    assert len({row["batch_id"] for row in rows}) == 3


def check_rate(rows):
    table = {row["state"]: row["messages"] for row in rows}
    assert table == {"sent": 4, "failed": 3, "rejected": 1, "expired": 1}
    assert by(rows, "state")["sent",]["per_minute"] == Decimal("0.4")


def check_changes_per_minute(rows):
    assert sum(row["resolved"] for row in rows) == 9
    assert sum(row["progressed"] for row in rows) == 3


def check_heartbeat(rows):
    (row,) = rows
    assert row["ticks"] == 1 and row["since_last_tick"].total_seconds() < 60


def check_in_flight(rows):
    (row,) = rows
    assert (row["account"], row["oa_id"], row["refids"]) == ("default", OA_Y, 1)
    assert 0 < row["lease_left"].total_seconds() <= 60


def check_last_hour(rows):
    table = by(rows, "source", "old_state", "new_state")
    assert table["poll", "pending", "sent"]["changes"] == 4
    assert table["push", "pending", "failed"]["changes"] == 1
    assert table["expiry", "pending", "expired"]["changes"] == 1


CHECKS = {
    "message_counts": check_counts,
    "pending_backlog": check_backlog_view,
    "resolved_hourly": check_hourly,
    "failures_by_error": check_failures_view,
    "What failed today, and why": check_failed_today,
    "Which messages failed today": check_failed_today_rows,
    "How much did OA X spend this week": check_oa_spend,
    "Spend per day and template, last 7 days": check_spend_per_day,
    "Which messages are stuck": check_stuck,
    "What did RefId X go through": check_history,
    "The backlog per account and OA": check_backlog,
    "Resolve rate, last 10 minutes": check_rate,
    "Changes per minute, last 10 minutes": check_changes_per_minute,
    "Is beat alive": check_heartbeat,
    "Requests in flight": check_in_flight,
    "What changed in the last hour": check_last_hour,
}


# --- the tests --------------------------------------------------------------------------------


def test_every_block_has_a_check_and_one_statement():
    headings = [heading for heading, _ in BLOCKS]
    assert sorted(headings) == sorted(CHECKS), "each sql block of docs/sql.md needs a check here"
    for heading, sql in BLOCKS:
        assert sql.rstrip().endswith(";") and sql.count(";") == 1, heading


@pytest.mark.parametrize(("heading", "sql"), BLOCKS, ids=[heading for heading, _ in BLOCKS])
def test_cookbook_query(engine, heading, sql):
    fill(engine)
    with engine.begin() as conn:
        rows = [dict(row) for row in conn.exec_driver_sql(with_variables(sql)).mappings()]
    assert rows, f"{heading!r} returned no rows"
    CHECKS[heading](rows)


def test_view_columns_are_the_documented_ones(engine):
    documented = column_tables(DOC.read_text())
    with engine.begin() as conn:
        for view in VIEWS:
            actual = conn.execute(
                text(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name = :view ORDER BY ordinal_position"
                ),
                {"view": view},
            ).all()
            assert [tuple(row) for row in actual] == documented[view], view


def test_views_migration_goes_down_and_up():
    name = f"esms_test_views_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _server_url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    views = "SELECT table_name FROM information_schema.views WHERE table_schema = 'public'"
    try:
        config = alembic_config(url)
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert sorted(conn.execute(text(views)).scalars()) == sorted(VIEWS)
        command.downgrade(config, "0002")
        with engine.connect() as conn:
            assert conn.execute(text(views)).scalars().all() == []
        command.upgrade(config, "head")
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
