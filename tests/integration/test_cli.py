"""`esms-poller` against the real test database: each command run as an operator runs it.

Most runs go through Typer's CliRunner with a ready Settings as the context object; a few run the
installed console script as a subprocess, configured only by its environment, as in production.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from decimal import Decimal

import httpx
import pytest
import typer
from sqlalchemy import text
from typer.testing import CliRunner

from tests.conftest import _server_url
from tests.processes import BIN, child_env, free_port, start_emulator, wait_for
from worker import store
from worker.cli import CHECK_REF_ID, app
from worker.records import CallbackRecord

pytestmark = pytest.mark.integration

runner = CliRunner()
GOOD_KEY, GOOD_SECRET = "good-key-7Yq", "good-secret-Jx41"
BAD_SECRET = "bad-secret-Pw93"


@pytest.fixture
def cli(engine, make_settings):
    """Run one command with this test's settings; returns the click Result."""

    def run(*args, input=None, **overrides):
        return runner.invoke(app, list(args), obj=make_settings(**overrides), input=input)

    return run


def rows(engine, sql, **params):
    with engine.begin() as conn:
        return [dict(row) for row in conn.execute(text(sql), params).mappings()]


def one(engine, sql, **params):
    (row,) = rows(engine, sql, **params)
    return row


def insert(engine, *specs, **columns):
    """Messages as a sender inserts them: (ref_id, oa_id[, account])."""
    with engine.begin() as conn:
        store.track(
            conn,
            [store.NewMessage(s[0], s[1], s[2] if len(s) > 2 else "default") for s in specs],
        )
        for name, value in columns.items():
            conn.execute(
                text(f"UPDATE messages SET {name} = {value} WHERE ref_id = ANY(:refs)"),
                {"refs": [s[0] for s in specs]},
            )


# --- track ------------------------------------------------------------------------------------


def test_track_from_arguments_is_idempotent(cli, engine):
    result = cli("track", "r1:oa1", "r2:oa1", "r1:oa1", "--account", "shopb")
    assert result.exit_code == 0, result.output
    assert "2 RefIds: 2 new, 0 already present" in result.output
    assert rows(engine, "SELECT ref_id, oa_id, account, state FROM messages ORDER BY 1") == [
        {"ref_id": "r1", "oa_id": "oa1", "account": "shopb", "state": "pending"},
        {"ref_id": "r2", "oa_id": "oa1", "account": "shopb", "state": "pending"},
    ]
    # A RefId already present is left as it is, even when it is final by now.
    with engine.begin() as conn:
        store.merge_callbacks(conn, [CallbackRecord("r1", send_status=5, send_success=1)])
    again = cli("track", "r1:other-oa", "r3:oa1")
    assert "2 RefIds: 1 new, 1 already present" in again.output
    r1 = one(engine, "SELECT oa_id, account, state FROM messages WHERE ref_id = 'r1'")
    assert r1 == {"oa_id": "oa1", "account": "shopb", "state": "sent"}
    assert one(engine, "SELECT account FROM messages WHERE ref_id = 'r3'")["account"] == "default"


def test_track_from_csv_file_and_stdin(cli, engine, tmp_path):
    csv_file = tmp_path / "sent.csv"
    # A spreadsheet export: byte-order mark, header, Windows line ends, a blank line.
    csv_file.write_bytes(b"\xef\xbb\xbfref_id,oa_id,account\r\nc1,oa1,shopb\r\n\r\nc2,oa2,\r\n")
    result = cli("track", "--file", str(csv_file))
    assert result.exit_code == 0, result.output
    assert "2 RefIds: 2 new, 0 already present" in result.output
    stdin = cli("track", "-f", "-", input="c2,oa2\nc3,oa3,shopb\n")
    assert stdin.exit_code == 0, stdin.output
    assert "2 RefIds: 1 new, 1 already present" in stdin.output
    assert rows(engine, "SELECT ref_id, oa_id, account FROM messages ORDER BY 1") == [
        {"ref_id": "c1", "oa_id": "oa1", "account": "shopb"},
        {"ref_id": "c2", "oa_id": "oa2", "account": "default"},
        {"ref_id": "c3", "oa_id": "oa3", "account": "shopb"},
    ]


