"""The run supervisor: admits runs, queues them fairly, runs them in threads, stops them.

Think of the run slots as a sofa with ``max_concurrent_runs`` seats (a
:class:`trio.CapacityLimiter`): a run sits down before its thread starts and stands up only
after its thread has returned. Runs that find the sofa full wait in a FIFO line whose order
is the order they will sit down — that order is their ``queue_position``.

Ownership::

    RunSupervisor.serve()            one nursery for every run task; lives as long as the
    └── run_admitted(handle)         app (or the ``open_run_supervisor`` block); run_task.py
        └── to_thread: run_conversation(ctx)      the run thread, one per running run
            └── to_thread (tool limiter): tool calls

Three limiters, never shared: ``run_limiter`` (run slots), ``io_limiter`` (short store calls
made for HTTP handlers, via :meth:`io`) and ``tool_limiter`` (tool calls inside runs).
Nothing here runs on Trio's default thread limiter.

Cancellation:
    Every run task has its own cancel scope (``handle.cancel_scope``). Interrupt, delete and
    drain cancel it; a queued run then leaves the line without starting a thread, a running
    one stops at its next cancellation point (see ``app/conversation.py``). The run slot is
    released only after the thread has returned. :meth:`drain` returns once every thread has
    returned and every final status is stored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from app.agents.registry import AgentRegistry, default_registry
from app.errors import (
    ConversationBusy,
    IllegalTransition,
    NotFound,
    RunQueueFull,
    ShuttingDown,
)
from app.handles import ActiveRuns, IfBusy, RunHandle, SupervisorStatistics
from app.lifecycle import Trigger
from app.records import ConversationRecord, RunRecord
from app.run_task import RunShared, record_end, run_admitted, unregister
from app.settings import Settings
from app.slot_line import SlotLine
from app.store.base import EventStore
from app.tools.calls import ToolRegistry, default_tools

T = TypeVar("T")
log = logging.getLogger("trellis.supervisor")

#: How long ``interrupt`` waits for the stopped runs before answering. Built-in steps stop
#: within milliseconds; a custom step that blocks without a cancellation point is reported
#: as still running rather than holding the HTTP request hostage.
INTERRUPT_JOIN_SECONDS = 1.0


class RunSupervisor:
    """Owns every run. Create it with :func:`open_run_supervisor` (or ``await nursery.start(
    supervisor.serve)``); all methods are called from the Trio thread."""

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        registry: AgentRegistry | None = None,
        tools: ToolRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry or default_registry(settings.llm)
        self.tools = tools or default_tools()
        self.run_limiter = trio.CapacityLimiter(settings.max_concurrent_runs)
        self.io_limiter = trio.CapacityLimiter(settings.io_threads)
        self.tool_limiter = trio.CapacityLimiter(settings.tool_threads)
        self.max_queued_runs = settings.max_queued_runs
        self._runs = ActiveRuns()
        self._waiting_for_slot = SlotLine(self.run_limiter)  # FIFO: the sofa's waiting line
        self._shared = RunShared(
            settings=settings,
            registry=self.registry,
            tools=self.tools,
            tool_limiter=self.tool_limiter,
            store=store,
            io_limiter=self.io_limiter,
            run_limiter=self.run_limiter,
            run_threads=trio.CapacityLimiter(math.inf),
            line=self._waiting_for_slot,
            runs=self._runs,
        )
        self._deleting: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._closing = trio.Event()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<RunSupervisor runs {s.running}/{s.max_concurrent_runs} running, {s.queued} queued"
            f" | io {s.io_borrowed}/{s.io_total} | tools {s.tool_borrowed}/{s.tool_total}"
            f"{' | draining' if s.draining else ''}>"
        )

    # -- lifetime ------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[RunSupervisor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Recover from a crash, then own the run nursery until :meth:`aclose`.

        For ``nursery.start``: reports started once runs can be admitted.
        """
        touched = await self.io(self.store.recover_interrupted, reason="crash_recovery")
        if touched:
            log.warning("crash recovery: %d conversation(s) paused", len(touched))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.settings.resume_on_start:
                    for conversation_id in touched:
                        await self.start_run(
                            conversation_id, if_busy=IfBusy.ENQUEUE, reason="resume_on_start"
                        )
                task_status.started(self)
                await self._closing.wait()
        finally:
            self._nursery = None  # admits nothing more, however serve() ended

    async def aclose(self, reason: str = "shutdown") -> None:
        """Drain, then let :meth:`serve` return. Idempotent."""
        await self.drain(reason)
        self._closing.set()

    async def drain(self, reason: str = "shutdown") -> None:
        """Refuse new runs, stop every queued and running run, wait for all of them.

        Returns when every run thread has returned and every final status (``paused`` with
        ``reason``) is committed.
        """
        self._draining = True
        handles = list(self._runs)
        for handle in handles:  # synchronous: no queued run can take a freed slot meanwhile
            handle.stop(reason)
        for handle in handles:
            await handle.done.wait()

    async def record_unfinished(self, reason: str) -> int:
        """Last resort after a drain that timed out: record every run whose thread is still
        alive as stopped (``paused``, ``reason``). Returns how many there were.

        The threads themselves cannot be stopped; the caller is about to exit the process.
        """
        unfinished = [handle for handle in self._runs if not handle.done.is_set()]
        for handle in unfinished:
            await record_end(handle, Trigger.STOP, reason, self._shared)
        return len(unfinished)

    @property
    def draining(self) -> bool:
        return self._draining

    # -- I/O door for handlers -------------------------------------------------------------

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short blocking call (a store call) in a thread on the I/O limiter."""
        return await self._shared.io(fn, *args, **kwargs)

    # -- admission -----------------------------------------------------------------------

    async def start_run(
        self, conversation_id: str, *, if_busy: IfBusy = IfBusy.REJECT, reason: str = "user"
    ) -> RunRecord:
        """Admit a run of the conversation and return its record (status ``queued``).

        Errors: as :meth:`admit_run`.
        """
        run, _ = await self.admit_run(conversation_id, if_busy=if_busy, reason=reason)
        return run

    async def admit_run(
        self, conversation_id: str, *, if_busy: IfBusy = IfBusy.REJECT, reason: str = "user"
    ) -> tuple[RunRecord, ConversationRecord]:
        """:meth:`start_run`, also returning the conversation as the admission left it.

        Errors:
            :class:`~app.errors.NotFound`; :class:`~app.errors.ConversationBusy` (``reject``
            while a run is active); :class:`~app.errors.RunQueueFull`;
            :class:`~app.errors.ShuttingDown`.
        """
        # From here to the store write, no checkpoint: the checks and the registration of
        # the handle happen atomically with respect to other requests.
        self.check_admission(conversation_id, if_busy=if_busy)
        runs = self._runs.of_conversation(conversation_id)
        if if_busy is IfBusy.INTERRUPT:
            for earlier in runs:
                earlier.stop("interrupt")
        handle = RunHandle(str(uuid.uuid4()), conversation_id, previous=runs[-1] if runs else None)
        self._runs.add(handle)
        if handle.previous is None:
            self._waiting_for_slot.join(handle.run_id)
        # Shielded: once the run is recorded, its task must start, or the record would be
        # left queued with nobody to run it.
        with trio.CancelScope(shield=True):
            try:
                record, conversation = await self.io(
                    self.store.create_run,
                    conversation_id,
                    run_id=handle.run_id,
                    activate=handle.previous is None,
                    reason=reason,
                )
            except BaseException:
                unregister(handle, self._shared)
                raise
        assert self._nursery is not None
        self._nursery.start_soon(run_admitted, handle, conversation, self._shared)
        return self.with_position(record), conversation

    def check_admission(
        self, conversation_id: str | None = None, *, if_busy: IfBusy = IfBusy.ENQUEUE
    ) -> None:
        """Raise the error :meth:`start_run` would raise now, without starting anything.

        Errors:
            :class:`~app.errors.ShuttingDown`, :class:`~app.errors.NotFound` (being
            deleted), :class:`~app.errors.ConversationBusy` (``if_busy=reject`` and a run is
            active), :class:`~app.errors.RunQueueFull`.
        """
        if self._draining or self._nursery is None:
            raise ShuttingDown("the server is shutting down and admits no new runs")
        if conversation_id in self._deleting:
            raise NotFound(f"no conversation with id {conversation_id} (being deleted)")
        runs = self._runs.of_conversation(conversation_id)
        if runs and if_busy is IfBusy.REJECT:
            raise ConversationBusy(
                "the conversation already has an active run; pass if_busy=enqueue to run "
                "after it or if_busy=interrupt to replace it",
                detail={"run_id": runs[-1].run_id},
            )
        queued = len(self._runs) - self._runs.holding_slots
        if queued >= self.max_queued_runs:
            raise RunQueueFull(
                f"{queued} runs are already queued (max_queued_runs = {self.max_queued_runs});"
                " retry later or raise the limit with PATCH /api/server/limits",
                retry_after_seconds=self.settings.queue_full_retry_after_seconds,
                detail={"queued": queued, "max_queued_runs": self.max_queued_runs},
            )

    # -- control -------------------------------------------------------------------------

    async def pause(self, conversation_id: str) -> RunRecord:
        """Stop the conversation's run at its next step boundary (``pausing`` until then).

        A run that has no slot yet stops at once, as do runs enqueued behind it.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        current, *later = self._runs_of(conversation_id, action="pause")
        for handle in later:
            handle.stop("pause")
        current.control.pause_requested = True
        if not current.holds_slot:
            current.stop("pause")
        else:
            # IllegalTransition: its thread has not recorded "running" yet (it will see the
            # flag at its first boundary), or the run has just ended.
            with contextlib.suppress(IllegalTransition):
                await self.io(
                    self.store.transition_run, current.run_id, Trigger.REQUEST_PAUSE, reason="pause"
                )
        return await self.get_run(conversation_id, current.run_id)

    async def interrupt(self, conversation_id: str) -> RunRecord:
        """Stop every active run of the conversation now, even mid-step; wait briefly.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        handles = self._runs_of(conversation_id, action="interrupt")
        for handle in handles:
            handle.stop("interrupt")
        with trio.move_on_after(INTERRUPT_JOIN_SECONDS):
            for handle in handles:
                await handle.done.wait()
        return await self.get_run(conversation_id, handles[0].run_id)

    async def delete_conversation(
        self, conversation_id: str, *, delete_workspace: bool = False
    ) -> None:
        """Stop the conversation's runs (reason ``deleted``), wait for them, delete it all —
        with ``delete_workspace``, its workspace directory too."""
        conversation = await self.io(self.store.get_conversation, conversation_id)
        self._deleting.add(conversation_id)
        try:
            handles = self._runs.of_conversation(conversation_id)
            for handle in handles:
                handle.stop("deleted")
            for handle in handles:
                await handle.done.wait()
            await self.io(self.store.delete_conversation, conversation_id)
            if delete_workspace:
                workspace = self.settings.workspaces_path / conversation.workspace
                await self.io(shutil.rmtree, workspace, ignore_errors=True)
        finally:
            self._deleting.discard(conversation_id)

    async def wait_run(
        self, conversation_id: str, run_id: str, timeout_seconds: float
    ) -> RunRecord | None:
        """The run's record once it has ended, or ``None`` if ``timeout_seconds`` passed."""
        handle = self._runs.get(run_id)
        if handle is not None and handle.conversation_id == conversation_id:
            with trio.move_on_after(timeout_seconds):
                await handle.done.wait()
            if not handle.done.is_set():
                return None
        record = await self.get_run(conversation_id, run_id)
        return record if record.status.value in ("paused", "finished", "error") else None

    def _runs_of(self, conversation_id: str, *, action: str) -> list[RunHandle]:
        runs = self._runs.of_conversation(conversation_id)
        if not runs:
            raise IllegalTransition(
                f"cannot {action}: the conversation has no queued or running run",
                detail={"conversation_id": conversation_id},
            )
        return list(runs)

    # -- queries -------------------------------------------------------------------------

    async def get_run(self, conversation_id: str, run_id: str) -> RunRecord:
        return self.with_position(await self.io(self.store.get_run, conversation_id, run_id))

    def queue_position(self, run_id: str) -> int | None:
        """1-based place in the line for a run slot (= the order runs will start)."""
        return self._waiting_for_slot.position(run_id)

    def with_position(self, record: RunRecord) -> RunRecord:
        """``record`` with its live ``queue_position`` filled in."""
        if record.id not in self._waiting_for_slot:
            return record
        return record.model_copy(update={"queue_position": self.queue_position(record.id)})

    def active_runs(self) -> list[tuple[str, bool, int | None]]:
        """``(run_id, holds_slot, queue_position)`` of every active run: those holding a slot
        first, then the slot line in start order, then runs waiting for their conversation."""
        holding = [(h.run_id, True, None) for h in self._runs if h.holds_slot]
        line = [(run_id, False, n) for n, run_id in enumerate(self._waiting_for_slot, start=1)]
        behind = [
            (h.run_id, False, None)
            for h in self._runs
            if not h.holds_slot and h.run_id not in self._waiting_for_slot
        ]
        result: list[tuple[str, bool, int | None]] = [*holding, *line, *behind]
        return result

    # -- limits and statistics -----------------------------------------------------------

    def set_limits(
        self, *, max_concurrent_runs: int | None = None, max_queued_runs: int | None = None
    ) -> None:
        """Change limits at runtime. Raising run slots starts waiting runs at once; lowering
        them preempts nobody; 0 pauses admission. Lowering ``max_queued_runs`` refuses new
        runs only."""
        if max_concurrent_runs is not None:
            self.run_limiter.total_tokens = max_concurrent_runs
        if max_queued_runs is not None:
            self.max_queued_runs = max_queued_runs

    def statistics(self) -> SupervisorStatistics:
        running = self._runs.holding_slots
        io, tool = self.io_limiter.statistics(), self.tool_limiter.statistics()
        return SupervisorStatistics(
            running=running,
            queued=len(self._runs) - running,
            waiting_for_slot=len(self._waiting_for_slot),
            run_threads_alive=self._shared.run_threads.borrowed_tokens,
            max_concurrent_runs=int(self.run_limiter.total_tokens),
            max_queued_runs=self.max_queued_runs,
            io_borrowed=io.borrowed_tokens,
            io_total=int(io.total_tokens),
            io_waiting=io.tasks_waiting,
            tool_borrowed=tool.borrowed_tokens,
            tool_total=int(tool.total_tokens),
            tool_waiting=tool.tasks_waiting,
            draining=self._draining,
        )


@asynccontextmanager
async def open_run_supervisor(
    settings: Settings,
    store: EventStore,
    *,
    registry: AgentRegistry | None = None,
    tools: ToolRegistry | None = None,
) -> AsyncIterator[RunSupervisor]:
    """Run a :class:`RunSupervisor` for the duration of the block, in any Trio program.

    On exit (normal, error or cancellation) every run is stopped with reason ``shutdown``
    and joined: no run thread outlives the block.
    """
    supervisor = RunSupervisor(settings, store, registry, tools)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        try:
            yield supervisor
        finally:
            with trio.CancelScope(shield=True):
                await supervisor.aclose()
