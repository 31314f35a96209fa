"""The operator's command line, `esms-poller`: track, status, show, repoll, recount, check-accounts,
events (the final-status feed), and the emulator and demo under one name.

Every command reads `Settings()` (environment and `.env`) like the daemon does, and every SQL
statement it runs is in `worker.store`. What an operator can fix — unreadable settings, a
DATABASE_URL that is not a URL, a database that does not answer or is not migrated — ends in one
line on stderr and exit status 1: never a traceback, never a password. Output that names a
message or an account is printed as plain text, never as Rich markup, since RefIds are the
sender's strings. Redis and the provider's client are imported by `check-accounts` alone: the
commands operators run often (`status`) do not pay for loading them.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import click
import orjson
import psycopg
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from typer.core import TyperGroup

from worker import events as feed
from worker import store
from worker.settings import DEFAULT_ACCOUNT, MAX_LIMITER_WAIT_SECONDS, Account, Settings

if TYPE_CHECKING:
    from worker.esms_client import EsmsClient
    from worker.ratelimit import RateLimiter

RECENT_SECONDS = 300  # "resolved in the last 5 minutes" in `status`
CHECK_REF_ID = "esms-poller-check-accounts"  # a RefId no sender uses: the answer carries no data
CHECK_OA_ID = "0"  # asked about when the account has no pending message to borrow an OAId from
STATES = ("sent", "failed", "rejected", "expired")
# Wider than any status table, for output that goes to a file or a pipe rather than a terminal.
_PIPE_WIDTH = 200


class OperatorError(Exception):
    """A failure the operator can fix; its message is the whole report, one line."""


# --- the session: settings and engine, created on first use -----------------------------------


@dataclass
class _Session:
    settings: Settings | None = None
    engine: Engine | None = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def _session(ctx: typer.Context) -> _Session:
    return ctx.find_root().obj


def _settings(ctx: typer.Context) -> Settings:
    session = _session(ctx)
    if session.settings is None:
        session.settings = Settings()
    return session.settings


def _engine(ctx: typer.Context) -> Engine:
    session = _session(ctx)
    if session.engine is None:
        settings = _settings(ctx)
        try:
            session.engine = store.make_engine(settings, pool_size=1)
        except (sa_exc.ArgumentError, ValueError, ImportError):
            # The parser's own message quotes the URL, password and all.
            raise OperatorError(
                "DATABASE_URL is not a usable database URL "
                "(expected postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE)"
            ) from None
    return session.engine


def describe(exc: BaseException, database_url: str | None) -> str | None:
    """The one line an operator sees for `exc`, with any password taken out; None for a bug."""
    if isinstance(exc, OperatorError):
        line = str(exc)
    elif isinstance(exc, ValidationError):
        problems = "; ".join(_setting_problem(error) for error in exc.errors())
        line = f"invalid settings: {problems}"
    elif isinstance(exc, SettingsError):
        line = f"invalid settings: {exc}"
    elif isinstance(exc, sa_exc.DBAPIError):
        where = _shown_url(database_url)
        reason = _first_line(exc.orig) if exc.orig is not None else type(exc).__name__
        if isinstance(exc, sa_exc.ProgrammingError) and "does not exist" in reason:
            line = f"the database {where} is not migrated ({reason}): run `alembic upgrade head`"
        elif isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            line = f"cannot reach the database {where}: {reason}"
        else:
            line = f"database error at {where}: {reason}"
    else:
        return None
    return _without_password(line, database_url)


def _setting_problem(error: Any) -> str:
    """One validation error, located as the operator wrote it: ESMS_ACCOUNTS.shopb.api_key."""
    message = error["msg"].removeprefix("Value error, ")
    loc = error["loc"]
    if not loc:
        return message
    head = str(loc[0]).upper() if loc[0] in Settings.model_fields else str(loc[0])
    return ".".join([head, *map(str, loc[1:])]) + f": {message}"


def _first_line(value: object) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    return lines[0] if lines else type(value).__name__


def _shown_url(url: str | None) -> str:
    if url is None:
        return "(DATABASE_URL)"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sa_exc.ArgumentError, ValueError):
        return "(DATABASE_URL)"


def _without_password(line: str, url: str | None) -> str:
    if url is None:
        return line
    try:
        password = make_url(url).password
    except (sa_exc.ArgumentError, ValueError):
        return line
    return line.replace(str(password), "***") if password else line


class _Group(TyperGroup):
    """Turns the failures an operator can fix into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OperatorError, ValidationError, SettingsError, sa_exc.DBAPIError) as exc:
            session = ctx.obj if isinstance(ctx.obj, _Session) else None
            settings = session.settings if session else None
            url = settings.sqlalchemy_url if settings else None
            typer.echo(f"esms-poller: {describe(exc, url)}", err=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="esms-poller",
    help="Operate the eSMS callback poller: register RefIds, watch the backlog, steer polling.",
    no_args_is_help=True,
    add_completion=False,
    # Locals of a crashed frame could hold settings or rows: a bug shows its traceback only.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(ctx: typer.Context) -> None:
    # Tests hand in a ready Settings as `obj`; otherwise it is read on first use.
    preset = ctx.obj if isinstance(ctx.obj, Settings) else None
    session = _Session(settings=preset)
    ctx.obj = session
    ctx.call_on_close(session.close)


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, _PIPE_WIDTH))
    return console


