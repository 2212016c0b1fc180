"""Claiming queued runs from the cluster's queue whenever this node has a free run slot.

On a shared database a run is admitted into the database's queue and belongs to no node
until one claims it (``app/store/claims.py``). :class:`Claims`, a cluster part started
from ``app/cluster/node.py``, is this node's claimer: whenever its run limiter has free
tokens and it is not draining, it claims up to that many runs in one transaction (the
oldest first, claims serialized cluster-wide by an advisory lock: start order = queue
order), then starts each one here as an admitted run — seated at once, registered, its
task started (:meth:`AdmissionDesk.launch_claimed <app.admission.AdmissionDesk.launch_claimed>`).
``max_concurrent_runs`` thus stays per node: each node fills only its own slots.

Wake-ups, any of:

- a NOTIFY on the queue channel: sent by every admitting transaction, on any node, at its
  COMMIT ("there is something to claim");
- a slot of this node left free (``SlotLine.on_free``: a run ended, the limit was raised);
- a fallback poll every :data:`POLL_SECONDS`: a lost notification (the listener
  reconnecting), or a run that became claimable because another node's run of its
  conversation ended, costs latency, never a stuck queue.

Exactly once: a run changes from ``queued`` to ``running`` only in the claim transaction
that took its row lock (``FOR UPDATE SKIP LOCKED``, under the claim lock), and only the
node whose transaction committed that change starts it. A claimed run is never queued
again: if this node dies, the lease sweep records it ``paused``/``crash_recovery``.

Ownership and cancellation: :meth:`Claims.serve` runs in the node's nursery and owns the
listener (and its thread) and the claim task. A claim in flight is shielded together with
the launch of what it claimed: once the database says "yours", the runs are started here —
or, if the supervisor is draining or closed meanwhile, recorded paused (``shutdown``).

Errors: a claim that fails (the database unreachable...) is logged; the next wake-up or
poll tries again.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from app.cluster.notifications import Listener, Notification
from app.errors import TrellisError
from app.store.sql_store import SqlStore

if TYPE_CHECKING:
    from app.supervisor import RunSupervisor

log = logging.getLogger("trellis.cluster")

#: The fallback poll: the longest a claimable run waits for a node with a free slot when
#: every notification about it was lost. One indexed query per node per second.
POLL_SECONDS = 1.0
#: The most runs one claim transaction takes (a node with thousands of free slots fills
#: them in several claims, each a short transaction).
CLAIM_BATCH = 64


class Claims:
    """The claiming part of a cluster node (see the module docstring)."""

    def __init__(self, supervisor: RunSupervisor) -> None:
        store = supervisor.store
        if not isinstance(store, SqlStore) or store.cluster_url is None:
            raise TypeError(f"claims need a shared (PostgreSQL) store, not {store!r}")
        self._supervisor = supervisor
        self._store = store
        self._desk = supervisor.desk
        self._wanted = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and claim until cancelled; started once LISTEN is in place."""
        channel = await self._supervisor.io(self._store.queue_channel)
        url = make_conninfo(
            self._store.cluster_url or "",
            application_name=f"trellis-claims-{self._store.node_id}",
        )
        listener = Listener(url, [channel], self._notified, on_reconnect=self.wake)
        line = self._desk.shared.line
        line.on_free = self.wake
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.serve)
                nursery.start_soon(self._claim_forever)
                task_status.started()
        finally:
            line.on_free = None

    def wake(self) -> None:
        """Claim soon (Trio thread; never blocks)."""
        self._wanted.set()

    def _notified(self, batch: list[Notification]) -> None:
        self.wake()

    async def _claim_forever(self) -> None:
        """Claim at start, at every wake-up, and at least every :data:`POLL_SECONDS`."""
        while True:
            self._wanted = trio.Event()
            await self.claim_while_free()
            with trio.move_on_after(POLL_SECONDS):
                await self._wanted.wait()

    def free_slots(self) -> int:
        """How many runs this node may claim now (0 while draining or closed)."""
        desk = self._desk
        if desk.draining or desk.nursery is None:
            return 0
        limiter = self._supervisor.run_limiter
        free = limiter.total_tokens - limiter.borrowed_tokens
        return CLAIM_BATCH if math.isinf(free) else max(0, min(int(free), CLAIM_BATCH))

    async def claim_while_free(self) -> int:
        """Claim and start runs while slots are free and the queue has claimable runs;
        how many were claimed."""
        total = 0
        while (free := self.free_slots()) > 0:
            with trio.CancelScope(shield=True):  # claimed = ours to start: see the module
                try:
                    claimed = await self._supervisor.io(self._store.claim_runs, free)
                except (TrellisError, psycopg.Error) as error:
                    log.warning("claiming queued runs failed (%s); trying again soon", error)
                    return total
                await self._desk.launch_claimed(claimed)
            total += len(claimed)
            if len(claimed) < free:
                return total
        return total
