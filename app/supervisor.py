"""The run supervisor: admits runs, queues them fairly, runs them in threads, stops them.

Think of the run slots as a sofa with ``max_concurrent_runs`` seats (a
:class:`trio.CapacityLimiter`): a run sits down when it is admitted, or later when it
reaches the head of the line and a seat frees up, and stands up only after its thread has
returned. The line's order is the order runs sit down — that order is their
``queue_position`` (see ``app/slot_line.py``, and ``app/admission.py`` for why admission is
decided synchronously).

Ownership::

    RunSupervisor.serve()            one nursery for every run task; lives as long as the
    ├── EndLedger retry task         app (or the ``open_run_supervisor`` block)
    ├── WebhookDispatcher.serve      live/webhooks.py: POSTs run ends; closed by drain()
    └── run_admitted(handle)         run_task.py: waits, runs, always records the end
        └── (system task) hosts to_thread: run_conversation(ctx)   one run thread
            └── to_thread (tool limiter): tool calls

Three limiters, never shared: ``run_limiter`` (run slots), ``io_limiter`` (short store calls
made for HTTP handlers, via :meth:`io`) and ``tool_limiter`` (tool calls inside runs).
Nothing here runs on Trio's default thread limiter.

Cancellation:
    Interrupt, delete and drain call ``handle.stop()``: a queued run then leaves the line
    without starting a thread, a running one stops at its next cancellation point (see
    ``app/conversation.py``). The run slot is released only after the thread has returned.
    Shutdown is bounded: :meth:`drain` gives threads ``shutdown_grace_seconds``; a thread
    that ignores cancellation longer is *abandoned* — its run is recorded ``paused`` and the
    supervisor closes on time, though the thread itself (Python threads cannot be killed)
    runs on until it returns.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from app import workspaces
from app.admission import Admission, AdmissionDesk
from app.agents.registry import AgentRegistry, default_registry
from app.end_ledger import EndLedger
from app.errors import (
    IllegalTransition,
    RunQueueFull,
)
from app.handles import ActiveRuns, IfBusy, RunHandle, SupervisorStatistics
from app.lifecycle import Trigger
from app.live.feed import LocalFeed
from app.live.server_feed import ServerFeed
from app.live.webhooks import WebhookDispatcher
from app.metrics import Metrics
from app.records import ConversationRecord, RunRecord
from app.run_task import RunShared
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
        self._runs = ActiveRuns()
        self._line = SlotLine(self.run_limiter)
        #: Counters, histograms and live gauges for ``GET /metrics`` (a registry of its own).
        self.metrics = Metrics()
        #: The server-wide stream's feed: status changes, limits, conversations, steps.
        self.server_feed = ServerFeed(
            self,
            buffer_events=settings.stream_buffer_events,
            retain_events=settings.server_stream_retain_events,
        )
        #: Where streams get new events (fed by the store after each commit) and the runs'
        #: live text fragments.
        self.feed = LocalFeed(settings.stream_buffer_events)
        #: POSTs to a conversation's webhook when each of its runs ends (store listener).
        self.webhooks = WebhookDispatcher(settings, store, self.io)
        self._shared = RunShared(
            settings=settings,
            registry=self.registry,
            tools=self.tools,
            tool_limiter=self.tool_limiter,
            store=store,
            io_limiter=self.io_limiter,
            run_threads=trio.CapacityLimiter(math.inf),
            line=self._line,
            runs=self._runs,
            ends=EndLedger(self._write_end),
            metrics=self.metrics,
            on_step=self.server_feed.publish_step,
            feed=self.feed,
        )
        self._desk = AdmissionDesk(self._shared, settings.max_queued_runs)
        self.metrics.collect_live(self)
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
        """Sort old workspaces into their namespaces (once), recover from a crash, then own
        the run nursery until :meth:`aclose`.

        For ``nursery.start``: reports started once runs can be admitted.
        """
        await self.io(workspaces.migrate_legacy_layout, self.settings.workspaces_path, self.store)
        touched = await self.io(self.store.recover_interrupted, reason="crash_recovery")
        if touched:
            log.warning("crash recovery: %d conversation(s) paused", len(touched))
        self.feed.open()
        self.store.add_listener(self.feed.publish)
        self.store.add_listener(self.webhooks.listen)
        self.store.add_listener(self.metrics.events_appended)
        self.server_feed.open(self.store)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._admit_into, nursery)
                await nursery.start(self.webhooks.serve)
                nursery.start_soon(self._shared.ends.retry_until_closed)
                if self.settings.resume_on_start:
                    await self._resume(touched)
                task_status.started(self)
                await self._closing.wait()
                await self._shared.ends.retry_now()
                nursery.cancel_scope.cancel()  # the retry task; every run has ended
        finally:
            self._desk.nursery = None  # admits nothing more, however serve() ended
            self.store.remove_listener(self.feed.publish)
            self.store.remove_listener(self.webhooks.listen)
            self.store.remove_listener(self.metrics.events_appended)
            self.feed.end_all("shutdown")
            self.server_feed.close(self.store)
            with trio.CancelScope(shield=True):
                await self.registry.aclose()  # e.g. the llm provider's HTTP client

    async def _admit_into(
        self, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Make ``nursery`` the home of new run tasks for as long as this task lives.

        Why a task of its own: a nursery whose last child has ended is closed to new
        arrivals *before* its parent task runs again, so a flag cleared by the parent
        would still be set for a moment while ``start_soon`` already fails. This child
        clears it on its way out (closing or cancelled), and the nursery cannot close
        while it lives: ``desk.nursery`` set means the nursery still takes tasks.
        """
        self._desk.nursery = nursery
        try:
            task_status.started()
            await self._closing.wait()
        finally:
            self._desk.nursery = None

    async def _resume(self, conversation_ids: list[str]) -> None:
        """``resume_on_start``: queue what fits; leave the rest paused, and say so."""
        for index, conversation_id in enumerate(conversation_ids):
            try:
                await self.start_run(
                    conversation_id, if_busy=IfBusy.ENQUEUE, reason="resume_on_start"
                )
            except RunQueueFull:
                left = len(conversation_ids) - index
                log.warning(
                    "resume_on_start: %d conversation(s) left paused: the queue is full"
                    " (max_queued_runs = %d); start their runs later",
                    left,
                    self.max_queued_runs,
                )
                return

    async def aclose(self, reason: str = "shutdown") -> int:
        """Drain (bounded by ``shutdown_grace_seconds``), then let :meth:`serve` return.

        Idempotent. Returns how many runs were abandoned (see :meth:`drain`).
        """
        abandoned = await self.drain(reason)
        self._closing.set()
        return abandoned

    async def drain(self, reason: str = "shutdown", *, grace_seconds: float | None = None) -> int:
        """Refuse new runs, stop every queued and running run, wait for all of them.

        Returns once every run's final status is committed (``paused`` with ``reason``)
        and every run thread has returned — or, for threads that ignore cancellation past
        ``grace_seconds`` (default: ``shutdown_grace_seconds``), once their runs were
        recorded without them. Returns how many runs were abandoned that way (0 normally).
        Webhooks still being delivered get what is left of the same grace period.
        """
        self._desk.draining = True
        handles = list(self._runs)
        for handle in handles:  # synchronous: no queued run can take a freed slot meanwhile
            handle.stop(reason)
        if grace_seconds is None:
            grace_seconds = self.settings.shutdown_grace_seconds
        deadline = trio.current_time() + grace_seconds
        stuck = await self._join(handles, grace_seconds)
        await self.feed.flush()  # streams get every final status, then their end
        self.feed.end_all(reason)
        self.server_feed.end_all(reason)  # its hops share the flushed FIFO
        await self.webhooks.aclose(deadline)  # the final statuses' webhooks, bounded
        if stuck:
            log.error(
                "%d run thread(s) did not stop within shutdown_grace_seconds (%s s);"
                " recorded their runs as paused and gave up waiting for them",
                stuck,
                grace_seconds,
            )
        return stuck

    async def _join(self, handles: list[RunHandle], timeout_seconds: float) -> int:
        """Wait for the runs to end; abandon those whose threads outlast the timeout.
        Returns how many were abandoned."""
        with trio.move_on_after(timeout_seconds):
            for handle in handles:
                await handle.done.wait()
        stuck = [handle for handle in handles if not handle.done.is_set()]
        for handle in stuck:
            self._desk.abandoned.append(handle)
            handle.abandon()
        for handle in stuck:  # their tasks record the end, then unregister
            await handle.done.wait()
        return len(stuck)

    @property
    def draining(self) -> bool:
        return self._desk.draining

    # -- I/O door for handlers -------------------------------------------------------------

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short blocking call (a store call) in a thread on the I/O limiter."""
        return await self._shared.io(fn, *args, **kwargs)

    async def _write_end(self, run_id: str, trigger: Trigger, **kwargs: Any) -> RunRecord:
        return await self.io(self.store.transition_run, run_id, trigger, **kwargs)

    # -- admission -----------------------------------------------------------------------

    async def start_run(
        self, conversation_id: str, *, if_busy: IfBusy = IfBusy.REJECT, reason: str = "user"
    ) -> RunRecord:
        """Admit a run of the conversation and return its record (status ``queued``).

        Errors: as :meth:`admit`.
        """
        run, _ = await self.admit_run(conversation_id, if_busy=if_busy, reason=reason)
        return run

    async def admit_run(
        self, conversation_id: str, *, if_busy: IfBusy = IfBusy.REJECT, reason: str = "user"
    ) -> tuple[RunRecord, ConversationRecord]:
        """:meth:`start_run`, also returning the conversation as the admission left it."""

        def write(admission: Admission) -> tuple[RunRecord, ConversationRecord]:
            return self.store.create_run(
                conversation_id,
                run_id=admission.run_id,
                activate=admission.activate,
                reason=admission.reason,
            )

        (run, conversation), admission = await self.admit(
            conversation_id, write, lambda result: result[1], if_busy=if_busy, reason=reason
        )
        return admission.present(run), conversation

    async def admit(
        self,
        conversation_id: str,
        write: Callable[[Admission], T],
        conversation_of: Callable[[T], ConversationRecord],
        *,
        if_busy: IfBusy = IfBusy.REJECT,
        reason: str = "user",
    ) -> tuple[T, Admission]:
        """Admit a run: reserve its place now, record it with ``write``, then start it
        (see ``app/admission.py``).

        ``write(admission)`` runs in a worker thread (I/O limiter) and must record the run
        (``admission.run_id``, activated if ``admission.activate``) in one transaction,
        with whatever else belongs to the request (a new conversation, a message);
        ``conversation_of(result)`` picks the conversation record out of its result.

        Errors:
            As :meth:`check_admission`, and whatever ``write`` raises. In every error case
            nothing was admitted, and ``write``'s transaction, if it ran, was rolled back.
        """
        return await self._desk.admit(
            conversation_id, write, conversation_of, if_busy=if_busy, reason=reason
        )

    def check_admission(
        self, conversation_id: str | None = None, *, if_busy: IfBusy = IfBusy.ENQUEUE
    ) -> None:
        """Raise the error :meth:`start_run` would raise now, without starting anything.

        Errors:
            :class:`~app.errors.ShuttingDown`, :class:`~app.errors.NotFound` (being
            deleted), :class:`~app.errors.ConversationBusy` (``if_busy=reject`` and a run is
            active), :class:`~app.errors.RunQueueFull`.
        """
        self._desk.check(conversation_id, if_busy=if_busy)

    @property
    def max_queued_runs(self) -> int:
        return self._desk.max_queued_runs

    # -- control -------------------------------------------------------------------------

    async def pause(self, conversation_id: str) -> RunRecord:
        """Stop the conversation's run at its next step boundary (``pausing`` until then).

        A run that has no slot yet stops at once, as do runs enqueued behind it.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        current, *later = self._runs_of(conversation_id, action="pause")
        current.control.pause_requested = True
        self.metrics.stop_requested([current, *later], "pause")
        stopped = later if current.holds_slot else [current, *later]
        for handle in stopped:
            handle.stop("pause")
        if stopped:  # they have no thread: their tasks record them paused right away
            with trio.move_on_after(INTERRUPT_JOIN_SECONDS):
                for handle in stopped:
                    await handle.done.wait()
        if current.holds_slot:
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
        self.metrics.stop_requested(handles, "interrupt")
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
        with ``delete_workspace``, its workspace directory too, unless that is a named one
        another conversation still names (see :mod:`app.workspaces`).

        Bounded: a run whose thread ignores cancellation for ``shutdown_grace_seconds`` is
        recorded without it (see :meth:`drain`), and the deletion goes on.

        Errors:
            :class:`~app.errors.NotFound`; :class:`~app.workspaces.WorkspaceInUse` (409,
            nothing deleted) when
            ``delete_workspace`` names a workspace that another conversation's active run
            works in.
        """
        conversation = await self.io(self.store.get_conversation, conversation_id)
        if delete_workspace:
            workspaces.check_workspace_free(conversation, self._runs)
        self._desk.deleting.add(conversation_id)
        try:
            handles = self._runs.of_conversation(conversation_id)
            for handle in handles:
                handle.stop("deleted")
            await self._join(handles, self.settings.shutdown_grace_seconds)
            await self.io(self.store.delete_conversation, conversation_id)
            self.webhooks.forget(conversation_id)  # its pending deliveries: dropped
            await self.feed.flush()
            self.feed.end_conversation(conversation_id, "deleted")
            self.server_feed.conversation_changed(conversation_id, "deleted")
            if delete_workspace:
                root = self.settings.workspaces_path
                await workspaces.delete_workspace(
                    conversation, self._runs, root, self.store, self.io
                )
        finally:
            self._desk.deleting.discard(conversation_id)

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
        return self._line.position(run_id)

    def with_position(self, record: RunRecord) -> RunRecord:
        """``record`` with its live ``queue_position`` filled in."""
        position = self._line.position(record.id)
        if position is None:
            return record
        return record.model_copy(update={"queue_position": position})

    def active_runs(
        self, limit: int | None = None, *, running: bool | None = None
    ) -> list[tuple[str, bool, int | None]]:
        """``(run_id, holds_slot, queue_position)`` of active runs: those holding a slot
        first, then the slot line in start order, then runs waiting for their conversation.
        ``running`` keeps only runs that hold (True) or wait for (False) a slot. At most
        ``limit``: found without walking the rest of a long line."""
        parts: list[Iterable[tuple[str, bool, int | None]]] = []
        if running in (None, True):
            parts.append((h.run_id, True, None) for h in self._runs if h.holds_slot)
        if running in (None, False):
            parts.append((run_id, False, n) for n, run_id in enumerate(self._line, start=1))
            parts.append(
                (h.run_id, False, None)
                for h in self._runs
                if not h.holds_slot and h.run_id not in self._line
            )
        return list(itertools.islice(itertools.chain(*parts), limit))

    # -- limits and statistics -----------------------------------------------------------

    def set_limits(
        self, *, max_concurrent_runs: int | None = None, max_queued_runs: int | None = None
    ) -> None:
        """Change limits at runtime. Raising run slots seats waiting runs at once; lowering
        them preempts nobody; 0 pauses admission. Lowering ``max_queued_runs`` refuses new
        runs only."""
        if max_concurrent_runs is not None:
            self.run_limiter.total_tokens = max_concurrent_runs
            self._line.fill()
        if max_queued_runs is not None:
            self._desk.max_queued_runs = max_queued_runs
        self.server_feed.limits_changed()

    def statistics(self) -> SupervisorStatistics:
        io, tool = self.io_limiter.statistics(), self.tool_limiter.statistics()
        return SupervisorStatistics(
            running=self._line.seated,
            queued=self._desk.queued(),
            waiting_for_slot=len(self._line),
            run_threads_alive=self._shared.run_threads.borrowed_tokens,
            max_concurrent_runs=int(self.run_limiter.total_tokens),
            max_queued_runs=self.max_queued_runs,
            io_borrowed=io.borrowed_tokens,
            io_total=int(io.total_tokens),
            io_waiting=io.tasks_waiting,
            tool_borrowed=tool.borrowed_tokens,
            tool_total=int(tool.total_tokens),
            tool_waiting=tool.tasks_waiting,
            draining=self._desk.draining,
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
    and joined, within ``shutdown_grace_seconds``: a run thread that ignores cancellation
    longer is abandoned (its run recorded ``paused``) so that the block still ends on time.
    """
    supervisor = RunSupervisor(settings, store, registry, tools)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.serve)
        try:
            yield supervisor
        finally:
            with trio.CancelScope(shield=True):
                await supervisor.aclose()
