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
    ├── _purge_keys_hourly           expired Idempotency-Keys (also once before start)
    └── run_admitted(handle)         run_task.py: waits, runs, always records the end
        └── (system task) hosts to_thread: run_conversation(ctx)   one run thread
            └── to_thread (tool limiter): tool calls

The supervisor wires the parts that own no task of their own: the admission desk
(``app/admission.py``) and the slot line; the live side, feeds and webhooks behind the
store's listeners (``app/live/hub.py``: opened by :meth:`RunSupervisor.serve`, ended by
:meth:`RunSupervisor.drain`); the read-only views (``app/run_board.py``); and the stops
(``app/stopping.py``: pause, interrupt, delete, and the bounded join the drain uses).

Three limiters, never shared: ``run_limiter`` (run slots), ``io_limiter`` (short store calls
made for HTTP handlers, via :meth:`io`) and ``tool_limiter`` (tool calls inside runs).
Nothing here runs on Trio's default thread limiter — except in ``naive_mode``, the
design Trellis replaces, kept for benchmarks and teaching (see :func:`_limiters`).

Cancellation:
    Interrupt, delete and drain call ``handle.stop()``: a queued run then leaves the line
    without starting a thread, a running one stops at its next cancellation point (see
    ``app/conversation.py``; who waits how long: ``app/stopping.py``). The run slot is
    released only after the thread has returned. Shutdown is bounded: :meth:`drain` gives
    threads ``shutdown_grace_seconds``; a thread that ignores cancellation longer is
    *abandoned* — its run is recorded ``paused`` and the supervisor closes on time, though
    the thread itself (Python threads cannot be killed) runs on until it returns. Only then
    are the streams ended and the webhooks closed: every stream sees every final status first.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from app import workspaces
from app.admission import Admission, AdmissionDesk
from app.agents.registry import AgentRegistry, default_registry
from app.cluster.node import ClusterNode
from app.cluster.recovery import recover_dead_nodes
from app.end_ledger import EndLedger
from app.errors import (
    Conflict,
    IllegalTransition,
    RunQueueFull,
    TenantQuotaExceeded,
    TrellisError,
)
from app.handles import ActiveRuns, IfBusy, SupervisorStatistics
from app.live.hub import LiveHub
from app.metrics import Metrics
from app.records import ConversationRecord, RunRecord
from app.run_board import RunBoard
from app.run_task import RunShared
from app.settings import Settings
from app.slot_line import SlotLine
from app.stopping import RunStops
from app.store.base import EventStore
from app.store.idempotency import key_cutoff
from app.tools.calls import ToolRegistry, default_tools

T = TypeVar("T")
log = logging.getLogger("trellis.supervisor")

