"""The log formats: JSON lines carry the fields and nothing secret; text keeps Celery's format."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from worker.logging_setup import JsonFormatter, RedactingFormatter, install, secrets_of
from worker.settings import Settings

API_KEY = "A1B2C3D4E5F6A7B8C9D0"
SECRET_KEY = "s3cr3t-SECRET-key"
SHOP_SECRET = "shop-b-secret-123"
DB_PASSWORD = "pg-Pa55word"


def settings(**overrides) -> Settings:
    values = {
        "database_url": f"postgresql+psycopg://esms:{DB_PASSWORD}@db:5432/esms",
        "redis_url": "redis://127.0.0.1:6379/0",
        "esms_api_key": API_KEY,
        "esms_secret_key": SECRET_KEY,
        "esms_accounts": {"shopb": {"api_key": "shop-b-api-key", "secret_key": SHOP_SECRET}},
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def record(msg: str, *args, level: int = logging.INFO, exc_info=None, **extra) -> logging.LogRecord:
    made = logging.LogRecord("worker.poller", level, __file__, 1, msg, args, exc_info)
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_the_fields_and_the_batch_details():
    line = JsonFormatter().format(
        record(
            "account=%s oa=%s size=%d duration=%.3fs: %d items",
            "default", "1090257973118325189", 200, 0.123456, 200,
            account="default", oa="1090257973118325189", size=200, duration=0.123,
            unrelated="not printed",
        )
    )  # fmt: skip
    assert "\n" not in line
    entry = json.loads(line)
    assert entry == {
        "time": entry["time"],
        "level": "INFO",
        "logger": "worker.poller",
        "message": "account=default oa=1090257973118325189 size=200 duration=0.123s: 200 items",
        "account": "default",
        "oa": "1090257973118325189",
        "size": 200,
        "duration": 0.123,
    }
    assert entry["time"].endswith("Z") and "T" in entry["time"]


def test_an_exception_stays_on_one_line_and_secrets_are_blanked_everywhere():
    formatter = JsonFormatter(secrets_of(settings()))
    try:
        raise RuntimeError(f"provider echoed {SECRET_KEY} and {API_KEY}")
    except RuntimeError:
        exc_info = sys.exc_info()
    line = formatter.format(
        record(
            "request body %s", {"ApiKey": API_KEY, "SecretKey": SECRET_KEY},
            level=logging.ERROR, exc_info=exc_info, reason=f"bad key {SHOP_SECRET}",
        )
    )  # fmt: skip
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert "RuntimeError" in entry["exception"]
    for secret in (API_KEY, SECRET_KEY, SHOP_SECRET, "shop-b-api-key", DB_PASSWORD):
        assert secret not in line
    assert "***" in entry["message"] and "***" in entry["reason"]


def test_secrets_are_every_key_the_passwords_the_push_token_and_the_webhook_secret():
    found = secrets_of(
        settings(
            redis_url="redis://:redis-pass-9@r:6379/0",
            push_token="tok-12345",
            final_webhook_url="https://sender.invalid/hook",
            final_webhook_secret="hook-secret-77",
        )
    )
    assert set(found) == {
        API_KEY, SECRET_KEY, "shop-b-api-key", SHOP_SECRET, DB_PASSWORD, "redis-pass-9",
        "tok-12345", "hook-secret-77",
    }  # fmt: skip
    assert secrets_of(settings(esms_api_key=None, esms_secret_key=None, esms_accounts={})) == [
        DB_PASSWORD
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_install_swaps_the_formatter_of_celerys_handlers(log_format):
    logger = logging.getLogger(f"test-install-{log_format}")
    handler = logging.StreamHandler()
    celery_format = logging.Formatter("[%(levelname)s/%(processName)s] %(message)s")
    handler.setFormatter(celery_format)
    logger.addHandler(handler)
    try:
        install(logger, settings(log_format=log_format))
        install(logger, settings(log_format=log_format))  # Celery may set up twice
        line = handler.formatter.format(record("polling with %s", SECRET_KEY))
    finally:
        logger.removeHandler(handler)
    assert SECRET_KEY not in line
    if log_format == "json":
        assert json.loads(line)["message"] == "polling with ***"
    else:
        assert isinstance(handler.formatter, RedactingFormatter)
        assert handler.formatter.inner is celery_format
        assert line == "[INFO/MainProcess] polling with ***"


def test_log_format_is_text_or_json():
    assert settings().log_format == "text"
    with pytest.raises(ValueError):
        settings(log_format="xml")
