"""Settings of the eSMS emulator: accounts, limits, message-life knobs and fault knobs.

One mutable `EmulatorConfig` is shared by the whole app. Every field marked as a knob can be
changed while the server runs (`POST /_emulator/config`, used by chaos tests) through `update()`,
which checks every value first so that a bad request changes nothing. Accounts, the request-log
path and the clock are fixed at start. The clock is injectable so tests can move time instead of
sleeping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.emulator.truth import TruthKnobs


class ConfigError(ValueError):
    """A knob name or value the emulator cannot accept."""


@dataclass(frozen=True, slots=True)
class Account:
    """One eSMS account. `oa_ids` None means the account accepts any non-empty OAId."""

    api_key: str
    secret_key: str
    oa_ids: frozenset[str] | None = None


def parse_account(spec: str) -> Account:
    """Parse `API_KEY:SECRET_KEY` or `API_KEY:SECRET_KEY:OA1,OA2` (the `--account` flag)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"account must be API_KEY:SECRET_KEY[:OA1,OA2], got {spec!r}")
    oa_ids = None
    if len(parts) == 3:
        oa_ids = frozenset(oa for oa in parts[2].split(",") if oa)
        if not oa_ids:
            raise ConfigError(f"account {parts[0]!r} has an empty OA list")
    return Account(parts[0], parts[1], oa_ids)


def _knob(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"knob": True, "help": help_text})


