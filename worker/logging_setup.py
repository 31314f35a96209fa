"""Log lines: Celery's human-readable format by default, JSON lines with `LOG_FORMAT=json`.

`celery worker` and `celery beat` configure logging themselves and then send
`after_setup_logger` (root) and `after_setup_task_logger` (task logger); `worker.celery` answers
both with `install`, which puts the chosen formatter on the handlers Celery made, so Celery keeps
its levels, log files and stdout redirection.

A JSON line is one object: `time` (UTC, ISO 8601), `level`, `logger`, `message`, then whichever of
`FIELDS` the log call passed with `extra=` (the poller passes account, oa, size and duration for
every batch), the running task's name and id, and `exception` as text. Both formats blank every
configured secret (ESMS keys, passwords in the URLs, the push token) wherever it would appear:
no code path should log one, and this makes sure a mistake still does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from celery._state import get_current_task

from worker.settings import Settings

FIELDS = ("account", "oa", "size", "duration", "batch", "items", "changed", "reason")
REDACTED = "***"
# Shorter "secrets" would blank ordinary words in every line and protect nothing.
_MIN_SECRET_LENGTH = 4


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the settings hold, longest first (so no secret is half-replaced)."""
    found = []
    for account in settings.accounts.values():
        found += [account.api_key.get_secret_value(), account.secret_key.get_secret_value()]
    for url in (settings.database_url, settings.redis_url):
        try:
            found.append(urlsplit(url.get_secret_value()).password or "")
        except ValueError:
            pass
    if settings.push_token is not None:
        found.append(settings.push_token.get_secret_value())
    if settings.final_webhook_secret is not None:
        found.append(settings.final_webhook_secret.get_secret_value())
    return sorted({s for s in found if len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value if isinstance(value, int | float | bool) else str(value)
        task = get_current_task()
        if task is not None and task.request.id is not None:
            entry["task"] = task.name
            entry["task_id"] = task.request.id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in entry.items():
            if isinstance(value, str):
                entry[key] = redact(value, self._secrets)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RedactingFormatter(logging.Formatter):
    """Celery's own formatter, with the secrets blanked from what it writes."""

    def __init__(self, inner: logging.Formatter | None, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self._secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self._secrets)


def formatter_for(settings: Settings, current: logging.Formatter | None) -> logging.Formatter:
    secrets = secrets_of(settings)
    if settings.log_format == "json":
        return JsonFormatter(secrets)
    if isinstance(current, RedactingFormatter):
        current = current.inner
    return RedactingFormatter(current, secrets)


def install(logger: logging.Logger, settings: Settings) -> None:
    """Give each of the logger's handlers the format LOG_FORMAT asks for."""
    for handler in logger.handlers:
        handler.setFormatter(formatter_for(settings, handler.formatter))
