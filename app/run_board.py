"""The run board: what is running, what waits and in what order — read, never changed.

Like a departures board, it shows the supervisor's state without touching it: the counts of
:class:`~app.handles.SupervisorStatistics` (``GET /api/server``, ``GET /metrics``, the
server feed's frames), the active runs in start order (``GET /api/runs``, the server
stream's snapshot), and each waiting run's live ``queue_position`` (on every run record an
HTTP handler returns).

Everything is read on the Trio thread, where that state lives, in one synchronous step: what
the board shows is consistent, and never costs more than O(log n) per run (a position is a
bisection of the slot line) — :meth:`RunBoard.active_runs` stops after ``limit`` instead of
walking a long line. The ``async`` methods read through the I/O limiter.

Cluster (a shared PostgreSQL database, ``app/store/claims.py``): the queue is in the
database, not in this node's slot line. :meth:`RunBoard.get_run` and
:meth:`RunBoard.with_positions` (what the HTTP handlers present runs with: run lists,
conversations) then read the queued runs' cluster-wide positions from the database (one
read for all the runs shown); the synchronous views show this node's own runs —
``running`` is this node's, ``queued`` counts only the runs this node holds without a slot
(normally none): the cluster queue's length is the number to watch, in the database
(``SELECT count(*) FROM runs WHERE status = 'queued'``).

Ownership: the supervisor creates the board; it owns no task, no thread and no state of
its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import trio

from app.admission import AdmissionDesk
from app.events import Event
from app.handles import SupervisorStatistics
from app.lifecycle import TERMINAL, Status
from app.live.feed import Delta, StreamEnd
from app.records import RunRecord
from app.run_task import RunShared
from app.store.sql_store import SqlStore


class RunBoard:
    """Read-only views of the runs ``shared`` and ``desk`` know (see the module docstring)."""

    def __init__(
        self, shared: RunShared, desk: AdmissionDesk, run_limiter: trio.CapacityLimiter
    ) -> None:
        self._shared = shared
        self._desk = desk
        self._run_limiter = run_limiter

    async def get_run(self, conversation_id: str, run_id: str) -> RunRecord:
        """The run's stored record, with its live ``queue_position``.

        Errors: :class:`~app.errors.NotFound` (404) from the store.
        """
        shared = self._shared
        record = await shared.io(shared.store.get_run, conversation_id, run_id)
        [positioned] = await self.with_positions([record])
        return positioned

    async def with_positions(self, records: Sequence[RunRecord]) -> list[RunRecord]:
        """``records`` with their live ``queue_position``: on one node from the slot line
        (:meth:`with_position`, no wait); in a cluster the database's, one read for all of
        them through the I/O limiter (:meth:`cluster_positions`)."""
        if not self._desk.clustered:
            return [self.with_position(record) for record in records]
        positions = await self.cluster_positions(records)
        return [_positioned(record, positions.get(record.id)) for record in records]

    async def cluster_positions(self, records: Iterable[RunRecord]) -> dict[str, int]:
        """Shared database: the cluster-wide ``queue_position`` of the queued ones among
        ``records`` (one read, I/O limiter; ``app/store/claims.py``), by run id."""
        queued = [record.id for record in records if record.status is Status.QUEUED]
        if not queued:
            return {}
        store = self._shared.store
        assert isinstance(store, SqlStore)  # clustered: a shared SQL store
        return await self._shared.io(store.queue_positions, queued)

    async def wait_in_cluster(
        self, conversation_id: str, run_id: str, timeout_seconds: float
    ) -> RunRecord | None:
        """Shared database, a run this node does not hold (queued in the database, or
        claimed by another node): its record once it has ended, or ``None`` after
        ``timeout_seconds``. Subscribes to the conversation's feed first (other nodes'
        events reach it through ``app/cluster/changes.py``, this node's own directly),
        then reads the record again after each status event of the run — no polling,
        and nothing missed between the read and the wait."""
        feed = self._shared.feed
        assert feed is not None, "a supervisor always has a feed"
        with feed.subscribe(conversation_id) as subscription, trio.move_on_after(timeout_seconds):
            ended = False
            while not ended:
                record = await self.get_run(conversation_id, run_id)
                if record.status in TERMINAL:
                    return record
                item = await subscription.receive()
                while not _is_status_of(item, run_id) and not isinstance(item, StreamEnd):
                    item = await subscription.receive()
                ended = isinstance(item, StreamEnd)  # (shutdown, deleted): one last read
            record = await self.get_run(conversation_id, run_id)
            return record if record.status in TERMINAL else None
        return None

    def queue_position(self, run_id: str) -> int | None:
        """1-based place in the line for a run slot (= the order runs will start)."""
        return self._shared.line.position(run_id)

    def with_position(self, record: RunRecord) -> RunRecord:
        """``record`` with its live ``queue_position`` filled in."""
        return _positioned(record, self._shared.line.position(record.id))

    def active_runs(
        self, limit: int | None = None, *, running: bool | None = None
    ) -> list[tuple[str, bool, int | None]]:
        """``(run_id, holds_slot, queue_position)`` of active runs: those holding a slot
        first, then the slot line in start order, then runs waiting for their conversation.
        ``running`` keeps only runs that hold (True) or wait for (False) a slot. At most
        ``limit``: found without walking the rest of a long line."""
        runs, line = self._shared.runs, self._shared.line
        parts: list[Iterable[tuple[str, bool, int | None]]] = []
        if running in (None, True):
            parts.append((h.run_id, True, None) for h in runs if h.holds_slot)
        if running in (None, False):
            parts.append((run_id, False, n) for n, run_id in enumerate(line, start=1))
            parts.append(
                (h.run_id, False, None) for h in runs if not h.holds_slot and h.run_id not in line
            )
        return list(itertools.islice(itertools.chain(*parts), limit))

    def statistics(self) -> SupervisorStatistics:
        """The supervisor's load, as one frozen record."""
        shared, desk = self._shared, self._desk
        io, tool = shared.io_limiter.statistics(), shared.tool_limiter.statistics()
        return SupervisorStatistics(
            running=shared.line.seated,
            queued=desk.queued(),
            waiting_for_slot=len(shared.line),
            run_threads_alive=shared.run_threads.borrowed_tokens,
            max_concurrent_runs=int(self._run_limiter.total_tokens),
            max_queued_runs=desk.max_queued_runs,
            io_borrowed=io.borrowed_tokens,
            io_total=int(io.total_tokens),
            io_waiting=io.tasks_waiting,
            tool_borrowed=tool.borrowed_tokens,
            tool_total=int(tool.total_tokens),
            tool_waiting=tool.tasks_waiting,
            draining=desk.draining,
        )


def _positioned(record: RunRecord, position: int | None) -> RunRecord:
    if position is None:
        return record
    return record.model_copy(update={"queue_position": position})


def _is_status_of(item: Event | Delta | StreamEnd, run_id: str) -> bool:
    return isinstance(item, Event) and item.kind == "status" and item.run_id == run_id