def test_track_rejects_a_bad_line_and_writes_nothing(cli, engine):
    result = cli("track", "-f", "-", input="ok1,oa1\nbroken\n")
    assert result.exit_code == 1
    assert "esms-poller: stdin line 2: expected ref_id,oa_id[,account]" in result.output
    assert rows(engine, "SELECT ref_id FROM messages") == []
    assert cli("track").exit_code == 2


# --- status -----------------------------------------------------------------------------------


def status_cells(output: str, account: str, oa_id: str) -> list[str]:
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line) if cell.strip()]
        if cells[:2] == [account, oa_id]:
            return cells[2:]
    raise AssertionError(f"no row for {account}/{oa_id} in:\n{output}")


def total_cells(output: str) -> list[str]:
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line) if cell.strip()]
        if cells[:1] == ["all"]:
            return cells[1:]
    raise AssertionError(f"no total row in:\n{output}")


def test_status_shows_backlog_counts_rate_and_heartbeat(cli, engine):
    insert(engine, ("p1", "oa1"), ("p2", "oa1"), next_poll_at="now() - interval '1 minute'")
    insert(engine, ("p3", "oa1"), created_at="now() - interval '2 hours'")
    insert(engine, ("s1", "oa1"), ("s2", "oa1"), ("f1", "oa1"), ("j1", "oa1"))
    insert(engine, ("b1", "oa9", "shopb"), ("b2", "oa9", "shopb"))
    insert(engine, ("e1", "oa1"), created_at="now() - interval '4 days'")
    with engine.begin() as conn:
        store.merge_callbacks(
            conn,
            [
                CallbackRecord("s1", send_status=5, send_success=1, total_price=Decimal("300")),
                CallbackRecord("s2", send_status=5, send_success=1),
                CallbackRecord("f1", send_status=5, send_success=0),
                CallbackRecord("j1", send_status=4),
                CallbackRecord("b1", send_status=5, send_success=1),
            ],
        )
        store.expire_old(conn, 259200, [])  # no account configured: the age alone
        store.lease_batches(
            conn, "default", [store.Batch(uuid.uuid4(), "default", "oa1", ("p3",))], 60
        )
        store.heartbeat(conn)
    result = cli("status")
    assert result.exit_code == 0, result.output
    # pending, overdue, in flight, oldest, sent, failed, rejected, expired, resolved 5 min, /min
    assert status_cells(result.output, "default", "oa1") == [
        "3", "2", "1", "2h 00m", "2", "1", "1", "1", "5", "1.0"
    ]  # fmt: skip
    assert status_cells(result.output, "shopb", "oa9") == [
        "1", "0", "0", "0s", "1", "0", "0", "0", "1", "0.2"
    ]  # fmt: skip
    assert total_cells(result.output) == ["4", "2", "1", "2h 00m", "3", "1", "1", "1", "6", "1.2"]
    assert re.search(r"beat: last tick \d+s ago \(1 ticks\)", result.output)
    assert "requests in flight: 1" in result.output


def test_recount_brings_status_back_to_the_table_after_a_change_by_hand(cli, engine):
    insert(engine, ("r1", "oa1"), ("r2", "oa1"))
    with engine.begin() as conn:
        store.merge_callbacks(
            conn,
            [
                CallbackRecord("r1", send_status=5, send_success=1),
                CallbackRecord("r2", send_status=5, send_success=1),
            ],
        )
        conn.execute(text("UPDATE messages SET state = 'failed' WHERE ref_id = 'r2'"))

    def counts():
        with engine.begin() as conn:
            (row,) = store.status(conn, 300)
        return row.sent, row.failed

    assert counts() == (2, 0)  # the hand change is not in the counts
    result = cli("recount")
    assert result.exit_code == 0, result.output
    assert "recounted" in result.output
    assert counts() == (1, 1)


