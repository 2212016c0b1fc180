"""The run slots and the line in front of them: every decision made at once, in order.

Think of the run slots as a sofa with ``max_concurrent_runs`` seats (the run limiter). A run
that is admitted while a seat is free and nobody is waiting sits down *at admission*, in the
same synchronous step that decides to admit it: it is running-or-about-to, never "queued".
A run that finds the sofa full takes the last place in the line. When a seat frees up (a
thread returned, or the limit was raised), the head of the line is seated right there, in
the same step. Nothing ever waits on the limiter itself.

Why decide synchronously? If each run task acquired its own token later, runs admitted
while slots were free would count as queued until their tasks got scheduled — a burst of
requests then saw the queue as fuller than it was (429 while places were free) and read
repeated positions (``[1, 1, 2, 2, …]``). Here the counts are exact at every moment:
``running`` is the limiter's borrowed tokens, ``queued`` the length of the line, and a run's
``queue_position`` is the order in which it will be seated.

Positions are O(log n): each run gets an increasing ticket when it joins, the line is a
sorted list of tickets, and a position is the number of tickets ahead (a bisection). Runs
leave from the middle when they are cancelled while waiting; the others move up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio
from sortedcontainers import SortedList

from app.handles import RunHandle


class SlotLine:
    """A FIFO line of runs in front of ``limiter``, which it alone acquires and releases."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._tickets: SortedList = SortedList()  # tickets of waiting runs, in seating order
        self._by_ticket: dict[int, RunHandle] = {}
        self._ticket_of: dict[str, int] = {}
        self._next_ticket = 0
        #: Called (Trio thread, must not block) whenever a slot is left free after
        #: :meth:`fill`: a cluster node claims queued runs then (``app/cluster/claims.py``).
        self.on_free: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._tickets)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._ticket_of

    def __iter__(self) -> Iterator[str]:
        """Run ids of the waiting runs, head first (lazily: do not change the line while
        iterating)."""
        return (self._by_ticket[ticket].run_id for ticket in self._tickets)

    @property
    def seated(self) -> int:
        """Runs holding a slot (their threads may still be starting or stopping)."""
        return self._limiter.borrowed_tokens

    def admit(self, handle: RunHandle) -> int | None:
        """Seat the run if a slot is free and nobody waits, else take the last place.

        Synchronous: the decision is made here. Returns the 1-based queue position, or
        ``None`` when the run was seated.
        """
        if not self._tickets and self._slot_free():
            self._seat(handle)
            return None
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets.add(ticket)
        self._by_ticket[ticket] = handle
        self._ticket_of[handle.run_id] = ticket
        return len(self._tickets)

    async def wait_until_seated(self, handle: RunHandle) -> None:
        """Return once ``handle`` holds a slot.

        Cancellation:
            A run cancelled while it waits leaves the line and never takes a slot; the
            others move up. A run seated just before the cancel arrived keeps its slot:
            the caller releases it (:meth:`release`).
        """
        try:
            await handle.seated.wait()
        finally:
            self.leave(handle.run_id)

    def release(self, handle: RunHandle) -> None:
        """Give back the run's slot (no-op if it holds none) and seat the line's head."""
        if handle.holds_slot:
            handle.holds_slot = False
            self._limiter.release_on_behalf_of(handle)
        self.fill()

    def fill(self) -> None:
        """Seat waiting runs, head first, while slots are free (after a release, or after
        ``max_concurrent_runs`` was raised)."""
        while self._tickets and self._slot_free():
            ticket = self._tickets.pop(0)
            handle = self._by_ticket.pop(ticket)
            del self._ticket_of[handle.run_id]
            self._seat(handle)
        if self.on_free is not None and self._slot_free():
            self.on_free()

    def position(self, run_id: str) -> int | None:
        """1-based place in the line (= the order in which runs will be seated), or
        ``None`` if the run does not wait in it. O(log n)."""
        ticket = self._ticket_of.get(run_id)
        if ticket is None:
            return None
        return int(self._tickets.bisect_left(ticket)) + 1

    def leave(self, run_id: str) -> None:
        """Step out of the line (no-op if not in it). Frees no slot: nothing to fill."""
        ticket = self._ticket_of.pop(run_id, None)
        if ticket is not None:
            self._tickets.remove(ticket)
            del self._by_ticket[ticket]

    def _slot_free(self) -> bool:
        return self._limiter.borrowed_tokens < self._limiter.total_tokens

    def _seat(self, handle: RunHandle) -> None:
        self._limiter.acquire_on_behalf_of_nowait(handle)
        handle.holds_slot = True
        handle.seated.set()
