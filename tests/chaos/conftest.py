"""Fixtures of the chaos tests: a private broker, the emulator with the accounts they use.

Every chaos test gets its own `redis-server` (no persistence, a free port) rather than the shared
test database 13: its workers then take only its own tasks, even while another test session on
the same machine runs workers of its own against database 13.
"""

from __future__ import annotations

import signal

import pytest

from tests.conftest import TEST_API_KEY, TEST_SECRET_KEY
from tests.processes import start_emulator, start_private_redis

KEYS = {"ESMS_API_KEY": TEST_API_KEY, "ESMS_SECRET_KEY": TEST_SECRET_KEY}
OAS = ("1090257973118325189", "2020202020202020202", "3030303030303030303")
# Short message lives: final 1-5 s after insertion, so a run is about the fault, not the wait.
LIFE = ("--final-after-min-s", "1", "--final-after-max-s", "5")


@pytest.fixture
def emulator_with(children):
    """Start an emulator accepting the test account; extra flags are passed on."""

    def start(*flags: str, accounts: tuple[str, ...] = ()):
        accepted = accounts or (f"{TEST_API_KEY}:{TEST_SECRET_KEY}",)
        account_flags = [flag for spec in accepted for flag in ("--account", spec)]
        return start_emulator(children, *account_flags, *LIFE, *flags)

    return start


@pytest.fixture
def broker_url(children) -> str:
    """A private Redis for Celery, the rate limiter and the cool-offs of one test."""
    return start_private_redis(children).url()


@pytest.fixture(autouse=True)
def _daemons_killed_after_the_test(children):
    """Once a test is over its daemons are only in the way: kill them at once rather than wait
    for warm shutdowns. (Set up after `children`, so this runs before its teardown.)"""
    yield
    for child in children.started:
        if child.name.startswith(("worker", "beat", "flower")):
            child.stop(signal.SIGKILL)
