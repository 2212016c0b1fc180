"""The line of runs waiting for a run slot: first come, first seated — by construction.

Why not just ``await run_limiter.acquire_on_behalf_of(...)`` from every run task? The
limiter is FIFO in the order tasks *call* it, and Trio schedules newly started tasks in an
unspecified order: two runs admitted in one request batch could swap places. Here the order
is fixed at admission (:meth:`SlotLine.join`, synchronous), and only the run at the head of
the line ever waits on the limiter, so the reported ``queue_position`` is the start order.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio


class SlotLine:
    """A FIFO of run ids in front of ``limiter``."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._line: dict[str, trio.Event] = {}  # run id → "you are at the head"

    def __len__(self) -> int:
        return len(self._line)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._line

    def __iter__(self) -> Iterator[str]:
        return iter(self._line)

    def join(self, run_id: str) -> None:
        """Take the last place in the line (synchronous: the order is decided here)."""
        at_head = trio.Event()
        if not self._line:
            at_head.set()
        self._line[run_id] = at_head

    async def wait_for_slot(self, run_id: str, borrower: object) -> None:
        """Wait for the head of the line, then for a slot; acquired on behalf of ``borrower``.

        Cancellation:
            Leaving the line (cancelled while waiting) never takes a slot, and lets the next
            run move up.
        """
        try:
            await self._line[run_id].wait()
            await self._limiter.acquire_on_behalf_of(borrower)
        finally:
            self.leave(run_id)

    def position(self, run_id: str) -> int | None:
        """1-based place in the line, or ``None`` if not in it."""
        for position, waiting in enumerate(self._line, start=1):
            if waiting == run_id:
                return position
        return None

    def leave(self, run_id: str) -> None:
        """Step out of the line (no-op if not in it); the next run may move to the head."""
        if run_id not in self._line:
            return
        was_head = next(iter(self._line)) == run_id
        del self._line[run_id]
        if was_head and self._line:
            self._line[next(iter(self._line))].set()
