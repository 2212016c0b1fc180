"""This process as one node of a cluster: what it runs beside its supervisor when the store
is shared with other nodes (PostgreSQL; ``store.cluster_url``).

Ownership and cancellation: :meth:`ClusterNode.serve` runs in the supervisor's nursery,
started before the first run is admitted, and owns one nursery for the node's parts; each
part is started with ``nursery.start`` (so ``serve`` reports started only once every part
is in place) and ends when the supervisor's nursery is cancelled at the end of the drain.
On SQLite there is no cluster and nothing here runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from app.cluster.changes import Changes
from app.cluster.claims import Claims
from app.cluster.control import Control
from app.cluster.nodes import NodeLease

if TYPE_CHECKING:
    from app.supervisor import RunSupervisor


class ClusterNode:
    """The cluster parts of one supervisor's process (see the module docstring)."""

    def __init__(self, supervisor: RunSupervisor, url: str) -> None:
        self.supervisor = supervisor
        self.url = url

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every part, report started, and run until cancelled."""
        async with trio.open_nursery() as nursery:  # the parts' nursery
            # The parts: added here one line each (``await nursery.start(part.serve)``),
            # in the order they must start.
            await nursery.start(NodeLease(self.supervisor, self.url).serve)
            await nursery.start(Changes(self.supervisor).serve)
            await nursery.start(Claims(self.supervisor).serve)
            await nursery.start(Control(self.supervisor).serve)
            task_status.started()
            await trio.sleep_forever()
