"""Settings: every knob of the daemon, read once from the environment (and an optional `.env`).

This is the only module that reads the environment. Everything else receives a `Settings` (or the
one `get_settings()` returns) and never calls `os.environ`. Secrets are `SecretStr`, so they stay
hidden in `repr`, logs and tracebacks; only the provider client unwraps them, at the moment it
builds a request body.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ACCOUNT = "default"
# A poll that finds no rate slot within this wait gives its batch back rather than hold a process.
MAX_LIMITER_WAIT_SECONDS = 10.0
# Time a batch's lease must still have, beyond the wait and the request, for the final write.
LEASE_WRITE_RESERVE_SECONDS = 5.0
# Room in a worker's pool beyond the batches the scheduler may keep in flight: its own ticks
# (which must never wait behind polls) and the halves of batches answered Code 105.
_SPARE_GREENLETS = 50


class AccountKeys(BaseModel):
    """One eSMS account's credentials as written in `ESMS_ACCOUNTS`."""

    model_config = ConfigDict(hide_input_in_errors=True)

    api_key: SecretStr
    secret_key: SecretStr


@dataclass(frozen=True)
class Account:
    """A configured account: its name (what rows and tasks carry) and its keys (what only the
    client sees). `limiter_key` names its rate budget without revealing the ApiKey."""

    name: str
    api_key: SecretStr
    secret_key: SecretStr

    @property
    def limiter_key(self) -> str:
        digest = hashlib.sha256(self.api_key.get_secret_value().encode()).hexdigest()
        return digest[:16]

    def __repr__(self) -> str:
        return f"Account(name={self.name!r})"


