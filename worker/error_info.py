"""ErrorInfo: find Zalo's numeric error code in whatever wrapping eSMS put around it.

eSMS keeps ErrorInfo as free text. Seen forms: a Zalo JSON object followed by a .NET exception
message; that object quoted and escaped as a JSON string; URL-encoded (once or twice); with a
`____dd/MM/yyyy HH:mm:ss` suffix; plain text; empty. The text itself is always stored verbatim;
this module only extracts the leading object's integer `error`, or None.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

_DECODER = json.JSONDecoder()
# Two URL-decodings and one JSON-string unquoting cover every form seen; a few more rounds cost
# nothing and stop any input from looping.
_MAX_UNWRAP = 6


def _unwrap_once(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith('"'):
        try:
            inner, _ = _DECODER.raw_decode(stripped)
        except (ValueError, RecursionError):
            return stripped[1:]
        if isinstance(inner, str):
            return inner
    if "%" in stripped:
        return unquote(stripped)
    return stripped


def _leading_object(text: str) -> dict | None:
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return None
    try:
        value, _ = _DECODER.raw_decode(stripped)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_error_code(error_info: str | None) -> int | None:
    """The integer `error` of the JSON object ErrorInfo starts with, once unwrapped; else None."""
    if not error_info:
        return None
    text = error_info
    for _ in range(_MAX_UNWRAP):
        found = _leading_object(text)
        if found is not None:
            return _as_code(found.get("error"))
        unwrapped = _unwrap_once(text)
        if unwrapped == text:
            return None
        text = unwrapped
    return None


def _as_code(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -(2**31) <= value < 2**31 else None
    if isinstance(value, str):
        try:
            return _as_code(int(value.strip()))
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return _as_code(int(value))
    return None
