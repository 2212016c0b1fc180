"""In-memory handles of active runs, and the supervisor's statistics record.

A :class:`RunHandle` exists from the moment a run is admitted until its task has ended; the
store holds everything durable. Handles live only in the Trio thread (the run thread sees
just ``handle.control``), so the supervisor changes them without locks.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from app.conversation import RunControl


class IfBusy(enum.StrEnum):
    """What ``start_run`` does when the conversation already has an active run."""

    REJECT = "reject"  # 409 conversation_busy
    ENQUEUE = "enqueue"  # start after the active run(s) end
    INTERRUPT = "interrupt"  # interrupt them, wait for them to end, then start


@dataclass(eq=False)
class RunHandle:
    """The Trio-side state of one active run.

    ``previous`` is the run of the same conversation admitted just before this one, if it
    was still active: this run waits for ``previous.done`` so that two runs of one
    conversation never overlap. ``holds_slot`` is true from the moment the run task got a
    run slot until its thread has returned.
    """

    run_id: str
    conversation_id: str
    previous: RunHandle | None
    control: RunControl = field(default_factory=RunControl)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    holds_slot: bool = False

    def stop(self, reason: str) -> None:
        """Cancel the run; the first reason given is the one recorded."""
        if self.control.stop_reason is None:
            self.control.stop_reason = reason
        self.cancel_scope.cancel()


class ActiveRuns:
    """The handles of every queued or running run: by id in admission order, and by
    conversation oldest first. Keeps the count of runs holding a slot."""

    def __init__(self) -> None:
        self._by_id: dict[str, RunHandle] = {}
        self._by_conversation: dict[str, list[RunHandle]] = {}
        self.holding_slots = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[RunHandle]:
        return iter(list(self._by_id.values()))

    def get(self, run_id: str) -> RunHandle | None:
        return self._by_id.get(run_id)

    def of_conversation(self, conversation_id: str | None) -> list[RunHandle]:
        """The conversation's active runs, oldest (the current one) first."""
        return list(self._by_conversation.get(conversation_id or "", ()))

    def add(self, handle: RunHandle) -> None:
        self._by_id[handle.run_id] = handle
        self._by_conversation.setdefault(handle.conversation_id, []).append(handle)

    def remove(self, handle: RunHandle) -> None:
        del self._by_id[handle.run_id]
        runs = self._by_conversation[handle.conversation_id]
        runs.remove(handle)
        if not runs:
            del self._by_conversation[handle.conversation_id]

    def set_holds_slot(self, handle: RunHandle, holds_slot: bool) -> None:
        self.holding_slots += int(holds_slot) - int(handle.holds_slot)
        handle.holds_slot = holds_slot


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    """A snapshot of the supervisor's load (what ``GET /api/server`` shows)."""

    running: int  # runs holding a run slot
    queued: int  # runs waiting for a run slot, or for an earlier run of their conversation
    waiting_for_slot: int  # the part of ``queued`` that waits for a run slot (FIFO)
    run_threads_alive: int  # run threads that have not returned yet
    max_concurrent_runs: int
    max_queued_runs: int
    io_borrowed: int
    io_total: int
    io_waiting: int
    tool_borrowed: int
    tool_total: int
    tool_waiting: int
    draining: bool