def format_age(age: timedelta | None) -> str:
    """A duration in the two largest units that matter: 42s, 5m 12s, 3h 07m, 2d 04h."""
    if age is None:
        return "-"
    seconds = max(0, int(age.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


# --- track ------------------------------------------------------------------------------------


_CSV_COLUMNS = ("ref_id", "oa_id", "account")


@dataclass(frozen=True)
class TrackRow:
    ref_id: str
    oa_id: str
    account: str | None  # None: the --account given, else the default account


def parse_pair(spec: str) -> TrackRow:
    """`REF_ID:OA_ID` from the command line; the OAId is what follows the last colon."""
    ref_id, colon, oa_id = spec.rpartition(":")
    ref_id, oa_id = ref_id.strip(), oa_id.strip()
    if not colon or not ref_id or not oa_id:
        raise OperatorError(f"expected REF_ID:OA_ID, got {spec!r}")
    return TrackRow(ref_id, oa_id, None)


def parse_csv(lines: Iterable[str], source: str) -> Iterator[TrackRow]:
    """Rows of a CSV with columns ref_id, oa_id and an optional account.

    A first row naming the columns is a header, and then the columns may come in any order.
    Blank lines are skipped; a row without RefId or OAId stops the whole input, with its line.
    """
    columns = {name: index for index, name in enumerate(_CSV_COLUMNS)}
    reader = csv.reader(lines)
    first = True
    for row in reader:
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if first:
            first = False
            names = [cell.lower() for cell in cells]
            if "ref_id" in names:
                if "oa_id" not in names:
                    raise OperatorError(f"{source}: the header names ref_id but not oa_id")
                columns = {name: names.index(name) for name in _CSV_COLUMNS if name in names}
                continue
        ref_id, oa_id, account = (_pick(cells, columns, name) for name in _CSV_COLUMNS)
        if not ref_id or not oa_id:
            raise OperatorError(
                f"{source} line {reader.line_num}: expected ref_id,oa_id[,account], got {row!r}"
            )
        yield TrackRow(ref_id, oa_id, account or None)


def _pick(cells: list[str], columns: dict[str, int], name: str) -> str:
    index = columns.get(name)
    return cells[index] if index is not None and index < len(cells) else ""


def _read_file(path: str) -> list[TrackRow]:
    source = "stdin" if path == "-" else path
    try:
        # utf-8-sig: spreadsheets put a byte-order mark in front of the header.
        if path == "-":
            with click.open_file("-", encoding="utf-8-sig") as stdin:
                return list(parse_csv(stdin, source))
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return list(parse_csv(handle, source))
    except OSError as exc:
        raise OperatorError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise OperatorError(f"cannot read {source}: not UTF-8 text") from None


@app.command()
def track(
    ctx: typer.Context,
    pairs: Annotated[
        list[str] | None,
        typer.Argument(metavar="REF_ID:OA_ID", help="RefIds to poll, each with its OAId."),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            metavar="CSV",
            help="A CSV of ref_id,oa_id[,account] (header optional); '-' reads stdin.",
        ),
    ] = None,
    account: Annotated[
        str,
        typer.Option(help="Account of the rows that do not name one."),
    ] = DEFAULT_ACCOUNT,
) -> None:
    """Register RefIds for polling. A RefId already present is left exactly as it is."""
    rows = [parse_pair(pair) for pair in pairs or ()]
    if file is not None:
        rows += _read_file(file)
    if not rows:
        raise typer.BadParameter("give REF_ID:OA_ID arguments or --file", param_hint="track")
    # The first mention of a RefId wins, so the counts below add up to distinct RefIds.
    wanted: dict[str, store.NewMessage] = {}
    for row in rows:
        wanted.setdefault(
            row.ref_id, store.NewMessage(row.ref_id, row.oa_id, row.account or account)
        )
    with _engine(ctx).begin() as conn:
        new = store.track(conn, list(wanted.values()))
    present = len(wanted) - new
    typer.echo(f"{len(wanted)} RefIds: {new} new, {present} already present")
    configured = _settings(ctx).accounts
    unknown = sorted({m.account for m in wanted.values()} - set(configured))
    if configured and unknown:
        typer.echo(
            f"note: account(s) {', '.join(map(repr, unknown))} not configured here "
            "(ESMS_API_KEY / ESMS_ACCOUNTS): their messages wait until an account of that name is",
            err=True,
        )


# --- status -----------------------------------------------------------------------------------


def _status_table(rows: list[store.OaStatus]) -> Table:
    table = Table(title="messages by account and OA", title_justify="left")
    table.add_column("account", no_wrap=True)
    table.add_column("OA", no_wrap=True)
    for name in ("pending", "overdue", "in flight", "oldest pending", *STATES):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("resolved 5 min", justify="right", no_wrap=True)
    table.add_column("per min", justify="right", no_wrap=True)

    def add(label: str, oa: str, group: list[store.OaStatus], *, style: str | None = None) -> None:
        ages = [row.oldest_pending_age for row in group if row.oldest_pending_age is not None]
        recent = sum(row.resolved_recently for row in group)
        table.add_row(
            Text(label),
            Text(oa),
            *(
                str(sum(getattr(row, name) for row in group))
                for name in ("pending", "overdue", "in_flight")
            ),
            format_age(max(ages) if ages else None),
            *(str(sum(getattr(row, state) for row in group)) for state in STATES),
            str(recent),
            f"{recent / (RECENT_SECONDS / 60):.1f}",
            style=style,
        )

    for row in rows:
        add(row.account, row.oa_id, [row])
    if len(rows) > 1:
        table.add_section()
        add("all", "", rows, style="bold")
    return table


def _health_line(heartbeat: store.Heartbeat | None, requests: int, settings: Settings) -> Text:
    if heartbeat is None:
        beat = Text("beat: no tick recorded yet (is `celery -A worker beat` running?)", "yellow")
    else:
        stale = heartbeat.age.total_seconds() > max(10 * settings.schedule_tick_seconds, 30)
        beat = Text(
            f"beat: last tick {format_age(heartbeat.age)} ago ({heartbeat.ticks} ticks)"
            + (" — STALE" if stale else ""),
            "bold red" if stale else "green",
        )
    return Text.assemble(beat, f"   requests in flight: {requests}")


def _snapshot(engine: Engine) -> tuple[list[store.OaStatus], store.Heartbeat | None, int]:
    with engine.begin() as conn:
        rows = store.status(conn, RECENT_SECONDS)
        heartbeat = store.heartbeat_age(conn)
        requests = sum(store.inflight_batches(conn).values())
    return rows, heartbeat, requests


@app.command()
def status(
    ctx: typer.Context,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until nothing is pending or Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")
    ] = 2.0,
) -> None:
    """Backlog and state counts per account/OA, resolve rate, and the beat's heartbeat."""
    settings = _settings(ctx)
    engine = _engine(ctx)
    console = _console()
    if not watch:
        rows, heartbeat, requests = _snapshot(engine)
        console.print(_status_table(rows) if rows else Text("no messages"))
        console.print(_health_line(heartbeat, requests, settings))
        return
    progress = Progress(
        TextColumn("{task.fields[pending]} pending"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}% resolved"),
        TimeRemainingColumn(),
        console=console,
    )
    task = None
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                rows, heartbeat, requests = _snapshot(engine)
                pending = sum(row.pending for row in rows)
                if task is None:
                    task = progress.add_task("backlog", total=max(pending, 1), pending=pending)
                # The bar's whole is the largest backlog seen, so new arrivals grow it.
                total = max(progress.tasks[0].total or 0, pending)
                progress.update(task, total=total, completed=total - pending, pending=pending)
                live.update(
                    Group(
                        _status_table(rows) if rows else Text("no messages"),
                        _health_line(heartbeat, requests, settings),
                        progress,
                    ),
                    refresh=True,
                )
                if pending == 0:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    if not console.is_terminal:
        # Off a terminal Live draws only its last frame, and leaves the line open.
        console.line()


