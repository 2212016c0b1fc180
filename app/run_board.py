"""The run board: what is running, what waits and in what order — read, never changed.

Like a departures board, it shows the supervisor's state without touching it: the counts of
:class:`~app.handles.SupervisorStatistics` (``GET /api/server``, ``GET /metrics``, the
server feed's frames), the active runs in start order (``GET /api/runs``, the server
stream's snapshot), and each waiting run's live ``queue_position`` (on every run record an
HTTP handler returns).

Everything is read on the Trio thread, where that state lives, in one synchronous step: what
the board shows is consistent, and never costs more than O(log n) per run (a position is a
bisection of the slot line) — :meth:`RunBoard.active_runs` stops after ``limit`` instead of
walking a long line. The one ``async`` method reads a run record through the I/O limiter.

Ownership: the supervisor creates the board; it owns no task, no thread and no state of
its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import trio

from app.admission import AdmissionDesk
from app.handles import SupervisorStatistics
from app.records import RunRecord
from app.run_task import RunShared


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
        return self.with_position(await shared.io(shared.store.get_run, conversation_id, run_id))

    def queue_position(self, run_id: str) -> int | None:
        """1-based place in the line for a run slot (= the order runs will start)."""
        return self._shared.line.position(run_id)

    def with_position(self, record: RunRecord) -> RunRecord:
        """``record`` with its live ``queue_position`` filled in."""
        position = self._shared.line.position(record.id)
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
