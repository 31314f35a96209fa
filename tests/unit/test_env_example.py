"""`.env.example` stays true to `worker.settings`: every setting listed once, with its default."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import SecretStr

from worker.settings import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"
# `# NAME=value` lines up to the compose-demo section, which repeats names with demo values.
_LINE = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", re.M)
# Settings without a fixed default: the example shows a typical value instead.
_NO_FIXED_DEFAULT = {"WORKER_CONCURRENCY"}
# Read by Flower and Grafana (docker compose), not by the daemon.
_NOT_DAEMON_SETTINGS = {"FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD"}


def _documented() -> dict[str, str]:
    text = ENV_EXAMPLE.read_text().split("# --- docker compose with the emulator", 1)[0]
    listed: dict[str, str] = {}
    for name, value in _LINE.findall(text):
        assert name not in listed, f"{name} is listed twice"
        listed[name] = value.strip().strip("'")
    return listed


def _as_text(value) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_setting_is_listed_with_its_default():
    listed = _documented()
    fields = {name.upper(): field for name, field in Settings.model_fields.items()}
    assert set(listed) - _NOT_DAEMON_SETTINGS == set(fields)
    for name, field in fields.items():
        if name in _NO_FIXED_DEFAULT:
            continue
        default = field.default_factory() if field.default_factory else field.default
        assert listed[name] == _as_text(default), name
