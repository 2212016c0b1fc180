"""Admitting a run: decided at once on the Trio thread, recorded after, undone on failure.

Admission happens in three steps, so that a request either admits *and* records a run, or
does neither (a refused request stores nothing):

1. **Reserve** (synchronous, no checkpoint): check the rules (draining, busy, queue full),
   register the run's handle and give it a run slot if one is free and nobody waits, else
   the last place in the line. Because nothing can interleave, the counts the next request
   sees are exact: a burst of requests is never refused while capacity is free, and the
   queue positions handed out are unique and equal to the start order.
2. **Record** (a store transaction in a worker thread, shielded): the caller's write —
   just the run, or a new conversation with its run, or a message with its run — in *one*
   transaction. A run given a slot in step 1 is recorded ``running`` by that same
   transaction (:attr:`Admission.new_run`): its thread then starts without a write of its
   own, the cheapest start there is.
3. **Launch** the run task in the supervisor's nursery (in a context of its own, not a copy
   of the admitting request's) — or, if the write failed, **undo** the reservation: the
   slot or the place goes to the next run, and nothing was stored.

In a cluster (a shared PostgreSQL database) the line is in the database: admission records
the run ``queued`` for any node to claim, and the admitting transaction itself checks the
rules against the database (:meth:`AdmissionDesk._admit_to_cluster`, ``app/store/claims.py``);
a run this node claims is started by :meth:`AdmissionDesk.launch_claimed`.

Tenants' quota (``tenant_max_active_runs``): the desk counts each tenant's active runs
(queued + running) in memory — one more at reservation, one less when the reservation is
undone or the run's task ends (:meth:`AdmissionDesk._run_counted`) — so the check is O(1)
and exact for the same reason as the queue's: reservation has no checkpoint.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from app.errors import NotFound, ShuttingDown
from app.handles import IfBusy, RunHandle
from app.lifecycle import Trigger
from app.records import ConversationRecord, RunRecord
from app.run_task import RunPlan, RunShared, record_end, run_admitted, unregister
from app.store.base import NewRun
from app.store.claims import QueueRules, admitting, busy_error, queue_full_error, quota_error
from app.workspaces import workspace_key

T = TypeVar("T")


@dataclass(eq=False)
class Admission:
    """A reserved run: its handle, and its place at the moment it was admitted."""

    handle: RunHandle
    #: 1-based place in the line when admitted; ``None`` when it got a slot at once or
    #: waits for an earlier run of its own conversation.
    position: int | None
    reason: str
    #: Earlier runs of the conversation to interrupt once this one is recorded
    #: (``if_busy=interrupt``).
    replaces: list[RunHandle] = field(default_factory=list)
    #: It was given a run slot at once: it is recorded ``running`` by the admitting
    #: transaction itself, and its thread does not write the start again.
    seated: bool = False
    #: Admitted into the cluster's queue (shared database): the rules its transaction
    #: checks, and the position that transaction gives it (``app/store/claims.py``).
    rules: QueueRules | None = None

    @property
    def run_id(self) -> str:
        return self.handle.run_id

    @property
    def activate(self) -> bool:
        """Whether the run becomes its conversation's current run at once (no earlier
        active run to wait for)."""
        return self.handle.previous is None

    @property
    def new_run(self) -> NewRun:
        """The run as the admitting transaction records it."""
        return NewRun(self.run_id, self.reason, self.activate, started=self.seated)

    def present(self, record: RunRecord) -> RunRecord:
        """The run's record as the admitting request reports it: with the position it
        was given. (A replay of the request reports exactly the same.)"""
        position = self.position if self.rules is None else self.rules.position
        if position is None:
            return record
        return record.model_copy(update={"queue_position": position})


class AdmissionDesk:
    """Decides which runs are admitted and where they wait; starts their tasks.

    It sees every active run (``shared.runs``) and the slot line, and keeps what admission
    must know besides: the conversations being deleted, the runs whose threads were
    abandoned (they may still hold slots), whether the supervisor is draining, and the
    nursery new run tasks go to (``None`` when there is none: nothing is admitted).
    Trio thread only, like everything it touches.
    """

    def __init__(self, shared: RunShared, max_queued_runs: int) -> None:
        self.shared = shared
        self.max_queued_runs = max_queued_runs
        self.nursery: trio.Nursery | None = None
        self.draining = False
        self.deleting: set[str] = set()
        self.abandoned: list[RunHandle] = []
        #: The tenant of each active run, and each tenant's count of active runs.
        self.tenant_of: dict[str, str] = {}
        self.active_of_tenant: dict[str, int] = {}
        #: Runs are queued in the shared database, not in the slot line (PostgreSQL).
        self.clustered = shared.store.cluster_url is not None

    def queued(self) -> int:
        """Active runs without a slot: in the line, or behind their conversation's run
        (not those whose end is being recorded)."""
        self.abandoned = [handle for handle in self.abandoned if handle.holds_slot]
        holding = self.shared.line.seated - len(self.abandoned)
        return len(self.shared.runs) - holding - self.shared.runs.ending

    def check(
        self, conversation_id: str | None, *, if_busy: IfBusy, tenant: str | None = None
    ) -> None:
        """Raise the error admission would raise now, without admitting anything.

        Errors:
            :class:`~app.errors.ShuttingDown`, :class:`~app.errors.NotFound` (being
            deleted), :class:`~app.errors.ConversationBusy` (``if_busy=reject`` and a run is
            active), :class:`~app.errors.TenantQuotaExceeded` (``tenant`` has
            ``tenant_max_active_runs`` active runs), :class:`~app.errors.RunQueueFull`.
        """
        if self.draining or self.nursery is None:
            raise ShuttingDown("the server is shutting down and admits no new runs")
        if conversation_id in self.deleting:
            raise NotFound(f"no conversation with id {conversation_id} (being deleted)")
        runs = self.shared.runs.of_conversation(conversation_id)
        if runs and if_busy is IfBusy.REJECT:
            raise busy_error(runs[-1].run_id)
        retry_after = self.shared.settings.queue_full_retry_after_seconds
        quota = self.shared.settings.tenant_max_active_runs
        active = 0 if tenant is None else self.active_of_tenant.get(tenant, 0)
        if quota and active >= quota:
            raise quota_error(active, quota, retry_after)
        queued = self.queued()
        if queued >= self.max_queued_runs:
            raise queue_full_error(queued, self.max_queued_runs, retry_after)

    async def admit(
        self,
        conversation_id: str,
        write: Callable[[Admission], T],
        conversation_of: Callable[[T], ConversationRecord],
        *,
        if_busy: IfBusy,
        reason: str,
        tenant: str | None,
    ) -> tuple[T, Admission]:
        """Reserve, record with ``write`` (in a worker thread), then launch — or undo.
        The run counts against ``tenant``'s quota until it ends. ``None``: the tenant is
        not known yet and no quota is set; it is taken from the conversation ``write``
        returns (the run counts from then on).

        Errors: as :meth:`check`, and whatever ``write`` raises (nothing is admitted then).
        """
        if self.clustered:
            return await self._admit_to_cluster(conversation_id, write, if_busy, reason, tenant)
        admission = self._reserve(conversation_id, if_busy=if_busy, reason=reason, tenant=tenant)
        # Shielded: once the run is recorded, its task must start, or the record would be
        # left queued with nobody to run it.
        with trio.CancelScope(shield=True):
            try:
                result = await self.shared.io(write, admission)
            except BaseException:
                self._undo(admission)
                raise
            conversation = conversation_of(result)
            if tenant is None:
                self._count(admission.run_id, conversation.tenant)
            await self._launch(admission, conversation)
        return result, admission

    async def _admit_to_cluster(
        self,
        conversation_id: str,
        write: Callable[[Admission], T],
        if_busy: IfBusy,
        reason: str,
        tenant: str | None,
    ) -> tuple[T, Admission]:
        """Shared database: record the run in the cluster's queue (``app/store/claims.py``:
        the rules are checked, and activation decided, by the admitting transaction) and
        seat nothing here — a node with a free slot claims it (``app/cluster/claims.py``).
        The local checks first: they see a subset of what the database sees (this node's
        runs), so they never refuse what the database would admit."""
        self.check(conversation_id, if_busy=if_busy, tenant=tenant)
        earlier = self.shared.runs.of_conversation(conversation_id)  # this node's only
        handle = RunHandle(str(uuid.uuid4()), conversation_id, None)  # not registered here
        replaces = earlier if if_busy is IfBusy.INTERRUPT else []
        settings = self.shared.settings
        rules = QueueRules(
            max_queued_runs=self.max_queued_runs,
            reject_if_busy=if_busy is IfBusy.REJECT,
            tenant_max_active_runs=settings.tenant_max_active_runs,
            retry_after_seconds=settings.queue_full_retry_after_seconds,
        )
        admission = Admission(handle, None, reason, replaces, rules=rules)

        def admit_in_thread() -> T:
            with admitting(rules):
                return write(admission)

        with trio.CancelScope(shield=True):  # recorded means claimable: report it
            result = await self.shared.io(admit_in_thread)
        self.shared.metrics.stop_requested(replaces, "interrupt")
        for run in replaces:
            run.stop("interrupt")
        return result, admission

    async def launch_claimed(self, claimed: list[tuple[RunRecord, ConversationRecord]]) -> None:
        """Start the runs this node's claim recorded ``running`` (``app/cluster/claims.py``):
        each registered, seated at once (the claim took no more than the free slots; a
        limit lowered meanwhile puts it in the local line) and its task started, as an
        admitted run's. A supervisor that stopped, or drains, records them paused
        (``shutdown``) instead: a claimed run is never put back into the queue."""
        for run, conversation in claimed:
            handle = RunHandle(run.id, conversation.id, None)
            handle.control.recorded_started = True
            self.shared.runs.add(handle)
            self._count(run.id, conversation.tenant)
            self.shared.line.admit(handle)
            await self._launch(Admission(handle, None, run.reason or "", seated=True), conversation)

    def _reserve(
        self, conversation_id: str, *, if_busy: IfBusy, reason: str, tenant: str | None
    ) -> Admission:
        """Step 1 (synchronous: nothing interleaves with the decision)."""
        self.check(conversation_id, if_busy=if_busy, tenant=tenant)
        runs, line = self.shared.runs, self.shared.line
        earlier = runs.of_conversation(conversation_id)
        handle = RunHandle(
            str(uuid.uuid4()), conversation_id, previous=earlier[-1] if earlier else None
        )
        runs.add(handle)
        if tenant is not None:
            self._count(handle.run_id, tenant)
        position = line.admit(handle) if handle.previous is None else None
        seated = handle.previous is None and position is None
        handle.control.recorded_started = seated
        replaces = earlier if if_busy is IfBusy.INTERRUPT else []
        return Admission(handle, position, reason, replaces, seated)

    def _undo(self, admission: Admission) -> None:
        """The write failed: give the slot or the place to the next run; forget the run."""
        self.shared.line.release(admission.handle)
        unregister(admission.handle, self.shared)
        self._uncount(admission.run_id)

    def _count(self, run_id: str, tenant: str) -> None:
        """The run counts for its tenant until :meth:`_uncount`."""
        self.tenant_of[run_id] = tenant
        self.active_of_tenant[tenant] = self.active_of_tenant.get(tenant, 0) + 1

    def _uncount(self, run_id: str) -> None:
        """The run ended (or was never recorded): it no longer counts for its tenant."""
        tenant = self.tenant_of.pop(run_id, None)
        if tenant is None:
            return
        left = self.active_of_tenant[tenant] - 1
        if left:
            self.active_of_tenant[tenant] = left
        else:
            del self.active_of_tenant[tenant]

    async def _run_counted(self, handle: RunHandle, plan: RunPlan) -> None:
        """The run's task; when it ends (however: it unregisters the run on the way out),
        the run stops counting for its tenant."""
        try:
            await run_admitted(handle, plan, self.shared)
        finally:
            self._uncount(handle.run_id)

    async def _launch(self, admission: Admission, conversation: ConversationRecord) -> None:
        handle = admission.handle
        handle.workspace = workspace_key(conversation)
        self.shared.metrics.stop_requested(admission.replaces, "interrupt")
        for earlier in admission.replaces:
            earlier.stop("interrupt")
        if self.nursery is None or (self.clustered and self.draining):  # record only
            self.shared.line.release(handle)
            await record_end(handle, Trigger.STOP, "shutdown", self.shared)
            unregister(handle, self.shared)
            self._uncount(handle.run_id)
            return
        # In a context of its own: the task would otherwise inherit a copy of the admitting
        # request's (Quart's request context: the request, its headers and body), and keep
        # it alive — in the task and in its thread — for as long as the run lasts.
        plan = RunPlan.of(conversation)  # not the whole record: the run keeps it all along
        contextvars.Context().run(self.nursery.start_soon, self._run_counted, handle, plan)