# --- show -------------------------------------------------------------------------------------


def _cell(value: Any) -> Text:
    if value is None:
        return Text("-", "dim")
    if isinstance(value, Decimal):
        return Text(format(value, "f"))
    return Text(str(value))


@app.command()
def show(
    ctx: typer.Context,
    ref_id: Annotated[str, typer.Argument(help="The SMSID/RefId.")],
) -> None:
    """One message: every column, then every change it went through."""
    with _engine(ctx).begin() as conn:
        row = store.message(conn, ref_id)
        changes = store.history(conn, ref_id)
    if row is None:
        raise OperatorError(f"no message with RefId {ref_id!r}")
    console = _console()
    columns = Table(title=Text(f"message {ref_id}"), title_justify="left", show_header=False)
    columns.add_column("column", style="bold", no_wrap=True)
    columns.add_column("value")
    for name, value in row.items():
        columns.add_row(name, _cell(value))
    console.print(columns)
    changes_table = Table(title="history", title_justify="left")
    for name in ("at", "source", "batch", "state", "SendStatus", "error_code"):
        changes_table.add_column(name, no_wrap=name != "batch")
    for change in changes:
        changes_table.add_row(
            _cell(change["at"]),
            _cell(change["source"]),
            _cell(change["batch_id"]),
            Text(f"{change['old_state'] or '-'} → {change['new_state']}"),
            Text(f"{_or_dash(change['old_send_status'])} → {_or_dash(change['new_send_status'])}"),
            _cell(change["error_code"]),
        )
    console.print(changes_table if changes else Text("history: no changes recorded yet"))


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