#: How often expired Idempotency-Keys are deleted (at most: see _purge_keys_hourly).
KEY_PURGE_SECONDS = 3600.0


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
        self.run_limiter, self.io_limiter, run_threads = _limiters(settings)
        self.tool_limiter = trio.CapacityLimiter(settings.tool_threads)
        self._line = SlotLine(self.run_limiter)
        #: Counters, histograms and live gauges for ``GET /metrics`` (a registry of its own).
        self.metrics = Metrics()
        #: The feeds and the webhook dispatcher; the store's listeners while serving.
        self.live = LiveHub(
            settings, store, view=self, io=self.io, listeners=[self.metrics.events_appended]
        )
        #: The hub's parts, by the names the API, the metrics and the tests use.
        self.feed, self.server_feed = self.live.feed, self.live.server_feed
        self.webhooks = self.live.webhooks
        self._shared = RunShared(
            settings=settings,
            registry=self.registry,
            tools=self.tools,
            tool_limiter=self.tool_limiter,
            store=store,
            io_limiter=self.io_limiter,
            run_threads=run_threads,
            line=self._line,
            runs=ActiveRuns(),
            ends=EndLedger(self._write_end),
            metrics=self.metrics,
            on_step=self.live.server_feed.publish_step,
            feed=self.live.feed,
        )
        self._desk = AdmissionDesk(self._shared, settings.max_queued_runs)
        # What bounds the runs executing at once: the slots, or (naive) the shared threads.
        bound = run_threads if settings.naive_mode else self.run_limiter
        self._board = RunBoard(self._shared, self._desk, bound)
        self._stops = RunStops(self._shared, self._desk, self._board, self.live)
        self.metrics.collect_live(self)
        self._closing = trio.Event()
        #: The URL this node serves on (:meth:`advertise`); "" without HTTP (embedded).
        self.address = ""
        #: Set (and replaced) by :meth:`advertise`: the node's lease writes it at once.
        self.address_changed = trio.Event()

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
        """Sort old workspaces into their namespaces (once), recover from a crash, delete
        expired Idempotency-Keys, then own the run nursery until :meth:`aclose`.

        For ``nursery.start``: reports started once runs can be admitted.
        """
        await self.io(workspaces.migrate_legacy_layout, self.settings.workspaces_path, self.store)
        if self.store.cluster_url is None:
            touched = await self.io(self.store.recover_interrupted, reason="crash_recovery")
        else:  # shared: only dead nodes' runs, never a live node's (app/cluster/recovery.py)
            lease = self.settings.node_lease_seconds
            touched = await self.io(recover_dead_nodes, self.store, self.store.cluster_url, lease)
        if touched:
            log.warning("crash recovery: %d conversation(s) paused", len(touched))
        await self._purge_expired_keys()
        self.live.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._admit_into, nursery)
                await nursery.start(self.webhooks.serve)
                nursery.start_soon(self._shared.ends.retry_until_closed)
                nursery.start_soon(self._purge_keys_hourly)
                if self.store.cluster_url is not None:  # PostgreSQL: one node of several
                    await nursery.start(ClusterNode(self, self.store.cluster_url).serve)
                if self.settings.resume_on_start:
                    await self._resume(touched)
                task_status.started(self)
                await self._closing.wait()
                await self._shared.ends.retry_now()
                nursery.cancel_scope.cancel()  # the retry task; every run has ended
        finally:
            self._desk.nursery = None  # admits nothing more, however serve() ended
            self.live.close()  # streams a drain did not end: ended with "shutdown"
            with trio.CancelScope(shield=True):
                await self.registry.aclose()  # e.g. the llm provider's HTTP client

    async def _purge_expired_keys(self) -> None:
        """Delete expired Idempotency-Keys (I/O limiter); a failure is logged, not raised:
        the next purge, or the lookup of that key, deletes them."""
        cutoff = key_cutoff(self.settings.idempotency_key_retention_hours)
        try:
            purged = await self.io(self.store.purge_idempotency_keys, cutoff)
        except TrellisError as exc:
            log.warning("purging expired idempotency keys failed: %s", exc.message)
        else:
            if purged:
                log.info("purged %d expired idempotency key(s)", purged)

    async def _purge_keys_hourly(self) -> None:
        """Purge every ``KEY_PURGE_SECONDS`` (a quarter of the retention if shorter) until
        cancelled with the run nursery."""
        every = min(KEY_PURGE_SECONDS, self.settings.idempotency_key_retention_hours * 900)
        while True:
            await trio.sleep(every)
            await self._purge_expired_keys()

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
        """``resume_on_start``: queue what fits; leave the rest paused, and say so. A
        tenant at its quota keeps its own conversations paused, not the other tenants'."""
        over_quota = 0
        for index, conversation_id in enumerate(conversation_ids):
            try:
                await self.start_run(
                    conversation_id, if_busy=IfBusy.ENQUEUE, reason="resume_on_start"
                )
            except TenantQuotaExceeded:
                over_quota += 1
            except RunQueueFull:
                left = len(conversation_ids) - index
                log.warning(
                    "resume_on_start: %d conversation(s) left paused: the queue is full"
                    " (max_queued_runs = %d); start their runs later",
                    left,
                    self.max_queued_runs,
                )
                return
        if over_quota:
            log.warning(
                "resume_on_start: %d conversation(s) left paused: their tenant is at"
                " tenant_max_active_runs = %d",
                over_quota,
                self.settings.tenant_max_active_runs,
            )

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
        Then every stream gets the final statuses and ends with ``reason``; webhooks still
        being delivered get what is left of the same grace period (see ``app/live/hub.py``).
        """
        self._desk.draining = True
        if grace_seconds is None:
            grace_seconds = self.settings.shutdown_grace_seconds
        deadline = trio.current_time() + grace_seconds
        abandoned = await self._stops.stop_all(reason, grace_seconds)
        await self.live.close_after_drain(reason, deadline)
        return abandoned

    @property
    def draining(self) -> bool:
        return self._desk.draining

    @property
    def desk(self) -> AdmissionDesk:
        """The admission desk (a cluster node's claims start runs through it)."""
        return self._desk

    async def stand_down(self, reason: str) -> int:
        """This node was declared dead by another (``app/cluster/nodes.py``): refuse new
        runs (as draining) and stop every run, bounded as :meth:`drain`; streams and
        webhooks stay until :meth:`aclose`. The ends are recorded only for runs still
        active (``stop_runs``): those the other node recorded are not recorded again.
        Returns how many runs were abandoned."""
        self._desk.draining = True
        return await self._stops.stop_all(reason, self.settings.shutdown_grace_seconds)

    def advertise(self, url: str) -> None:
        """Tell the supervisor the URL its server serves on (the ``address`` its node
        shows in ``GET /api/cluster``); ``app/cli/serving.py`` calls it after binding."""
        self.address = url
        self.address_changed.set()
        self.address_changed = trio.Event()

    # -- I/O door for handlers -------------------------------------------------------------

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short blocking call (a store call) in a thread on the I/O limiter."""
        return await self._shared.io(fn, *args, **kwargs)

    async def _write_end(self, call: Callable[[EventStore], T]) -> T:
        """The end ledger's store writes: ``call(store)`` on the I/O limiter."""
        return await self.io(call, self.store)

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
                started=admission.seated,
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
        tenant: str | None = None,
    ) -> tuple[T, Admission]:
        """Admit a run: reserve its place now, record it with ``write``, then start it
        (see ``app/admission.py``). The run counts against ``tenant``'s
        ``tenant_max_active_runs``: by default the existing conversation's tenant (a new
        conversation's caller must name it).

        ``write(admission)`` runs in a worker thread (I/O limiter) and must record the run
        (``admission.new_run``: activated if ``admission.activate``, started if
        ``admission.seated``) in one transaction,
        with whatever else belongs to the request (a new conversation, a message);
        ``conversation_of(result)`` picks the conversation record out of its result.

        Errors:
            As :meth:`check_admission`, and whatever ``write`` raises. In every error case
            nothing was admitted, and ``write``'s transaction, if it ran, was rolled back.
        """
        if tenant is None:
            tenant = await self._tenant_for_admission(conversation_id)
        if if_busy is IfBusy.INTERRUPT and self._desk.clustered:  # its runs: on any node
            self._desk.check(conversation_id, if_busy=if_busy, tenant=tenant)
            with contextlib.suppress(IllegalTransition):  # nothing active: nothing to stop
                await self._stops.interrupt(conversation_id)
        return await self._desk.admit(
            conversation_id, write, conversation_of, if_busy=if_busy, reason=reason, tenant=tenant
        )

    async def _tenant_for_admission(self, conversation_id: str) -> str | None:
        """The conversation's tenant, if admission must know it before the write: when a
        tenant quota is set, or the record is cached. Otherwise ``None`` — admission then
        takes the tenant from the record its write returns, sparing the start a thread
        hop (a run start costs fewer hops, and hops are most of its cost)."""
        conversation = self.store.cached_conversation(conversation_id)
        if conversation is not None:
            return conversation.tenant
        if not self.settings.tenant_max_active_runs:
            return None
        conversation = await self.io(self.store.get_conversation, conversation_id)
        return conversation.tenant

    def run_tenant(self, run_id: str) -> str | None:
        """The tenant of an active run (``None`` once it ended); never blocks."""
        return self._desk.tenant_of.get(run_id)

    def check_admission(
        self,
        conversation_id: str | None = None,
        *,
        if_busy: IfBusy = IfBusy.ENQUEUE,
        tenant: str | None = None,
    ) -> None:
        """Raise the error :meth:`start_run` would raise now, without starting anything.

        Errors:
            :class:`~app.errors.ShuttingDown`, :class:`~app.errors.NotFound` (being
            deleted), :class:`~app.errors.ConversationBusy` (``if_busy=reject`` and a run is
            active), :class:`~app.errors.TenantQuotaExceeded` (only with ``tenant``),
            :class:`~app.errors.RunQueueFull`.
        """
        self._desk.check(conversation_id, if_busy=if_busy, tenant=tenant)

    @property
    def max_queued_runs(self) -> int:
        return self._desk.max_queued_runs

    # -- control (app/stopping.py) -------------------------------------------------------

    @property
    def stops(self) -> RunStops:
        """The stops; the cluster's control part (``app/cluster/control.py``) uses them."""
        return self._stops

    async def pause(self, conversation_id: str) -> RunRecord:
        """Stop the conversation's run at its next step boundary (``pausing`` until then).

        A run that has no slot yet stops at once, as do runs enqueued behind it.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        return await self._stops.pause(conversation_id)

    async def interrupt(self, conversation_id: str) -> RunRecord:
        """Stop every active run of the conversation now, even mid-step; wait briefly.

        Errors:
            :class:`~app.errors.IllegalTransition` (409) when nothing is active.
        """
        return await self._stops.interrupt(conversation_id)

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
            nothing deleted) when ``delete_workspace`` names a workspace that another
            conversation's active run works in.
        """
        await self._stops.delete_conversation(conversation_id, delete_workspace=delete_workspace)

    async def wait_run(
        self, conversation_id: str, run_id: str, timeout_seconds: float
    ) -> RunRecord | None:
        """The run's record once it has ended, or ``None`` if ``timeout_seconds`` passed."""
        if self._desk.clustered and self._shared.runs.get(run_id) is None:  # not held here
            return await self._board.wait_in_cluster(conversation_id, run_id, timeout_seconds)
        return await self._stops.wait_run(conversation_id, run_id, timeout_seconds)

    # -- queries (app/run_board.py) ------------------------------------------------------

    async def get_run(self, conversation_id: str, run_id: str) -> RunRecord:
        """The run's stored record, with its live ``queue_position``."""
        return await self._board.get_run(conversation_id, run_id)

    def queue_position(self, run_id: str) -> int | None:
        """1-based place in the line for a run slot (= the order runs will start)."""
        return self._board.queue_position(run_id)

    def with_position(self, record: RunRecord) -> RunRecord:
        """``record`` with its live ``queue_position`` filled in."""
        return self._board.with_position(record)

    async def with_positions(self, records: list[RunRecord]) -> list[RunRecord]:
        """``records`` with their live ``queue_position`` (in a cluster: one database read)."""
        return await self._board.with_positions(records)

    def active_runs(
        self, limit: int | None = None, *, running: bool | None = None
    ) -> list[tuple[str, bool, int | None]]:
        """``(run_id, holds_slot, queue_position)`` of active runs, slot holders first, then
        in start order (see :meth:`RunBoard.active_runs <app.run_board.RunBoard.active_runs>`)."""
        return self._board.active_runs(limit, running=running)

    def statistics(self) -> SupervisorStatistics:
        """The supervisor's load, as one frozen record (``GET /api/server``)."""
        return self._board.statistics()

    # -- limits --------------------------------------------------------------------------

    def set_limits(
        self, *, max_concurrent_runs: int | None = None, max_queued_runs: int | None = None
    ) -> None:
        """Change limits at runtime. Raising run slots seats waiting runs at once; lowering
        them preempts nobody; 0 pauses admission. Lowering ``max_queued_runs`` refuses new
        runs only.

        Errors:
            :class:`~app.errors.Conflict` (409) for ``max_concurrent_runs`` in
            ``naive_mode``, which has no run slots (nothing is changed then).
        """
        if max_concurrent_runs is not None:
            if self.settings.naive_mode:
                raise Conflict("naive_mode has no run slots to change (it shares Trio's threads)")
            self.run_limiter.total_tokens = max_concurrent_runs
            self._line.fill()
        if max_queued_runs is not None:
            self._desk.max_queued_runs = max_queued_runs
        self.live.limits_changed()


def _limiters(
    settings: Settings,
) -> tuple[trio.CapacityLimiter, trio.CapacityLimiter, trio.CapacityLimiter]:
    """The run slots, the I/O limiter, and the limiter run threads are started on.

    Normally three of their own: run threads go on an unbounded limiter (the slots decide
    how many run). ``naive_mode`` (benchmarks and teaching only) builds the design Trellis
    replaces from the same parts: runs and short I/O both on Trio's default thread limiter,
    and slots without a bound, so the slot line seats every run at once: no run is ever
    queued, each waits, invisibly, for a thread, and short requests wait behind them.
    :meth:`RunSupervisor.statistics` then shows the shared limiter's tokens as both
    ``max_concurrent_runs`` and ``io_total``, and its borrowers (runs and I/O alike) as
    ``run_threads_alive`` and ``io_borrowed``.
    """
    if settings.naive_mode:
        shared = trio.to_thread.current_default_thread_limiter()
        return trio.CapacityLimiter(math.inf), shared, shared
    return (
        trio.CapacityLimiter(settings.max_concurrent_runs),
        trio.CapacityLimiter(settings.io_threads),
        trio.CapacityLimiter(math.inf),
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