class Settings(BaseSettings):
    """The environment variables of the operator contract, with their defaults."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    database_url: SecretStr = SecretStr("postgresql+psycopg://postgres@127.0.0.1:5432/esms")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")

    esms_base_url: str = "https://status-sms.esms.vn"
    esms_api_key: SecretStr | None = None
    esms_secret_key: SecretStr | None = None
    esms_accounts: dict[str, AccountKeys] = Field(default_factory=dict)
    esms_rate_limit_per_second: float = Field(20, gt=0)
    # Fraction of the rate kept in reserve so that jitter between our clock and the provider's
    # arrival times cannot push a one-second window over the limit.
    esms_rate_safety_margin: float = Field(0.04, ge=0, lt=0.5)
    # After the provider answers Code 160 the rate drops and creeps back (worker.ratelimit);
    # it never drops below this.
    esms_rate_min_per_second: float = Field(2, gt=0)
    esms_batch_size: int = Field(200, ge=1)
    # One deadline for a whole GetCallback request: connecting, sending and the whole answer.
    esms_timeout_seconds: float = Field(10, gt=0)

    # Postgres deadlines for every program of the daemon (not for migrations, which have their
    # own): establishing a connection, one statement, waiting for a row or table lock. A worker
    # also bounds each task as a whole (Celery time limits, worker.tasks).
    database_connect_timeout_seconds: int = Field(5, ge=1)
    database_statement_timeout_seconds: float = Field(30, gt=0)
    database_lock_timeout_seconds: float = Field(5, gt=0)

    poll_interval_seconds: float = Field(30, gt=0)
    poll_max_interval_seconds: float = Field(600, gt=0)
    message_max_age_seconds: float = Field(259200, gt=0)
    # A batch of RefIds never polled yet that is short of ESMS_BATCH_SIZE may wait up to this long
    # past its oldest row's due time for more of its OA's messages to fall due, so the few
    # messages each tick brings (the ones pushes missed, or a slow trickle) share full requests.
    # Rows already polled never wait: the gap between two polls stays within the maximum.
    poll_batch_fill_seconds: float = Field(0, ge=0)
    # RefIds the provider answers Code 105 for (worker.notfound): one answered 105 alone is polled
    # alone from then on, 4 times longer after each 105 from POLL_INTERVAL_SECONDS up to this
    # (6 h: by the arithmetic of this backoff a RefId sent without CallbackUrl costs 18 requests
    # over the default 3-day maximum age, not the 430 of a pending message polled every
    # POLL_MAX_INTERVAL_SECONDS).
    not_found_max_interval_seconds: float = Field(21600, gt=0)
    # At most this share of each account's requests per tick searches batches answered Code 105
    # or polls lone RefIds answered 105, so RefIds the provider knows keep the rest of the rate.
    not_found_budget_share: float = Field(0.5, gt=0, le=1)

    # How often beat runs the scheduler, and how many seconds of the rate budget it keeps queued
    # ahead of the workers: enough to cover one tick plus the slowest response, never more.
    # Half a second: a tick claims half a second of every busy account's rate, so its burst of
    # work in Postgres and in the worker is small enough not to make polls miss their slots
    # (with 1 s ticks twice as many polls woke too late for theirs: docs/benchmarks.md).
    schedule_tick_seconds: float = Field(0.5, gt=0)
    schedule_lookahead_seconds: float = Field(3.0, gt=0)
    # A claimed batch belongs to its task for this long; a worker that dies loses it only this long.
    lease_seconds: float = Field(60, gt=0)

    # Retention, pruned by beat's upkeep task in small batches (worker.upkeep, docs/scale.md):
    # `message_history` rows older than this many days; final messages resolved more than
    # MESSAGE_RETENTION_DAYS ago only when it is set (off by default: the sending system owns
    # its rows).
    history_retention_days: int = Field(30, ge=1)
    message_retention_days: int | None = Field(None, ge=1)
    # The final-status feed (message_events) keeps EVENT_RETENTION_DAYS: how long a consumer or
    # the webhook may fall behind and still get every event.
    event_retention_days: int = Field(30, ge=1)

    # Tasks one `celery worker` runs at once (gevent greenlets); unset, see `pool_size`.
    worker_concurrency: int | None = Field(None, ge=1)

    # Prometheus endpoint of each `celery worker` (its main process); 0 turns it off. Loopback
    # by default: the numbers are not secret, but nothing outside the host needs to reach it.
    metrics_port: int = Field(9808, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # `text`: Celery's human-readable lines; `json`: one JSON object per line, for collectors.
    log_format: Literal["text", "json"] = "text"

    # The push receiver (`python -m worker.receiver`, docs/push.md). Its URL is
    # /esms/callback/<PUSH_TOKEN>; without a token every push is refused with 404.
    push_token: SecretStr | None = None
    # A new message's first poll waits max(POLL_INTERVAL_SECONDS, this), so pushes resolve it
    # first; 0 leaves polling as it is without pushes.
    push_grace_seconds: float = Field(0, ge=0)
    receiver_host: str = "127.0.0.1"
    receiver_port: int = Field(8098, ge=0, le=65535)
    # Its worker processes (uvicorn's supervisor); unset: one per CPU, at most 4.
    receiver_workers: int | None = Field(None, ge=1)
    # /metrics of every worker, summed, served by the supervisor on RECEIVER_HOST; 0 turns it off.
    receiver_metrics_port: int = Field(9810, ge=0, le=65535)
    # prometheus_client's own variable: where the workers write their values (emptied at each
    # start). Unset: a temporary directory, removed at the end.
    prometheus_multiproc_dir: str | None = None

    # The outbound webhook (worker.webhook, docs/integration.md): every final-status event is
    # POSTed here as JSON, signed with HMAC-SHA256 of FINAL_WEBHOOK_SECRET; unset, nothing is
    # posted. A failed POST is retried after a backoff that doubles up to the maximum.
    final_webhook_url: str | None = None
    final_webhook_secret: SecretStr | None = None
    final_webhook_batch_size: int = Field(100, ge=1, le=1000)
    final_webhook_timeout_seconds: float = Field(10, gt=0)
    final_webhook_max_backoff_seconds: float = Field(60, gt=0)

    @field_validator("esms_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_intervals(self) -> Settings:
        if self.poll_max_interval_seconds < self.poll_interval_seconds:
            raise ValueError("POLL_MAX_INTERVAL_SECONDS must be >= POLL_INTERVAL_SECONDS")
        if self.lease_seconds <= self.lease_min_remaining_seconds:
            raise ValueError(
                f"LEASE_SECONDS must exceed {self.lease_min_remaining_seconds:.0f}: the rate-slot "
                "wait, ESMS_TIMEOUT_SECONDS and the write must fit in one lease"
            )
        if self.final_webhook_url and self.final_webhook_secret is None:
            raise ValueError("FINAL_WEBHOOK_URL needs FINAL_WEBHOOK_SECRET to sign its posts")
        if (self.esms_api_key is None) != (self.esms_secret_key is None):
            raise ValueError("set both ESMS_API_KEY and ESMS_SECRET_KEY, or neither")
        if self.esms_api_key is not None and DEFAULT_ACCOUNT in self.esms_accounts:
            raise ValueError(
                f"account {DEFAULT_ACCOUNT!r} is set twice (ESMS_API_KEY and ESMS_ACCOUNTS)"
            )
        return self

    @property
    def accounts(self) -> dict[str, Account]:
        """Every configured account by name; `default` comes from ESMS_API_KEY/ESMS_SECRET_KEY."""
        found = {
            name: Account(name, keys.api_key, keys.secret_key)
            for name, keys in self.esms_accounts.items()
        }
        if self.esms_api_key is not None and self.esms_secret_key is not None:
            found[DEFAULT_ACCOUNT] = Account(
                DEFAULT_ACCOUNT, self.esms_api_key, self.esms_secret_key
            )
        return found

    @property
    def pool_size(self) -> int:
        """WORKER_CONCURRENCY, or room for every batch the scheduler may keep in flight for every
        configured account (rate x SCHEDULE_LOOKAHEAD_SECONDS each: 58 at the defaults) plus 50.
        A greenlet exists only while it runs a task, so the room an idle account has costs
        nothing; a pool too small for the busy accounts would hold the scheduler's ticks behind
        polls waiting for their rate slots."""
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        per_account = math.ceil(self.effective_rate_per_second * self.schedule_lookahead_seconds)
        return max(1, len(self.accounts)) * per_account + _SPARE_GREENLETS

    @property
    def lease_min_remaining_seconds(self) -> float:
        """A worker sends a batch only if its lease has this long left: the longest rate-slot
        wait, the request timeout and the write."""
        return MAX_LIMITER_WAIT_SECONDS + self.esms_timeout_seconds + LEASE_WRITE_RESERVE_SECONDS

    @property
    def effective_rate_per_second(self) -> float:
        return self.esms_rate_limit_per_second * (1 - self.esms_rate_safety_margin)

    @property
    def callback_url(self) -> str:
        return f"{self.esms_base_url}/ZaloCallback/GetCallback"

    @property
    def sqlalchemy_url(self) -> str:
        """DATABASE_URL for SQLAlchemy with psycopg 3, the driver this package installs: the
        common spellings `postgres://`, `postgresql://` and `postgresql+psycopg2://` mean it too."""
        return _POSTGRES_SCHEME.sub("postgresql+psycopg://", self.database_url.get_secret_value())

    @property
    def libpq_url(self) -> str:
        """The database URL in the form psycopg itself accepts (without the SQLAlchemy driver)."""
        return self.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


_POSTGRES_SCHEME = re.compile(r"^postgres(?:ql)?(?:\+psycopg2?)?://")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