# --- repoll -----------------------------------------------------------------------------------


@app.command()
def repoll(
    ctx: typer.Context,
    ref_ids: Annotated[
        list[str] | None, typer.Argument(metavar="REF_ID", help="Only these RefIds.")
    ] = None,
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    oa: Annotated[str | None, typer.Option(help="Only this OAId.")] = None,
    older_than: Annotated[
        float | None,
        typer.Option(min=0, metavar="SECONDS", help="Only messages created this long ago or more."),
    ] = None,
    expired: Annotated[
        bool,
        typer.Option(
            "--expired", help="Also put selected expired messages back to pending (with history)."
        ),
    ] = False,
    everything: Annotated[
        bool, typer.Option("--all", help="Select every message (no filter given on purpose).")
    ] = False,
) -> None:
    """Make selected pending (and with --expired, expired) messages due for polling now.

    Messages a request holds right now are left to it. A revived expired message gets a new
    MESSAGE_MAX_AGE_SECONDS from now before the scheduler gives up on it again.
    """
    if not (ref_ids or account or oa or older_than is not None or everything):
        raise typer.BadParameter(
            "give REF_IDs, --account, --oa or --older-than; or --all to select every message",
            param_hint="repoll",
        )
    settings = _settings(ctx)
    with _engine(ctx).begin() as conn:
        result = store.repoll(
            conn,
            include_expired=expired,
            account=account,
            oa_id=oa,
            older_than_seconds=older_than,
            ref_ids=ref_ids,
        )
    typer.echo(f"{result.made_due} pending messages are due now")
    if expired:
        typer.echo(
            f"{result.revived} expired messages are pending again and due now; they expire again "
            f"if still not final after MESSAGE_MAX_AGE_SECONDS "
            f"({settings.message_max_age_seconds:g} s) from now"
        )
    if result.in_flight:
        typer.echo(f"{result.in_flight} selected messages are being polled right now: left alone")