def test_status_without_beat_says_so(cli, engine):
    result = cli("status")
    assert result.exit_code == 0
    assert "no messages" in result.output and "no tick recorded yet" in result.output


def test_status_watch_ends_when_nothing_is_pending(cli, engine):
    insert(engine, ("w1", "oa1"), ("w2", "oa1"))

    def resolve_later():
        time.sleep(0.6)
        with engine.begin() as conn:
            store.merge_callbacks(conn, [CallbackRecord("w1", send_status=5, send_success=1)])
        time.sleep(0.4)
        with engine.begin() as conn:
            store.merge_callbacks(conn, [CallbackRecord("w2", send_status=4)])

    resolver = threading.Thread(target=resolve_later)
    resolver.start()
    started = time.monotonic()
    result = cli("status", "--watch", "--interval", "0.2")
    resolver.join()
    assert result.exit_code == 0, result.output
    assert 0.9 < time.monotonic() - started < 10
    assert "0 pending" in result.output and "100% resolved" in result.output


# --- show -------------------------------------------------------------------------------------


def test_show_prints_the_message_and_its_history(cli, engine):
    ref = "4a496110-9fd3-4838-ac8b-bcaa36616f7011"
    insert(engine, (ref, "1090257973118325189"))
    batch = uuid.uuid4()
    with engine.begin() as conn:
        store.merge_callbacks(conn, [CallbackRecord(ref, send_status=2)], batch_id=batch)
    with engine.begin() as conn:
        store.merge_callbacks(
            conn,
            [
                CallbackRecord(
                    ref, send_status=5, send_success=0, total_price=Decimal("0.50"),
                    error_info='{"error":-118,"message":"[bold]not on Zalo[/bold]"}',
                )
            ],
            source="push",
        )  # fmt: skip
    result = cli("show", ref)
    assert result.exit_code == 0, result.output
    assert re.search(r"state\s+│ failed", result.output)
    assert re.search(r"total_price\s+│ 0\.50", result.output)
    # Provider text is printed as it is, never read as markup.
    assert "[bold]not on Zalo[/bold]" in result.output
    assert re.search(rf"poll\s+│ {batch}\s+│ pending → pending\s+│ - → 2", result.output)
    assert re.search(r"push\s+│ -\s+│ pending → failed\s+│ 2 → 5\s+│ -118", result.output)


def test_show_unknown_ref_id(cli, engine):
    result = cli("show", "nope")
    assert result.exit_code == 1
    assert result.output.strip() == "esms-poller: no message with RefId 'nope'"


# --- repoll -----------------------------------------------------------------------------------


def next_polls(engine):
    return {
        row["ref_id"]: row
        for row in rows(
            engine,
            "SELECT ref_id, state, next_poll_at <= now() AS due, resolved_at FROM messages",
        )
    }


def test_repoll_by_filters_makes_pending_due_now(cli, engine):
    later = "now() + interval '10 minutes'"
    insert(engine, ("a1", "oa1"), ("a2", "oa2"), next_poll_at=later)
    insert(engine, ("old", "oa1"), next_poll_at=later, created_at="now() - interval '1 hour'")
    insert(engine, ("b1", "oa1", "shopb"), next_poll_at=later)
    result = cli("repoll", "--account", "default", "--oa", "oa1")
    assert result.exit_code == 0, result.output
    assert "2 pending messages are due now" in result.output
    assert {ref for ref, row in next_polls(engine).items() if row["due"]} == {"a1", "old"}

    with engine.begin() as conn:
        conn.execute(text(f"UPDATE messages SET next_poll_at = {later}"))
    assert "1 pending messages are due now" in cli("repoll", "--older-than", "1800").output
    assert {ref for ref, row in next_polls(engine).items() if row["due"]} == {"old"}
    assert "2 pending messages are due now" in cli("repoll", "a2", "b1", "nope").output
    assert {ref for ref, row in next_polls(engine).items() if row["due"]} == {"old", "a2", "b1"}