@dataclass
class EmulatorConfig:
    """Everything that shapes the emulator's answers. Knobs carry their CLI help text."""

    accounts: tuple[Account, ...] = (Account("demo-key", "demo-secret"),)
    request_log_path: str | None = None
    # Where pushes go (push.py); the CallbackUrl of every pushed message.
    push_url: str | None = None
    clock: Callable[[], float] = time.time

    seed: int = _knob(0, "seed of message truth (and, at start, of fault and latency draws)")
    rate_limit: int = _knob(20, "requests per ApiKey allowed in any sliding window")
    rate_window_s: float = _knob(1.0, "length of the rate-limit sliding window, seconds")
    count_refused: bool = _knob(
        False, "refused (Code 160) requests count in the window too: a stricter provider"
    )
    max_refids: int = _knob(200, "RefIds read per request; the rest are ignored")
    latency_min_ms: float = _knob(0.0, "lowest added response latency, ms")
    latency_max_ms: float = _knob(0.0, "highest added response latency, ms")
    auto_register: bool = _knob(True, "register unknown RefIds at the first request naming them")
    visible_after_s: float = _knob(0.0, "seconds after registration before a message has data")
    final_after_min_s: float = _knob(2.0, "earliest final status, seconds after registration")
    final_after_max_s: float = _knob(10.0, "latest final status, seconds after registration")
    success_rate: float = _knob(0.85, "fraction of messages delivered (SendStatus 5, success)")
    rejected_rate: float = _knob(
        0.02, "fraction of messages rejected (SendStatus 4), capped at 1 - success_rate"
    )
    no_callback_rate: float = _knob(0.0, "fraction of messages sent without CallbackUrl (no data)")
    templates_per_oa: int = _knob(
        20, "ZNS templates each OA sends from (ZnsTempId); 0: any of 100,000 for every message"
    )
    numbers_as_strings_rate: float = _knob(0.0, "fraction of responses with numbers as strings")
    fault_5xx_rate: float = _knob(0.0, "fraction of requests answered HTTP 500/502/503")
    fault_slow_rate: float = _knob(0.0, "fraction of requests answered after slow_seconds")
    slow_seconds: float = _knob(30.0, "delay of a slow answer, seconds (beyond client timeouts)")
    fault_broken_body_rate: float = _knob(0.0, "fraction of requests with a broken body")
    fault_stale_rate: float = _knob(0.0, "per final item: answer an older status instead")
    fault_duplicate_rate: float = _knob(0.0, "per item: add an older-status twin of the item")
    fault_code_rate: float = _knob(0.0, "fraction of requests answered with a non-100 Code")
    fault_codes: tuple[int, ...] = _knob((99, 105, 160), "Codes used by fault_code_rate")
    not_found_code: bool = _knob(
        False,
        "answer Code 105 (SMSID not found) to the whole request when it names a RefId that is "
        "unknown or has no data (yet, or ever: sent without CallbackUrl), instead of leaving "
        "that RefId out",
    )
    push_rate: float = _knob(0.0, "fraction of messages whose status changes go to --push-url")
    push_timeout_s: float = _knob(5.0, "a push unanswered this long is sent again (5 times)")

    def knobs(self) -> dict[str, Any]:
        """Current knob values, JSON-ready."""
        values = {name: getattr(self, name) for name in KNOB_NAMES}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply knob changes atomically: all are checked before any is set."""
        unknown = sorted(set(changes) - set(KNOB_NAMES))
        if unknown:
            raise ConfigError(f"unknown knobs: {', '.join(unknown)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        candidate = dataclasses.replace(self, **coerced)
        candidate.validate()
        for name, value in coerced.items():
            setattr(self, name, value)

    def validate(self) -> None:
        """Raise ConfigError when the knobs contradict each other or leave their range."""
        for name in KNOB_NAMES:
            if name.endswith("_rate") and not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1]")
        # Request-level faults are mutually exclusive (one draw per request), so each rate is
        # exact only while they fit together in [0, 1].
        if sum(self.request_fault_rates().values()) > 1.0:
            raise ConfigError("fault_5xx/slow/broken_body/code rates must sum to at most 1")
        if self.rate_limit < 1 or self.max_refids < 1 or self.rate_window_s <= 0:
            raise ConfigError("rate_limit, max_refids and rate_window_s must be positive")
        if not 0 <= self.latency_min_ms <= self.latency_max_ms:
            raise ConfigError("need 0 <= latency_min_ms <= latency_max_ms")
        if not 0 <= self.final_after_min_s <= self.final_after_max_s:
            raise ConfigError("need 0 <= final_after_min_s <= final_after_max_s")
        if self.visible_after_s < 0 or self.slow_seconds < 0:
            raise ConfigError("visible_after_s and slow_seconds must not be negative")
        if not self.fault_codes:
            raise ConfigError("fault_codes must not be empty")
        if self.push_timeout_s <= 0:
            raise ConfigError("push_timeout_s must be positive")
        if self.push_url is not None and not self.push_url.startswith(("http://", "https://")):
            raise ConfigError("push_url must be an http:// or https:// URL")

    def request_fault_rates(self) -> dict[str, float]:
        """Request-level fault names (as logged) and their rates, in draw order."""
        return {
            "5xx": self.fault_5xx_rate,
            "slow": self.fault_slow_rate,
            "broken_body": self.fault_broken_body_rate,
            "code": self.fault_code_rate,
        }

    def truth_knobs(self) -> TruthKnobs:
        """The knobs a message's life depends on, frozen at its registration."""
        return TruthKnobs(
            seed=self.seed,
            visible_after_s=self.visible_after_s,
            final_after_min_s=self.final_after_min_s,
            final_after_max_s=self.final_after_max_s,
            success_rate=self.success_rate,
            rejected_rate=self.rejected_rate,
            no_callback_rate=self.no_callback_rate,
            templates_per_oa=self.templates_per_oa,
            push_url=self.push_url,
            push_rate=self.push_rate if self.push_url is not None else 0.0,
        )


KNOBS: tuple[dataclasses.Field[Any], ...] = tuple(
    f for f in dataclasses.fields(EmulatorConfig) if f.metadata.get("knob")
)
KNOB_NAMES: tuple[str, ...] = tuple(f.name for f in KNOBS)


def _coerce(name: str, value: Any) -> Any:
    """Turn a JSON value into the knob's type, refusing lossy or surprising conversions."""
    default = next(f.default for f in KNOBS if f.name == name)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(_is_code(item) for item in items):
            return tuple(int(item) for item in items)
    raise ConfigError(f"bad value for {name}: {value!r}")


def _is_code(item: Any) -> bool:
    if isinstance(item, str):
        return item.strip().lstrip("-").isdigit()
    return isinstance(item, int) and not isinstance(item, bool)