# --- recount ----------------------------------------------------------------------------------


@app.command()
def recount(ctx: typer.Context) -> None:
    """Count the final messages afresh for the views and `status` (docs/scale.md).

    Needed once after upgrading to migration 0008 while older workers kept running, or after
    final rows were changed by hand. One pass over `messages`; the poller keeps running.
    """
    started = time.monotonic()
    store.recount(_engine(ctx))
    typer.echo(f"recounted the final messages in {time.monotonic() - started:.1f} s")


# --- check-accounts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AccountCheck:
    account: str
    result: str  # ok, rejected, unverified
    code: int | None
    detail: str


def check_account(
    client: EsmsClient, account: Account, oa_id: str, limiter: RateLimiter | None
) -> AccountCheck:
    """One GetCallback request with a RefId nobody sent, judged only on what it says of the keys.

    The provider checks keys before the OAId, so an OA refusal still means the keys are good.
    """
    from worker.errors import AccountRejected, OARejected, ProviderError
    from worker.esms_client import CODE_SUCCESS

    if limiter is not None:
        if limiter.acquire(account.limiter_key, MAX_LIMITER_WAIT_SECONDS) is None:
            return AccountCheck(account.name, "unverified", None, "the rate budget is busy")
    try:
        client.get_callback(account, oa_id, [CHECK_REF_ID])
    except AccountRejected as exc:
        return AccountCheck(account.name, "rejected", exc.code, exc.reason)
    except OARejected as exc:
        return AccountCheck(
            account.name, "ok", exc.code, f"keys accepted; OAId {oa_id} refused: {exc.reason}"
        )
    except ProviderError as exc:
        return AccountCheck(account.name, "unverified", exc.code, exc.reason)
    return AccountCheck(account.name, "ok", CODE_SUCCESS, "keys accepted")


def _limiter(settings: Settings, notes: list[str]) -> RateLimiter | None:
    import redis

    from worker.ratelimit import RateLimiter, RatePolicy

    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=2, socket_timeout=2
    )
    try:
        client.ping()
    except redis.RedisError:
        # Without Redis no worker can poll either, so one request cannot crowd anybody out.
        notes.append("Redis does not answer: the checks do not wait for the shared rate limit")
        return None
    return RateLimiter(client, RatePolicy.from_settings(settings))


_NO_DATABASE = "the database does not answer: the checks ask about OAId " + CHECK_OA_ID


def _oa_for(ctx: typer.Context, account: str, notes: list[str]) -> str:
    """An OAId the account really sends from, so the check is the request polling makes. The
    keys can be checked without the database, so a database that does not answer is a note."""
    if _NO_DATABASE in notes:
        return CHECK_OA_ID
    try:
        with _engine(ctx).begin() as conn:
            found = store.an_oa_of(conn, account)
    except (OperatorError, sa_exc.DBAPIError):
        notes.append(_NO_DATABASE)
        return CHECK_OA_ID
    return found or CHECK_OA_ID


