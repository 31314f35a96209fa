"""The RefIds the emulator knows, each with its life decided once at registration.

Registration is idempotent: a RefId keeps its first registration (time, OA, account), so re-sending
the same batch or polling a RefId again never moves its timeline. Knob changes apply only to RefIds
registered afterwards.

A registration only records (OA, account, time, knobs); the life itself is computed on first use,
because the benchmark registers 100,000 RefIds in a few calls and most are read much later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from worker.emulator.truth import Message, TruthKnobs, decide


@dataclass(frozen=True, slots=True)
class _Registration:
    oa_id: str
    api_key: str | None
    at: float
    knobs: TruthKnobs


class Registry:
    """RefId → Message, in registration order."""

    def __init__(self) -> None:
        self._messages: dict[str, Message | _Registration] = {}
        # Told each new RefId as it is registered (the pusher schedules its status changes).
        self.on_new: Callable[[str], None] | None = None

    def register(
        self, ref_id: str, oa_id: str, api_key: str | None, at: float, knobs: TruthKnobs
    ) -> bool:
        """Record `ref_id` as registered at `at` unless already known; True when it was new."""
        if ref_id in self._messages:
            return False
        self._messages[ref_id] = _Registration(oa_id, api_key, at, knobs)
        if self.on_new is not None:
            self.on_new(ref_id)
        return True

    def get(self, ref_id: str) -> Message | None:
        entry = self._messages.get(ref_id)
        if isinstance(entry, _Registration):
            entry = self._messages[ref_id] = decide(
                ref_id, entry.oa_id, entry.api_key, entry.at, entry.knobs
            )
        return entry

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[Message]:
        for ref_id in list(self._messages):
            message = self.get(ref_id)
            if message is not None:
                yield message

    def clear(self) -> None:
        self._messages.clear()
