"""The push receiver's counters: prometheus_client metrics, summed over its worker processes.

`python -m worker.receiver` runs its app in several processes (uvicorn's `workers`), so the
counters use prometheus_client's multiprocess mode: with `PROMETHEUS_MULTIPROC_DIR` set before
prometheus_client is imported (the receiver's supervisor sets it for its workers), every worker
writes its values to its own files in that directory, and `multiprocess_registry` reads them all,
summed, for the supervisor's `/metrics` endpoint (`serve`) and for any worker's `/stats`. Without
the variable (an app built in a test) the values stay in the process and `snapshot` reads them
there. Counters and histograms only: a worker that dies leaves its counts in the sum, and no live
gauge needs `mark_process_dead`.

Metrics (labels never carry a token, a RefId or a phone number):
- `esms_receiver_pushes_total{outcome}`: requests answered, by outcome (see `OUTCOMES`).
- `esms_receiver_rows_changed_total`: rows the pushes moved forward.
- `esms_receiver_resolved_total{state}`: rows a push made final, by state.
- `esms_receiver_write_retries_total`: transactions run again after a deadlock or a
  serialization failure.
- `esms_receiver_write_duration_seconds`: one write transaction (a batch of pushes), end to end.
- `esms_receiver_batch_pushes`: pushes per write transaction.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from worker.merge import FINAL_STATES, State

OUTCOMES = (
    "accepted",  # written: the row moved forward, or already knew as much
    "unknown",  # no row has this SMSID
    "bad_token",
    "not_found",  # any other path or method
    "malformed",
    "db_unavailable",
)
# A push never makes a row `expired` (the poller's own verdict).
RESOLVED_STATES = tuple(sorted(FINAL_STATES - {State.EXPIRED}))
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200)


class ReceiverMetrics:
    """The receiver's metrics, registered in their own registry (so that each app a test builds
    starts from zero); in multiprocess mode their values live in PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self.pushes = Counter(
            "esms_receiver_pushes",
            "Push requests answered, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.rows_changed = Counter(
            "esms_receiver_rows_changed",
            "Rows the pushes moved forward (a duplicate or older push moves none)",
            registry=self.registry,
        )
        self.resolved = Counter(
            "esms_receiver_resolved",
            "Rows a push made final, by the state it gave them",
            ["state"],
            registry=self.registry,
        )
        self.retries = Counter(
            "esms_receiver_write_retries",
            "Write transactions run again after a deadlock or a serialization failure",
            registry=self.registry,
        )
        self.write_seconds = Histogram(
            "esms_receiver_write_duration_seconds",
            "One write transaction of a batch of pushes, retries included",
            buckets=WRITE_BUCKETS,
            registry=self.registry,
        )
        self.batch_pushes = Histogram(
            "esms_receiver_batch_pushes",
            "Pushes written in one transaction",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        # Every series exists from the start, at 0, so that rate() sees the first one.
        for outcome in OUTCOMES:
            self.pushes.labels(outcome)
        for state in RESOLVED_STATES:
            self.resolved.labels(state)

    def count(self, outcome: str) -> None:
        self.pushes.labels(outcome).inc()

    def add_resolved(self, resolved: dict[str, int]) -> None:
        for state, count in resolved.items():
            self.resolved.labels(state).inc(count)

    def snapshot(self) -> dict[str, int]:
        """The counters as `/stats` shows them: summed over every worker in multiprocess mode."""
        registry = (
            multiprocess_registry(self.multiprocess_dir) if self.multiprocess_dir else self.registry
        )
        values: dict[str, float] = {}
        for family in registry.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = {
                    "esms_receiver_pushes_total": sample.labels.get("outcome"),
                    "esms_receiver_rows_changed_total": "changed",
                    "esms_receiver_resolved_total": f"resolved_{sample.labels.get('state')}",
                    "esms_receiver_write_retries_total": "retried",
                }.get(sample.name)
                if key is not None:
                    values[key] = values.get(key, 0) + sample.value
        names = (
            *OUTCOMES[:1],
            "changed",
            *OUTCOMES[1:],
            "retried",
            *(f"resolved_{state}" for state in RESOLVED_STATES),
        )
        return {name: int(values.get(name, 0)) for name in names}


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """A registry that reads, summed, what every worker wrote to `directory`."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return registry


def fresh_directory(given: str | None) -> tuple[str, bool]:
    """The directory the workers' values go to, emptied (prometheus_client's rule: files of an
    earlier run would be summed with this one's), and whether it was made here (a temporary one,
    when PROMETHEUS_MULTIPROC_DIR is unset) and should be removed at the end."""
    if given is None:
        return tempfile.mkdtemp(prefix="esms-receiver-metrics-"), True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob("*.db"):
        leftover.unlink()
    return str(path), False


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def serve(host: str, port: int, directory: str) -> int:
    """`/metrics` of every worker, summed, on host:port from a thread of this process; returns
    the port (the one chosen when `port` is 0)."""
    server, _ = start_http_server(port, addr=host, registry=multiprocess_registry(directory))
    return server.server_address[1]
