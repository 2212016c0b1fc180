"""Stopping runs, and waiting for them to end: pause, interrupt, delete, drain.

A stop is a request, never a kill: :meth:`RunHandle.stop` cancels the run's scopes, so a
queued run leaves the line without starting a thread and a running one stops at its next
cancellation point (see ``app/conversation.py``). The run's task then records the end and
sets ``handle.done`` (``app/run_task.py``); that is what everything here waits for. Runs are
stopped all at once, never one after the other (their threads asleep in ``ctx.sleep`` are
woken by a few chains at once, which is faster than all together: ``app/stop_bell.py``),
and the ends of runs stopped together are committed together (a few ``stop_runs``
transactions for a whole drain: see ``app/end_ledger.py``). Only how long the caller waits
differs:

* **Briefly** — ``interrupt``, and ``pause`` for the runs it stops at once, wait at most
  :data:`INTERRUPT_JOIN_SECONDS` and answer with the run's record as it is then.
* **Until recorded, bounded** — deleting a conversation and the supervisor's drain must not
  go on before the runs' ends are committed. They wait up to ``shutdown_grace_seconds``;
  a thread that ignores cancellation longer is *abandoned* (:meth:`RunHandle.abandon`): its
  task records the run ``paused`` without it and unregisters, while the thread itself
  (Python threads cannot be killed) runs on, holding its run slot, until it returns.
  Admission keeps the abandoned handles (``AdmissionDesk.abandoned``) so that the counts
  stay exact while those slots are held.

A run slot is released only when a thread returns, never by a stop.

Across nodes (a shared PostgreSQL store), a conversation's runs may be on any node, or
queued in the database with none: pause and interrupt go through :attr:`RunStops.cluster`
— the cluster's control part (``app/cluster/control.py``), which has every node that runs
one do exactly the local stop below (:meth:`RunStops.stop_here`; this node included) and
answers once they have. The answer is the current run's record as it is then, read from
the store: the same statuses as a stop on one node. Deleting a conversation goes the same
way first (action ``delete``: every node that runs one stops it with reason ``deleted`` and
waits until its end is recorded, bounded as here; unclaimed queued runs are recorded
``paused``/``deleted`` in the database), and only then are its rows deleted.

Ownership: the supervisor creates one :class:`RunStops` and calls it on the Trio thread; it
owns no task or thread. Every wait here is a checkpoint: cancelling a caller (a client
that disconnects) leaves the runs stopping and their tasks recording their ends.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal, Protocol

import trio

from app import workspaces
from app.admission import AdmissionDesk
from app.errors import IllegalTransition
from app.handles import RunHandle
from app.lifecycle import TERMINAL, Trigger
from app.live.hub import LiveHub
from app.records import RunRecord
from app.run_board import RunBoard
from app.run_task import RunShared

log = logging.getLogger("trellis.supervisor")

#: How long ``interrupt`` waits for the stopped runs before answering. Built-in steps stop
#: within milliseconds; a custom step that blocks without a cancellation point is reported
#: as still running rather than holding the HTTP request hostage.
INTERRUPT_JOIN_SECONDS = 1.0

#: What a caller may ask of a conversation's runs, here or on another node.
StopAction = Literal["pause", "interrupt", "delete"]

#: The reason each action records on the runs it stops.
STOP_REASONS: dict[StopAction, str] = {
    "pause": "pause",
    "interrupt": "interrupt",
    "delete": "deleted",
}


class ClusterStops(Protocol):
    """Pause, interrupt and delete on a shared database, where a conversation's runs may
    be on any node (``app/cluster/control.py``)."""

    async def stop_everywhere(self, conversation_id: str, action: StopAction) -> str | None:
        """Have ``action`` done to the conversation's active runs wherever they are (those
        here through :meth:`RunStops.stop_here`); the id of its current active run (the
        one to answer with), ``None`` if none is active anywhere."""
        ...


class RunStops:
    """Pause, interrupt and delete a conversation's runs; stop every run for a drain."""

    def __init__(
        self, shared: RunShared, desk: AdmissionDesk, board: RunBoard, live: LiveHub
    ) -> None:
        self._shared = shared
        self._desk = desk
        self._board = board
        self._live = live
        #: Set by the cluster's control part while it serves; ``None``: a single node.
        self.cluster: ClusterStops | None = None

    async def pause(self, conversation_id: str) -> RunRecord:
        """:meth:`pause_here`; in a cluster, on every node that has an active run of the
        conversation (:attr:`cluster`), answered with the current run's record.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        return await self._everywhere(conversation_id, "pause")

    async def interrupt(self, conversation_id: str) -> RunRecord:
        """:meth:`interrupt_here`; in a cluster, on every node that has an active run of
        the conversation (:attr:`cluster`), answered with the current run's record.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        return await self._everywhere(conversation_id, "interrupt")

    def runs_here(self, conversation_id: str) -> bool:
        """Whether the conversation has an active run on this node; never blocks."""
        return bool(self._shared.runs.of_conversation(conversation_id))

    def conversation_here(self, run_id: str) -> str | None:
        """The conversation of ``run_id`` if the run is active on this node; never blocks."""
        handle = self._shared.runs.get(run_id)
        return None if handle is None else handle.conversation_id

    async def stop_here(self, conversation_id: str, action: StopAction) -> RunRecord | None:
        """:meth:`pause_here`, :meth:`interrupt_here` or :meth:`delete_here` (``None``)."""
        if action == "pause":
            return await self.pause_here(conversation_id)
        if action == "interrupt":
            return await self.interrupt_here(conversation_id)
        await self.delete_here(conversation_id)
        return None

    async def delete_here(self, conversation_id: str) -> None:
        """Stop this node's runs of the conversation (reason ``deleted``) and wait until
        their ends are recorded (bounded by ``shutdown_grace_seconds``: see the module
        docstring). Nothing active here: returns at once."""
        handles = self._shared.runs.of_conversation(conversation_id)
        grace = self._shared.settings.shutdown_grace_seconds
        await self._stop_and_join(handles, STOP_REASONS["delete"], grace)

    async def _everywhere(self, conversation_id: str, action: StopAction) -> RunRecord:
        if self.cluster is None:
            record = await self.stop_here(conversation_id, action)
            assert record is not None, "pause and interrupt answer with the run's record"
            return record
        run_id = await self.cluster.stop_everywhere(conversation_id, action)
        if run_id is None:
            raise _nothing_active(conversation_id, action)
        return await self._board.get_run(conversation_id, run_id)

    async def pause_here(self, conversation_id: str) -> RunRecord:
        """Flag the current run, whose thread stops at its next step boundary (recorded
        ``pausing`` now if it is already running); stop the runs without a thread — the
        current one if it has no slot yet, those enqueued behind it — at once, and wait
        briefly for them.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        shared = self._shared
        current, *later = self._runs_of(conversation_id, action="pause")
        current.control.pause_requested = True
        shared.metrics.stop_requested([current, *later], "pause")
        stopped = later if current.holds_slot else [current, *later]
        if stopped:  # they have no thread: their tasks record them paused right away
            await _stop_briefly(stopped, "pause")
        if current.holds_slot:
            # IllegalTransition: its thread has not recorded "running" yet (it will see the
            # flag at its first boundary), or the run has just ended.
            with contextlib.suppress(IllegalTransition):
                await shared.io(
                    shared.store.transition_run,
                    current.run_id,
                    Trigger.REQUEST_PAUSE,
                    reason="pause",
                )
        return await self._board.get_run(conversation_id, current.run_id)

    async def interrupt_here(self, conversation_id: str) -> RunRecord:
        """Stop every run of the conversation at once, wait briefly, and return the record
        of the current one.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        handles = self._runs_of(conversation_id, action="interrupt")
        self._shared.metrics.stop_requested(handles, "interrupt")
        await _stop_briefly(handles, "interrupt")
        return await self._board.get_run(conversation_id, handles[0].run_id)

    async def delete_conversation(self, conversation_id: str, *, delete_workspace: bool) -> None:
        """Stop the conversation's runs (reason ``deleted``), wait until their ends are
        recorded (bounded: see the module docstring) — in a cluster on every node, through
        :attr:`cluster` — then delete it from the store, end its streams and, with
        ``delete_workspace``, delete its workspace directory (see :mod:`app.workspaces`).
        Admission here refuses the conversation meanwhile.

        Errors:
            :class:`~app.errors.NotFound`; :class:`~app.workspaces.WorkspaceInUse` (409,
            nothing deleted).
        """
        shared, runs = self._shared, self._shared.runs
        conversation = await shared.io(shared.store.get_conversation, conversation_id)
        if delete_workspace:
            workspaces.check_workspace_free(conversation, runs)
        self._desk.deleting.add(conversation_id)
        try:
            if self.cluster is None:
                await self.delete_here(conversation_id)
            else:
                await self.cluster.stop_everywhere(conversation_id, "delete")
            await shared.io(shared.store.delete_conversation, conversation_id)
            await self._live.conversation_deleted(conversation_id)
            if delete_workspace:
                root = shared.settings.workspaces_path
                await workspaces.delete_workspace(conversation, runs, root, shared.store, shared.io)
        finally:
            self._desk.deleting.discard(conversation_id)

    async def stop_all(self, reason: str, grace_seconds: float) -> int:
        """Stop every active run with ``reason`` and wait until their ends are recorded,
        abandoning threads that outlast ``grace_seconds`` (logged as an error: the drain
        gave up on them). Returns how many were abandoned.
        """
        handles, writes = list(self._shared.runs), self._shared.ends.stop_writes
        stuck = await self._stop_and_join(handles, reason, grace_seconds)
        if handles:
            log.info(
                "stopped %d run(s); their ends took %d transaction(s)",
                len(handles),
                self._shared.ends.stop_writes - writes,
            )
        if stuck:
            log.error(
                "%d run thread(s) did not stop within shutdown_grace_seconds (%s s);"
                " recorded their runs as paused and gave up waiting for them",
                stuck,
                grace_seconds,
            )
        return stuck

    async def wait_run(
        self, conversation_id: str, run_id: str, timeout_seconds: float
    ) -> RunRecord | None:
        """The run's record once it has ended, or ``None`` if ``timeout_seconds`` passed."""
        handle = self._shared.runs.get(run_id)
        if handle is not None and handle.conversation_id == conversation_id:
            with trio.move_on_after(timeout_seconds):
                await handle.done.wait()
            if not handle.done.is_set():
                return None
        record = await self._board.get_run(conversation_id, run_id)
        return record if record.status in TERMINAL else None

    def _runs_of(self, conversation_id: str, *, action: str) -> list[RunHandle]:
        runs = self._shared.runs.of_conversation(conversation_id)
        if not runs:
            raise _nothing_active(conversation_id, action)
        return runs

    async def _stop_and_join(
        self, handles: list[RunHandle], reason: str, timeout_seconds: float
    ) -> int:
        """Stop the runs, wait for them to end; abandon those whose threads outlast the
        timeout. Returns how many were abandoned.

        The sleeping threads are woken a few chains at a time (``app/stop_bell.py``), and
        the ends that arrive meanwhile are held back, then written together (see
        :meth:`EndLedger.hold <app.end_ledger.EndLedger.hold>`): a drain of thousands
        takes a few ``stop_runs`` transactions (2 to 4 for 3,000 runs, measured).

        A run whose thread has returned (it holds no slot) is never abandoned: if it is
        not done yet, its end is on its way to the store in the current batch."""
        shared = self._shared
        deadline = trio.current_time() + timeout_seconds
        shared.ends.hold()
        try:
            for handle in handles:  # synchronous: no queued run takes a freed slot meanwhile
                handle.cancel(reason)
            shared.bells.ring_all(handle.control.bell for handle in handles)
            with trio.move_on_at(deadline):
                await shared.bells.wait_all_rung()
        finally:
            shared.ends.release()
        with trio.move_on_at(deadline):
            await _all_done(handles)
        late = [handle for handle in handles if not handle.done.is_set()]
        stuck = [handle for handle in late if handle.holds_slot]  # their threads still run
        for handle in stuck:
            self._desk.abandoned.append(handle)
            handle.abandon()
        await _all_done(late)  # their tasks record the ends, then unregister
        return len(stuck)


def _nothing_active(conversation_id: str, action: str) -> IllegalTransition:
    return IllegalTransition(
        f"cannot {action}: the conversation has no queued or running run",
        detail={"conversation_id": conversation_id},
    )


async def _stop_briefly(handles: list[RunHandle], reason: str) -> None:
    """Stop the runs; wait at most :data:`INTERRUPT_JOIN_SECONDS` for them to end."""
    for handle in handles:
        handle.stop(reason)
    with trio.move_on_after(INTERRUPT_JOIN_SECONDS):
        await _all_done(handles)


async def _all_done(handles: list[RunHandle]) -> None:
    """Wait until every handle is done. Their tasks end together (their stops are recorded
    in batches): a wait only where one is still running, not a checkpoint per run."""
    for handle in handles:
        if not handle.done.is_set():
            await handle.done.wait()