def test_repoll_expired_back_to_pending_with_history(cli, engine):
    insert(engine, ("e1", "oa1"), ("e2", "oa2"), created_at="now() - interval '4 days'")
    insert(engine, ("held", "oa1"), ("done", "oa1"))
    with engine.begin() as conn:
        store.expire_old(conn, 259200, [])  # no account configured: the age alone
        store.merge_callbacks(conn, [CallbackRecord("done", send_status=5, send_success=1)])
        store.lease_batches(
            conn, "default", [store.Batch(uuid.uuid4(), "default", "oa1", ("held",))], 60
        )
    # Without --expired only pending rows are selected; a row in flight is left to its request.
    plain = cli("repoll", "--oa", "oa1")
    assert "0 pending messages are due now" in plain.output
    assert "1 selected messages are being polled right now" in plain.output
    assert next_polls(engine)["e1"]["state"] == "expired"

    result = cli("repoll", "--oa", "oa1", "--expired")
    assert result.exit_code == 0, result.output
    assert "1 expired messages are pending again and due now" in result.output
    assert "expire again if still not final after MESSAGE_MAX_AGE_SECONDS" in result.output
    after = next_polls(engine)
    assert (after["e1"]["state"], after["e1"]["due"], after["e1"]["resolved_at"]) == (
        "pending",
        True,
        None,
    )
    assert after["e2"]["state"] == "expired" and after["done"]["state"] == "sent"
    assert rows(
        engine,
        "SELECT source, old_state, new_state FROM message_history WHERE ref_id = 'e1' ORDER BY id",
    ) == [
        {"source": "expiry", "old_state": "pending", "new_state": "expired"},
        {"source": "repoll", "old_state": "expired", "new_state": "pending"},
    ]
    # Four days old is past the maximum age, but the age now counts from the repoll: the expiry
    # sweep leaves it to be polled, until a maximum age has passed since the repoll.
    with engine.begin() as conn:
        assert store.expire_old(conn, 259200, []) == 0  # no account configured: the age alone
    assert next_polls(engine)["e1"]["state"] == "pending"
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE messages SET repolled_at = now() - interval '4 days' WHERE ref_id = 'e1'")
        )
        assert store.expire_old(conn, 259200, []) == 1  # no account configured: the age alone
    assert next_polls(engine)["e1"]["state"] == "expired"


def test_repoll_needs_a_selection(cli, engine):
    insert(engine, ("a1", "oa1"), next_poll_at="now() + interval '1 hour'")
    refused = cli("repoll", "--expired")
    assert refused.exit_code == 2 and "--all" in refused.output
    assert not next_polls(engine)["a1"]["due"]
    assert "1 pending messages are due now" in cli("repoll", "--all").output


# --- check-accounts ---------------------------------------------------------------------------


def test_check_accounts_against_the_emulator(cli, engine, children):
    emulator = start_emulator(children, "--account", f"{GOOD_KEY}:{GOOD_SECRET}")
    insert(engine, ("c1", "1090257973118325189"))
    keys = {
        "esms_base_url": emulator.url,
        "esms_api_key": GOOD_KEY,
        "esms_secret_key": GOOD_SECRET,
    }
    good = cli("check-accounts", **keys)
    assert good.exit_code == 0, good.output
    assert re.search(r"default\s+│ OK\s+│ 100\s+│ keys accepted", good.output)

    mixed = cli(
        "check-accounts",
        **keys,
        esms_accounts={"shopb": {"api_key": GOOD_KEY, "secret_key": BAD_SECRET}},
    )
    assert mixed.exit_code == 1
    assert re.search(r"default\s+│ OK", mixed.output)
    assert re.search(r"shopb\s+│ REJECTED\s+│ 101\s+│ Code 101", mixed.output)
    for secret in (GOOD_KEY, GOOD_SECRET, BAD_SECRET):
        assert secret not in mixed.output
    # The default account was asked about the OA it really sends from, with a RefId nobody sent.
    asked = emulator.admin("GET", "/requests")["requests"]
    assert {(entry["oa_id"], tuple(entry["refids"])) for entry in asked} >= {
        ("1090257973118325189", (CHECK_REF_ID,))
    }


