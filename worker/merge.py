"""The merge rules: how provider data moves a message's row forward, and never backward.

Polls (GetCallback) and pushes (the CallbackUrl) both land here. The rules:
- State: SendStatus 4 is final, `rejected`. SendStatus 5 ("sent", done) is final once the report
  says how it ended: `sent` when SendSuccess >= 1, `failed` when SendFailed >= 1 or SendSuccess
  is 0. A SendStatus 5 that carries neither count says the send is done but not how: the row
  keeps it and stays `pending` (polled again) until a report with the outcome comes, rather than
  guess `failed` for ever. Any other value (0, 1, 2, 7, unknown) keeps the message `pending`.
- Forward only: every report has a rank; a report replaces a pending row's data only when its rank
  is at least the rank of what the row holds, and a provider's final state never changes again.
  `expired` is our verdict, not the provider's: a final report that comes later replaces it.
- Known values stay: a field the report lacks (absent or null) leaves the row's value as it is.
- Duplicates: of several reports for one SMSID in one response, the most advanced one wins (one
  with an outcome over one without, then the last of equals, as the provider lists them).
`store.merge_callbacks` runs these rules in one SQL statement; the SQL rank expression is generated
from `STATUS_RANK` below so the rules have exactly one definition.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from worker.records import CallbackRecord


class State(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


FINAL_STATES = frozenset({State.SENT, State.FAILED, State.REJECTED, State.EXPIRED})

SEND_STATUS_SENT = 5
SEND_STATUS_REJECTED = 4

# How far along each documented SendStatus is: 0 draft, 1 awaiting approval, 2 waiting to send,
# 7 handed to the carrier awaiting its report, 4 rejected and 5 sent are the ends. An undocumented
# value ranks between "waiting" and "at the carrier": it beats no-data and the early steps, so it
# is stored, but it cannot undo a later known step.
STATUS_RANK: dict[int, int] = {0: 1, 1: 2, 2: 3, 7: 5, SEND_STATUS_REJECTED: 9, SEND_STATUS_SENT: 9}
UNKNOWN_STATUS_RANK = 4
NO_STATUS_RANK = 0


def status_rank(send_status: int | None) -> int:
    if send_status is None:
        return NO_STATUS_RANK
    return STATUS_RANK.get(send_status, UNKNOWN_STATUS_RANK)


def derive_state(record: CallbackRecord) -> State:
    if record.send_status == SEND_STATUS_SENT:
        success, failed = record.send_success, record.send_failed
        if success is not None and success >= 1:
            return State.SENT
        if (failed is not None and failed >= 1) or success == 0:
            return State.FAILED
        return State.PENDING  # done, but the report does not say how: wait for one that does
    if record.send_status == SEND_STATUS_REJECTED:
        return State.REJECTED
    return State.PENDING


def record_rank(record: CallbackRecord) -> int:
    return status_rank(record.send_status)


def most_advanced(records: Iterable[CallbackRecord]) -> list[CallbackRecord]:
    """One record per SMSID: the highest rank, and the later of equal ranks; first-seen order."""
    chosen: dict[str, CallbackRecord] = {}
    for record in records:
        current = chosen.get(record.ref_id)
        # Ranked only against a twin: most answers hold one item per SMSID.
        if current is None or _advance(record) >= _advance(current):
            chosen[record.ref_id] = record
    return list(chosen.values())


def _advance(record: CallbackRecord) -> tuple[int, bool]:
    """How far along a report is: its rank, then whether it says how the message ended."""
    return record_rank(record), derive_state(record) is not State.PENDING


def sql_status_rank(column: str) -> str:
    """The SQL spelling of `status_rank` over `column`, generated from the same table."""
    whens = " ".join(f"WHEN {status} THEN {rank}" for status, rank in sorted(STATUS_RANK.items()))
    return (
        f"(CASE WHEN {column} IS NULL THEN {NO_STATUS_RANK} "
        f"ELSE CASE {column} {whens} ELSE {UNKNOWN_STATUS_RANK} END END)"
    )
