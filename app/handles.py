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


@dataclass(eq=False, slots=True)
class RunHandle:
    """The Trio-side state of one active run.

    ``previous`` is the run of the same conversation admitted just before this one, if it
    was still active: this run waits for ``previous.done`` so that two runs of one
    conversation never overlap.

    ``holds_slot`` is true from the moment the run was given a run slot (at admission when
    one is free, else when it reaches the head of the line and a slot frees up) until its
    thread has returned; ``seated`` is set at that same moment.

    Three cancel scopes, because the run's thread is hosted apart from the run task (see
    ``app/run_task.py``): ``cancel_scope`` covers the run task's waiting, ``thread_scope``
    the thread itself (what ``check_cancelled`` and calls into Trio see), and
    ``abandon_scope`` the run task's shielded wait for a thread that was told to stop —
    cancelled only when the supervisor gives up on a thread that ignores cancellation.

    Size: one exists per queued or running run (10,000 and more), so it has ``__slots__``
    (no per-instance ``__dict__``): 1,311 bytes a handle with its scopes and events,
    measured with tracemalloc, against 1,360 with a ``__dict__``. The stop bell in its
    control and ``thread_hosted`` added 72 (10,000 bare handles: 1,201 → 1,273 bytes each).
    """

    run_id: str
    conversation_id: str
    previous: RunHandle | None
    control: RunControl = field(default_factory=RunControl)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    thread_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    abandon_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    seated: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    holds_slot: bool = False
    #: Set when the run's thread is handed to its host (``app/run_task.py``): from then on
    #: a stop goes to the thread, not to the run task.
    thread_hosted: bool = False
    #: The conversation's workspace (``app.workspaces.workspace_key``: its path under
    #: workspaces_path), once the run is recorded.
    workspace: str | None = None

    def stop(self, reason: str) -> None:
        """Cancel the run (waiting or running); the first reason given is the one recorded.

        A run whose thread is hosted already is stopped through its thread alone: the
        thread scope is cancelled and the run's stop bell rung (a sleeping thread wakes at
        once: ``app/stop_bell.py``); its task keeps waiting for the thread, undisturbed,
        and records the stop when the thread returns. A run without a thread yet has its
        task cancelled instead, wherever it waits. Only the first call does anything (a
        drain of 10,000 runs cancels 10,000 scopes, not four times as many).
        """
        if self.cancel(reason):
            self.control.bell.ring()  # after the cancel: the thread wakes up to see it

    def cancel(self, reason: str) -> bool:
        """:meth:`stop` without ringing the bell: a sleeping thread sleeps on until it is
        rung. Returns whether this was the first stop."""
        control = self.control
        if control.stop_reason is not None:
            return False
        control.stop_reason = reason
        if not self.thread_hosted:
            self.cancel_scope.cancel()
        self.thread_scope.cancel()  # registers the cancel for check_cancelled()
        return True

    def abandon(self) -> None:
        """Stop waiting for the run's thread: its end is recorded without it (last resort)."""
        self.abandon_scope.cancel()
        self.cancel_scope.cancel()  # its task may be waiting for the thread undisturbed


class ActiveRuns:
    """The handles of every queued or running run: by id in admission order, and by
    conversation oldest first."""

    def __init__(self) -> None:
        self._by_id: dict[str, RunHandle] = {}
        self._by_conversation: dict[str, list[RunHandle]] = {}
        #: Runs without a slot whose task is only recording their end (stops are written
        #: in batches): still registered, but neither running nor queued.
        self._ending: set[str] = set()

    @property
    def ending(self) -> int:
        """How many registered runs hold no slot and only wait for their end's record."""
        return len(self._ending)

    def mark_ending(self, handle: RunHandle) -> None:
        """The run's task records its end now; it no longer waits for anything else."""
        if handle.run_id in self._by_id and not handle.holds_slot:
            self._ending.add(handle.run_id)

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
        """Forget the handle (no-op if it is not registered)."""
        if self._by_id.pop(handle.run_id, None) is None:
            return
        self._ending.discard(handle.run_id)
        runs = self._by_conversation[handle.conversation_id]
        runs.remove(handle)
        if not runs:
            del self._by_conversation[handle.conversation_id]


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
