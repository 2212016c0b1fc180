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
   transaction.
3. **Launch** the run task in the supervisor's nursery — or, if the write failed, **undo**
   the reservation: the slot or the place goes to the next run, and nothing was stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.handles import RunHandle
from app.records import RunRecord


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

    @property
    def run_id(self) -> str:
        return self.handle.run_id

    @property
    def activate(self) -> bool:
        """Whether the run becomes its conversation's current run at once (no earlier
        active run to wait for)."""
        return self.handle.previous is None

    def present(self, record: RunRecord) -> RunRecord:
        """The run's record as the admitting request reports it: with the position it
        was given. (A replay of the request reports exactly the same.)"""
        if self.position is None:
            return record
        return record.model_copy(update={"queue_position": self.position})
