"""Unit tests for worker.settings: the operator contract's defaults, env parsing, secret hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from worker.settings import DEFAULT_ACCOUNT, Account, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

API_KEY = "AK7f3c9a1e5b2d4c6e8a0b1c2d3e4f5a6b"
SECRET_KEY = "SKQm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFi"
API_KEY_2 = "AKzz00yy11xx22ww33vv44uu55tt66ss"
SECRET_KEY_2 = "SKpp99oo88nn77mm66ll55kk44jj33ii"
DB_PASSWORD = "DbPa55w0rd-Sup3rS3cr3t"
DB_URL = f"postgresql+psycopg://esms:{DB_PASSWORD}@db.internal:5432/esms"
REDIS_PASSWORD = "R3disPa55-Sup3rS3cr3t"
REDIS_URL = f"redis://:{REDIS_PASSWORD}@redis.internal:6379/2"
SECRETS = (API_KEY, SECRET_KEY, API_KEY_2, SECRET_KEY_2, DB_PASSWORD, REDIS_PASSWORD)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No variable of the contract leaks in from the machine running the tests, nor any .env."""
    fields = set(Settings.model_fields)
    for name in list(os.environ):
        if name.lower() in fields:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _leaked(text: str) -> list[str]:
    """Secrets of which any 8 consecutive characters appear in `text`."""
    return [
        secret
        for secret in SECRETS
        if any(secret[i : i + 8] in text for i in range(len(secret) - 7))
    ]


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_match_the_operator_contract():
    settings = Settings(_env_file=None)
    expected_db = "postgresql+psycopg://postgres@127.0.0.1:5432/esms"
    assert settings.database_url.get_secret_value() == expected_db
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.esms_base_url == "https://status-sms.esms.vn"
    assert settings.esms_rate_limit_per_second == 20
    assert settings.esms_batch_size == 200
    assert settings.esms_timeout_seconds == 10
    assert settings.poll_interval_seconds == 30
    assert settings.poll_max_interval_seconds == 600
    assert settings.message_max_age_seconds == 259200
    assert settings.esms_api_key is None and settings.esms_secret_key is None
    assert settings.esms_accounts == {}
    assert settings.accounts == {}


def test_derived_values():
    settings = Settings(_env_file=None)
    assert settings.callback_url == "https://status-sms.esms.vn/ZaloCallback/GetCallback"
    assert settings.sqlalchemy_url == "postgresql+psycopg://postgres@127.0.0.1:5432/esms"
    assert settings.libpq_url == "postgresql://postgres@127.0.0.1:5432/esms"
    assert settings.effective_rate_per_second == pytest.approx(20 * (1 - 0.04))
    assert settings.effective_rate_per_second < settings.esms_rate_limit_per_second


@pytest.mark.parametrize("url", ["https://emulator.test/", "https://emulator.test//"])
def test_base_url_trailing_slash_is_dropped(url):
    settings = Settings(_env_file=None, esms_base_url=url)
    assert settings.esms_base_url == "https://emulator.test"
    assert settings.callback_url == "https://emulator.test/ZaloCallback/GetCallback"


# --- the environment ------------------------------------------------------------------------------


