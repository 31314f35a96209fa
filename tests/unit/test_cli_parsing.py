"""The CLI's pure parts: RefId arguments, CSV input, durations and the one-line error reports."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc

from worker.cli import OperatorError, TrackRow, describe, format_age, parse_csv, parse_pair
from worker.settings import Settings

URL = "postgresql+psycopg://ops:hunter2-Secret@db.example:5432/esms"


def test_pair_splits_at_the_last_colon():
    assert parse_pair("abc:123") == TrackRow("abc", "123", None)
    assert parse_pair(" a:b:c : 9 ") == TrackRow("a:b:c", "9", None)


@pytest.mark.parametrize("spec", ["abc", ":123", "abc:", "abc: "])
def test_pair_needs_both_halves(spec):
    with pytest.raises(OperatorError, match="expected REF_ID:OA_ID"):
        parse_pair(spec)


def test_csv_without_header():
    rows = list(parse_csv(["r1,oa1\n", "\n", " r2 , oa2 , shopb\n", "r3,oa3,\n"], "f.csv"))
    assert rows == [
        TrackRow("r1", "oa1", None),
        TrackRow("r2", "oa2", "shopb"),
        TrackRow("r3", "oa3", None),
    ]


def test_csv_header_may_reorder_columns():
    lines = ["Account,OA_ID,Ref_ID\n", "shopb,oa1,r1\n", ",oa2,r2\n"]
    assert list(parse_csv(lines, "f.csv")) == [
        TrackRow("r1", "oa1", "shopb"),
        TrackRow("r2", "oa2", None),
    ]


def test_csv_header_without_account_column():
    assert list(parse_csv(["ref_id,oa_id\n", "r1,oa1\n"], "f.csv")) == [TrackRow("r1", "oa1", None)]


def test_csv_bad_row_names_its_line():
    with pytest.raises(OperatorError, match=r"f\.csv line 3: expected ref_id,oa_id"):
        list(parse_csv(["ref_id,oa_id\n", "r1,oa1\n", "r2\n"], "f.csv"))
    with pytest.raises(OperatorError, match="names ref_id but not oa_id"):
        list(parse_csv(["ref_id,account\n"], "f.csv"))


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (42.7, "42s"),
        (312, "5m 12s"),
        (3 * 3600 + 420, "3h 07m"),
        (2 * 86400 + 4 * 3600, "2d 04h"),
    ],
)
def test_format_age(seconds, shown):
    assert format_age(timedelta(seconds=seconds)) == shown


def test_format_age_of_nothing():
    assert format_age(None) == "-"


def test_database_down_is_one_line_without_the_password():
    orig = psycopg.OperationalError(
        'connection to server at "db.example" failed: password authentication failed for '
        'user "ops" hunter2-Secret\nsecond line'
    )
    line = describe(sa_exc.OperationalError("SELECT 1", {}, orig), URL)
    assert line.startswith("cannot reach the database postgresql+psycopg://ops:***@db.example")
    assert "hunter2-Secret" not in line and "\n" not in line


def test_missing_table_says_to_migrate():
    orig = psycopg.errors.UndefinedTable('relation "messages" does not exist')
    line = describe(sa_exc.ProgrammingError("SELECT", {}, orig), URL)
    assert "not migrated" in line and "alembic upgrade head" in line


def test_invalid_settings_are_one_line_without_values():
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, esms_api_key="only-the-key-XYZ")
    line = describe(caught.value, None)
    assert line.startswith("invalid settings:") and "set both ESMS_API_KEY" in line
    assert "only-the-key-XYZ" not in line and "\n" not in line


def test_a_bug_is_not_described():
    assert describe(KeyError("x"), URL) is None
