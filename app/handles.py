"""In-memory handles of active runs, and the supervisor's statistics record.

A :class:`RunHandle` exists from the moment a run is admitted until its task has ended; the
store holds everything durable. Handles live only in the Trio thread (the run thread sees
just ``handle.control``), so the supervisor changes them without locks.
"""

from __future__ import annotations

import enum
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