@app.command("check-accounts")
def check_accounts(
    ctx: typer.Context,
    oa: Annotated[
        str | None,
        typer.Option(help="OAId to ask about (default: one the account has pending messages for)."),
    ] = None,
) -> None:
    """Ask the provider once per configured account whether it accepts the keys (never shown)."""
    settings = _settings(ctx)
    accounts = settings.accounts
    if not accounts:
        raise OperatorError(
            "no account configured: set ESMS_API_KEY/ESMS_SECRET_KEY or ESMS_ACCOUNTS"
        )
    from worker.esms_client import EsmsClient

    notes: list[str] = []
    limiter = _limiter(settings, notes)
    client = EsmsClient(settings.esms_base_url, settings.esms_timeout_seconds, max_connections=1)
    try:
        checks = [
            check_account(client, account, oa or _oa_for(ctx, name, notes), limiter)
            for name, account in sorted(accounts.items())
        ]
    finally:
        client.close()
    table = Table(title=Text(f"accounts at {settings.esms_base_url}"), title_justify="left")
    for name in ("account", "result", "code", "detail"):
        table.add_column(name, no_wrap=name != "detail")
    styles = {"ok": "green", "rejected": "bold red", "unverified": "yellow"}
    for check in checks:
        table.add_row(
            Text(check.account),
            Text(check.result.upper(), styles[check.result]),
            _cell(check.code),
            Text(check.detail),
        )
    console = _console()
    console.print(table)
    for note in notes:
        console.print(Text(f"note: {note}", "dim"))
    if any(check.result != "ok" for check in checks):
        raise typer.Exit(1)


# --- events -----------------------------------------------------------------------------------


@app.command()
def events(
    ctx: typer.Context,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until killed.")
    ] = False,
    since: Annotated[
        str,
        typer.Option(
            help="Start after this cursor (the `cursor` of the last event you kept); "
            "'end' for only events still to come."
        ),
    ] = feed.START,
) -> None:
    """Print the final-status feed (worker.events), one JSON line per message made final."""
    engine = _engine(ctx)
    try:
        after = feed.end(engine) if since == "end" else feed.Cursor.parse(since)
    except feed.BadCursor as bad:
        raise OperatorError(str(bad)) from None
    out = sys.stdout
    try:
        stream = feed.follow(engine, after) if follow else feed.until_now(engine, after)
        for event in stream:
            # One write and a flush per line: a consumer killed at any moment leaves whole
            # lines, the last of which holds the cursor to resume from.
            out.write(orjson.dumps(event.as_json()).decode() + "\n")
            out.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    except psycopg.OperationalError as lost:
        # The LISTEN connection is psycopg's own, outside SQLAlchemy's error handling.
        raise OperatorError(f"lost the database connection: {_first_line(lost)}") from None


# --- the emulator and the demo ----------------------------------------------------------------

# Everything after the command name, --help included, goes to the program's own parser.
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def emulator(ctx: typer.Context) -> None:
    """Serve the eSMS emulator on loopback (the esms-emulator options; see --help)."""
    from worker.emulator.__main__ import main as emulator_main

    raise typer.Exit(emulator_main(ctx.args))


@app.command(context_settings=_PASS_THROUGH, add_help_option=False)
def demo(ctx: typer.Context) -> None:
    """Run the whole daemon against the emulator on this machine (make demo; see --help)."""
    from worker.demo import main as demo_main

    raise typer.Exit(demo_main(ctx.args))


# Commands that only read and print end without the interpreter's teardown of every module it
# loaded: about 0.1 s of the 0.5 s `status` may take at ten million rows (docs/scale.md). By then
# the command has closed its engine (the session's close runs when the command ends) and the
# streams are flushed here, so nothing is left for that teardown to do.
_QUICK_EXIT = frozenset({"status", "show"})


def main() -> None:
    quick = len(sys.argv) > 1 and sys.argv[1] in _QUICK_EXIT
    try:
        app()
    except SystemExit as done:
        if not quick:
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    else:
        if not quick:
            return
        code = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that stopped early; a closed stream
            pass
    os._exit(code)