def test_check_accounts_without_accounts(cli, engine):
    result = cli("check-accounts", esms_api_key=None, esms_secret_key=None)
    assert result.exit_code == 1
    assert "no account configured" in result.output


# --- help, failures, the console script -------------------------------------------------------


def test_every_command_has_help():
    group = typer.main.get_command(app)
    assert set(group.commands) == {
        "track", "status", "show", "repoll", "recount", "check-accounts", "events", "emulator",
        "demo",
    }  # fmt: skip
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for name in group.commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "usage:" in result.output.lower(), name
    assert "esms-emulator" in runner.invoke(app, ["emulator", "--help"]).output
    assert "--seed-only" in runner.invoke(app, ["demo", "--help"]).output


def test_database_down_is_one_line(cli):
    url = f"postgresql+psycopg://postgres:pw-Kq82z@127.0.0.1:{free_port()}/esms"
    result = cli("status", database_url=url)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("esms-poller: cannot reach the database postgresql+psycopg://")
    assert "pw-Kq82z" not in result.stderr and "Traceback" not in result.stderr


def test_bad_url_and_unmigrated_database(cli):
    bad = cli("show", "x", database_url="postgresql+psycopg://u:pw-Kq82z@host:notaport/db")
    assert bad.exit_code == 1
    assert bad.stderr.strip().startswith("esms-poller: DATABASE_URL is not a usable database URL")
    assert "pw-Kq82z" not in bad.stderr
    empty = _server_url("postgres").replace("postgresql://", "postgresql+psycopg://", 1)
    unmigrated = cli("status", database_url=empty)
    assert unmigrated.exit_code == 1
    assert "not migrated" in unmigrated.stderr and "alembic upgrade head" in unmigrated.stderr


def console_script(tmp_path, database_url, *args, input=None):
    # The environment alone configures it, in a directory without a .env.
    return subprocess.run(
        [str(BIN / "esms-poller"), *args],
        cwd=tmp_path,
        env=child_env(DATABASE_URL=database_url),
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_console_script_tracks_and_reports(engine, database_url, tmp_path):
    tracked = console_script(tmp_path, database_url, "track", "-f", "-", input="s1,oa1\ns2,oa1\n")
    assert tracked.returncode == 0, tracked.stderr
    assert "2 RefIds: 2 new, 0 already present" in tracked.stdout
    status = console_script(tmp_path, database_url, "status")
    assert status.returncode == 0, status.stderr
    assert status_cells(status.stdout, "default", "oa1")[0] == "2"
    down = console_script(
        tmp_path, f"postgresql+psycopg://postgres:pw-Kq82z@127.0.0.1:{free_port()}/esms", "status"
    )
    assert down.returncode == 1 and down.stdout == ""
    assert len(down.stderr.splitlines()) == 1 and "cannot reach the database" in down.stderr
    assert "pw-Kq82z" not in down.stderr


def test_emulator_subcommand_serves(children):
    port = free_port()
    child = children.spawn(
        "cli-emulator",
        [str(BIN / "esms-poller"), "emulator", "--port", str(port)],
        env=child_env(),
    )
    wait_for(lambda: "listening on" in child.log(), timeout=20, interval=0.05, message="emulator")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200


def test_demo_subcommand_seeds(engine, database_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["demo", "--seed-only", "--messages", "5"], env={"DATABASE_URL": database_url}
    )
    assert result.exit_code == 0, result.output
    assert one(engine, "SELECT count(*) AS n FROM messages")["n"] == 5
