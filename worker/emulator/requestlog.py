"""What the emulator saw: one entry per GetCallback request, in arrival order, and totals over them.

Tests and the benchmark audit the poller with this log (how fast it called, which RefIds it asked
for, which faults it met), so every entry is written at arrival with the timestamp the rate limiter
used. The SecretKey is never part of an entry. With a path, entries are also appended to a
JSON-lines file as they happen, so a crashed run still leaves its evidence.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import IO, Any

from worker.emulator.ratelimit import max_in_window


@dataclass(slots=True)
class LogEntry:
    """One GetCallback request. `refids` holds the RefIds read (at most max_refids)."""

    t: float  # unix time at arrival, before any latency sleep
    api_key: str | None
    oa_id: str | None
    n_refids: int  # as sent
    n_read: int
    n_items: int  # items in the body actually sent (0 when the body is broken)
    refids: list[str]
    code: int | None  # the Code sent, None when the body carries none (5xx, HTML, truncated)
    http_status: int
    admitted: bool = False  # passed the credentials check and entered the rate window
    over_limit: bool = False  # answered 160 by the rate limiter (not by a fault)
    fault: str | None = None  # see faults.py for the names
    fault_detail: str | None = None
    numbers_as_strings: bool = False
    delay_ms: float = 0.0
    seq: int = -1  # set by RequestLog.append

    def to_json(self, with_refids: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_refids:
            del data["refids"]
        return data


class RequestLog:
    """Append-only in-memory log with an optional JSON-lines copy."""

    def __init__(self, path: str | None = None) -> None:
        self._entries: list[LogEntry] = []
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None

    def append(self, entry: LogEntry) -> None:
        entry.seq = len(self._entries)
        self._entries.append(entry)
        if self._file is not None:
            self._file.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
            self._file.flush()

    def since(self, seq: int, limit: int | None = None) -> list[LogEntry]:
        """Entries with seq >= `seq`, oldest first, at most `limit` of them."""
        start = max(seq, 0)
        end = None if limit is None else start + limit
        return self._entries[start:end]

    def clear(self) -> None:
        self._entries.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def stats(self, window_s: float) -> dict[str, Any]:
        """Totals by Code, HTTP status and fault, and per ApiKey the busiest window."""
        by_key: defaultdict[str, list[LogEntry]] = defaultdict(list)
        for entry in self._entries:
            if entry.api_key is not None:
                by_key[entry.api_key].append(entry)
        return {
            "requests": len(self._entries),
            "window_s": window_s,
            "by_code": _count(entry.code for entry in self._entries),
            "by_http_status": _count(entry.http_status for entry in self._entries),
            "by_fault": _count(entry.fault for entry in self._entries if entry.fault),
            "over_limit": sum(entry.over_limit for entry in self._entries),
            "per_api_key": {key: _key_stats(entries, window_s) for key, entries in by_key.items()},
        }


def _count(values: Any) -> dict[str, int]:
    # JSON object keys are strings; a missing Code is counted under "null".
    return {"null" if v is None else str(v): n for v, n in sorted(Counter(values).items(), key=str)}


def _key_stats(entries: list[LogEntry], window_s: float) -> dict[str, Any]:
    # Sorted defensively: time.time() can step back under NTP, the audit must still be exact.
    times = sorted(entry.t for entry in entries)
    admitted_times = sorted(entry.t for entry in entries if entry.admitted)
    return {
        "requests": len(entries),
        "admitted": len(admitted_times),
        "over_limit": sum(entry.over_limit for entry in entries),
        "max_in_window": max_in_window(times, window_s),
        "max_admitted_in_window": max_in_window(admitted_times, window_s),
        "first_t": times[0],
        "last_t": times[-1],
    }
