"""A loopback stand-in for eSMS.vn's Zalo ZNS GetCallback API, for tests, demos and benchmarks.

It answers `POST /ZaloCallback/GetCallback` as the provider documents it (credentials, OAId checks,
200 RefIds, 20 requests per second per ApiKey), tells each message's life deterministically from a
seed, injects faults on demand, and records every request so tests can audit the poller. The
`/_emulator` admin API registers messages, reports the truth, the request log and stats, and changes
knobs at runtime. Run it with `python -m worker.emulator` (or `esms-emulator`).
"""

from worker.emulator.app import create_app
from worker.emulator.config import EmulatorConfig

__all__ = ["EmulatorConfig", "create_app"]