def test_reads_numbers_and_urls_from_env(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", DB_URL)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("ESMS_BASE_URL", "http://127.0.0.1:8099/")
    monkeypatch.setenv("ESMS_RATE_LIMIT_PER_SECOND", "15")
    monkeypatch.setenv("ESMS_BATCH_SIZE", "100")
    monkeypatch.setenv("ESMS_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("POLL_INTERVAL_SECONDS", "5")
    monkeypatch.setenv("POLL_MAX_INTERVAL_SECONDS", "60")
    monkeypatch.setenv("MESSAGE_MAX_AGE_SECONDS", "3600")
    settings = Settings(_env_file=None)
    assert settings.sqlalchemy_url == DB_URL
    assert settings.libpq_url == f"postgresql://esms:{DB_PASSWORD}@db.internal:5432/esms"
    assert settings.redis_url.get_secret_value() == REDIS_URL
    assert settings.esms_base_url == "http://127.0.0.1:8099"
    assert settings.esms_rate_limit_per_second == 15
    assert settings.esms_batch_size == 100
    assert settings.esms_timeout_seconds == 2.5
    assert settings.poll_interval_seconds == 5
    assert settings.poll_max_interval_seconds == 60
    assert settings.message_max_age_seconds == 3600


def test_esms_accounts_json(monkeypatch):
    accounts = {
        "shop": {"api_key": API_KEY, "secret_key": SECRET_KEY},
        "crm": {"api_key": API_KEY_2, "secret_key": SECRET_KEY_2},
    }
    monkeypatch.setenv("ESMS_ACCOUNTS", json.dumps(accounts))
    found = Settings(_env_file=None).accounts
    assert set(found) == {"shop", "crm"}
    assert all(isinstance(account, Account) for account in found.values())
    assert found["shop"].name == "shop"
    assert found["shop"].api_key.get_secret_value() == API_KEY
    assert found["shop"].secret_key.get_secret_value() == SECRET_KEY
    assert found["crm"].api_key.get_secret_value() == API_KEY_2
    assert found["crm"].secret_key.get_secret_value() == SECRET_KEY_2


def test_single_key_pair_is_the_default_account(monkeypatch):
    monkeypatch.setenv("ESMS_API_KEY", API_KEY)
    monkeypatch.setenv("ESMS_SECRET_KEY", SECRET_KEY)
    found = Settings(_env_file=None).accounts
    assert list(found) == [DEFAULT_ACCOUNT] == ["default"]
    account = found["default"]
    assert account.name == "default"
    assert account.api_key.get_secret_value() == API_KEY
    assert account.secret_key.get_secret_value() == SECRET_KEY


def test_default_account_next_to_named_accounts(monkeypatch):
    monkeypatch.setenv("ESMS_API_KEY", API_KEY)
    monkeypatch.setenv("ESMS_SECRET_KEY", SECRET_KEY)
    accounts = {"crm": {"api_key": API_KEY_2, "secret_key": SECRET_KEY_2}}
    monkeypatch.setenv("ESMS_ACCOUNTS", json.dumps(accounts))
    found = Settings(_env_file=None).accounts
    assert set(found) == {"default", "crm"}
    assert found["default"].api_key.get_secret_value() == API_KEY


def test_env_file_is_read_when_asked(tmp_path):
    env_file = tmp_path / "custom.env"
    env_file.write_text(
        f"ESMS_API_KEY={API_KEY}\nESMS_SECRET_KEY={SECRET_KEY}\nESMS_BATCH_SIZE=50\n"
    )
    settings = Settings(_env_file=env_file)
    assert settings.esms_batch_size == 50
    assert settings.accounts["default"].secret_key.get_secret_value() == SECRET_KEY


# --- secrets stay hidden --------------------------------------------------------------------------


def _full_settings(monkeypatch) -> Settings:
    monkeypatch.setenv("DATABASE_URL", DB_URL)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("ESMS_API_KEY", API_KEY)
    monkeypatch.setenv("ESMS_SECRET_KEY", SECRET_KEY)
    accounts = {"crm": {"api_key": API_KEY_2, "secret_key": SECRET_KEY_2}}
    monkeypatch.setenv("ESMS_ACCOUNTS", json.dumps(accounts))
    return Settings(_env_file=None)


def test_settings_repr_and_str_hide_secrets(monkeypatch):
    settings = _full_settings(monkeypatch)
    for text in (repr(settings), str(settings), f"{settings}", settings.model_dump_json()):
        assert _leaked(text) == [], text
    assert _leaked(repr(settings.model_dump())) == []
    assert "**********" in repr(settings)


def test_accounts_repr_and_str_hide_keys(monkeypatch):
    accounts = _full_settings(monkeypatch).accounts
    for account in accounts.values():
        for text in (repr(account), str(account), f"{account}", f"{account!r}"):
            assert _leaked(text) == [], text
            assert account.name in text
    assert _leaked(repr(accounts)) == []
    assert repr(accounts["crm"]) == "Account(name='crm')"


def test_account_built_directly_hides_keys():
    account = Account("shop", SecretStr(API_KEY), SecretStr(SECRET_KEY))
    assert _leaked(repr(account)) == _leaked(str(account)) == []
    assert _leaked(repr(account.api_key)) == _leaked(str(account.secret_key)) == []


# --- validation -----------------------------------------------------------------------------------

ACCOUNT_JSON = json.dumps({"crm": {"api_key": API_KEY_2, "secret_key": SECRET_KEY_2}})
INVALID = {
    "only_api_key": {"ESMS_API_KEY": API_KEY, "DATABASE_URL": DB_URL},
    "only_secret_key": {"ESMS_SECRET_KEY": SECRET_KEY, "DATABASE_URL": DB_URL},
    "max_interval_below_interval": {
        "ESMS_API_KEY": API_KEY,
        "ESMS_SECRET_KEY": SECRET_KEY,
        "DATABASE_URL": DB_URL,
        "ESMS_ACCOUNTS": ACCOUNT_JSON,
        "POLL_INTERVAL_SECONDS": "60",
        "POLL_MAX_INTERVAL_SECONDS": "30",
    },
    "default_account_twice": {
        "ESMS_API_KEY": API_KEY,
        "ESMS_SECRET_KEY": SECRET_KEY,
        "ESMS_ACCOUNTS": json.dumps({"default": {"api_key": API_KEY_2, "secret_key": "x" * 8}}),
    },
    "account_without_secret": {"ESMS_ACCOUNTS": json.dumps({"crm": {"api_key": API_KEY_2}})},
    "account_not_json": {"ESMS_ACCOUNTS": ACCOUNT_JSON[:-3], "DATABASE_URL": DB_URL},
    "batch_size_zero": {
        "ESMS_BATCH_SIZE": "0",
        "ESMS_API_KEY": API_KEY,
        "ESMS_SECRET_KEY": SECRET_KEY,
    },
    "rate_zero": {"ESMS_RATE_LIMIT_PER_SECOND": "0", "DATABASE_URL": DB_URL},
}


def _settings_error(monkeypatch, env: dict[str, str]) -> Exception:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((ValidationError, SettingsError)) as caught:
        Settings(_env_file=None)
    return caught.value


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_settings_raise(monkeypatch, name):
    error = _settings_error(monkeypatch, INVALID[name])
    assert str(error)


def test_error_messages_name_the_problem(monkeypatch):
    assert "ESMS_SECRET_KEY" in str(_settings_error(monkeypatch, INVALID["only_api_key"]))
    monkeypatch.delenv("ESMS_API_KEY")
    assert "ESMS_API_KEY" in str(_settings_error(monkeypatch, INVALID["only_secret_key"]))
    error = _settings_error(monkeypatch, INVALID["max_interval_below_interval"])
    assert "POLL_MAX_INTERVAL_SECONDS" in str(error)


def test_max_interval_equal_to_interval_is_fine():
    settings = Settings(_env_file=None, poll_interval_seconds=30, poll_max_interval_seconds=30)
    assert settings.poll_max_interval_seconds == settings.poll_interval_seconds


NO_LEAK_CASES = [
    pytest.param("only_api_key"),
    pytest.param("only_secret_key"),
    pytest.param("max_interval_below_interval"),
    pytest.param("default_account_twice"),
    pytest.param("account_without_secret"),
    pytest.param("account_not_json"),
    pytest.param("batch_size_zero"),
    pytest.param("rate_zero"),
]


@pytest.mark.parametrize("name", NO_LEAK_CASES)
def test_validation_errors_do_not_show_secrets(monkeypatch, name):
    error = _settings_error(monkeypatch, INVALID[name])
    assert _leaked(str(error)) == []
    assert _leaked(repr(error)) == []


# --- Account.limiter_key --------------------------------------------------------------------------


def test_limiter_key_is_per_api_key():
    shop = Account("shop", SecretStr(API_KEY), SecretStr(SECRET_KEY))
    same_key = Account("other-name", SecretStr(API_KEY), SecretStr(SECRET_KEY_2))
    other = Account("shop", SecretStr(API_KEY_2), SecretStr(SECRET_KEY))
    assert shop.limiter_key == shop.limiter_key == same_key.limiter_key
    assert shop.limiter_key != other.limiter_key


def test_limiter_key_hides_the_api_key():
    for api_key in (API_KEY, API_KEY_2, "short"):
        key = Account("a", SecretStr(api_key), SecretStr(SECRET_KEY)).limiter_key
        assert isinstance(key, str) and key
        assert api_key not in key
        assert SECRET_KEY not in key
        assert len(key) >= 12, "enough bits that two accounts do not share a budget by chance"


def test_limiter_key_is_stable_across_processes():
    # Every worker process must name the same Redis budget for one ApiKey.
    here = Account("a", SecretStr(API_KEY), SecretStr(SECRET_KEY)).limiter_key
    code = (
        "from pydantic import SecretStr; from worker.settings import Account; "
        f"print(Account('b', SecretStr({API_KEY!r}), SecretStr('x')).limiter_key)"
    )
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert done.stdout.strip() == here


def test_lease_must_cover_wait_request_and_write():
    with pytest.raises(ValueError, match="LEASE_SECONDS"):
        Settings(_env_file=None, lease_seconds=20, esms_timeout_seconds=10)
    Settings(_env_file=None, lease_seconds=20, esms_timeout_seconds=2)


@pytest.mark.parametrize(
    "given",
    [
        "postgresql+psycopg://u:p@db:5432/esms",
        "postgresql://u:p@db:5432/esms",
        "postgres://u:p@db:5432/esms",
        "postgresql+psycopg2://u:p@db:5432/esms",
    ],
)
def test_database_url_spellings_all_mean_psycopg3(given):
    settings = Settings(_env_file=None, database_url=given)
    assert settings.sqlalchemy_url == "postgresql+psycopg://u:p@db:5432/esms"
    assert settings.libpq_url == "postgresql://u:p@db:5432/esms"


def test_pool_has_room_for_every_accounts_lookahead():
    one = Settings(_env_file=None, esms_api_key="k", esms_secret_key="s")
    assert one.pool_size == 58 + 50
    four = Settings(
        _env_file=None,
        esms_accounts={f"a{i}": {"api_key": f"k{i}", "secret_key": "s"} for i in range(4)},
    )
    assert four.pool_size == 4 * 58 + 50
    assert Settings(_env_file=None, worker_concurrency=7).pool_size == 7
