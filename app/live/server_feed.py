"""The server-wide feed: what changes on the whole server, numbered, for dashboards.

Where :class:`~app.live.feed.LocalFeed` carries one conversation's stored events, this feed
carries the *server's* changes as :class:`ServerFrame` records, each numbered by a sequence
of its own (``seq`` 1, 2, 3 … per server process, unrelated to conversation seqs):

================  =========================================================================
``status``        a conversation (and run) changed status: one per stored ``status`` event
                  of any conversation, with the run's queue position and the running/queued
                  counts as the supervisor sees them when the frame is made
``limits``        the run limits were changed at runtime
``conversation``  a conversation was ``created`` (made once the creation committed: the
                  ``queued`` status of a run started with it comes first) or ``deleted``
``step``          a run completed a step — *ephemeral*: no ``seq``, not retained, made only
                  while someone listens
================  =========================================================================

The last ``server_stream_retain_events`` numbered frames are retained in a ring, so a client
that reconnects with the last ``seq`` it saw gets exactly the frames it missed
(:meth:`ServerFeed.retained_after`); when they are no longer all there, it needs a
snapshot of the whole state instead (built by ``app/api/server_stream.py``).

Publishing never blocks and never waits for a subscriber: each subscriber has a bounded
:class:`~app.live.feed.Mailbox`, ended with ``slow_consumer`` when it falls
``stream_buffer_events`` behind (counted in :attr:`ServerFeed.drops`, as ``LocalFeed``
counts its own). Every frame is made on the Trio thread — status events and steps hop there
from the thread that committed them (``run_sync_soon``, FIFO: commit order is kept) — so
reading the supervisor's state while making one is safe, and costs O(log n) at most (a
queue position is a bisection of the slot line; nothing walks the line).

Ownership: the supervisor creates the feed, opens it when it starts serving (which makes it
the store's listener), and ends every subscription with ``shutdown`` after a drain, once
the final statuses were delivered (:meth:`ServerFeed.end_all`, after a flush).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from app.events import Event, StatusPayload, utc_now
from app.lifecycle import Status
from app.live.feed import Mailbox, StreamEnd

if TYPE_CHECKING:  # only types: the supervisor's modules import this one
    from app.handles import SupervisorStatistics
    from app.store.base import EventStore

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerFrame:
    """One change of the server. ``data`` is the frame's JSON object (it holds ``seq``,
    ``type`` and ``time`` too); ``seq`` is ``None`` for an ephemeral frame."""

    seq: int | None
    type: str
    data: dict[str, Any]


class RunView(Protocol):
    """What the feed reads from the supervisor while it makes a frame (Trio thread)."""

    def queue_position(self, run_id: str) -> int | None: ...
    def statistics(self) -> SupervisorStatistics: ...


class ServerSubscription(Mailbox[ServerFrame]):
    """The server's frames from the moment of subscribing, then a :class:`StreamEnd`.

    Trio thread only. Close it when done (``with`` block): it leaves the feed.
    """

    def __init__(self, feed: ServerFeed, buffer_events: int) -> None:
        super().__init__(buffer_events, lambda: feed.forget(self), feed.count_drop)


class ServerFeed:
    """The server-wide feed (see the module docstring)."""

    def __init__(self, view: RunView, *, buffer_events: int, retain_events: int) -> None:
        self.buffer_events = buffer_events
        self.started_at = utc_now()
        self._view = view
        self._seq = 0
        self._retained: deque[ServerFrame] = deque(maxlen=retain_events)
        self._subscribers: set[ServerSubscription] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        #: Subscriptions ended because their reader fell behind (``GET /metrics`` reads it).
        self.drops = 0

    def __len__(self) -> int:
        """Subscriptions open right now."""
        return len(self._subscribers)

    @property
    def seq(self) -> int:
        """The ``seq`` of the last numbered frame (0 before the first)."""
        return self._seq

    # -- lifetime (Trio thread) ------------------------------------------------------------

    def open(self, store: EventStore) -> None:
        """Start taking the store's status events (call on the Trio thread that makes
        the frames)."""
        self._token = trio.lowlevel.current_trio_token()
        store.add_listener(self.publish)

    def close(self, store: EventStore) -> None:
        """Stop taking events and end every subscription with ``shutdown``."""
        store.remove_listener(self.publish)
        self.end_all("shutdown")

    def end_all(self, reason: str) -> None:
        """End every subscription after what it has buffered. Frames still on their way
        from another thread are not waited for: flush first (see ``LocalFeed.flush``)."""
        for subscription in list(self._subscribers):
            subscription.end(StreamEnd(reason))

    # -- subscribers (Trio thread) ---------------------------------------------------------

    def subscribe(self) -> ServerSubscription:
        """A subscription to every frame made from now on. Take :meth:`retained_after` (or
        a snapshot) in the same synchronous step: then nothing falls between the two."""
        subscription = ServerSubscription(self, self.buffer_events)
        self._subscribers.add(subscription)
        return subscription

    def count_drop(self) -> None:
        """A subscription was dropped as a slow consumer (its mailbox calls this)."""
        self.drops += 1

    def forget(self, subscription: ServerSubscription) -> None:
        self._subscribers.discard(subscription)

    def retained_after(self, seq: int) -> list[ServerFrame] | None:
        """Exactly the frames after ``seq``, or ``None`` when that cannot be given — ``seq``
        is 0 (a first connection), older than the ring, or newer than this process's last
        frame (a previous process's): the client then needs a snapshot."""
        if seq <= 0 or seq > self._seq:
            return None
        missed = self._seq - seq
        if missed > len(self._retained):
            return None
        return list(itertools.islice(self._retained, len(self._retained) - missed, None))

    # -- publishing ------------------------------------------------------------------------

    def publish(self, events: Sequence[Event]) -> None:
        """Store listener (any thread, write lock held): hand the commit's status events
        to the Trio thread. Never blocks; other events cost one type check each."""
        statuses = [event for event in events if isinstance(event.payload, StatusPayload)]
        if statuses:
            self._hop(self._make_status_frames, statuses)

    def publish_step(self, conversation_id: str, run_id: str, steps: int) -> None:
        """From a run thread after each step: an ephemeral ``step`` frame for whoever is
        connected now. Costs one (racy, best-effort) peek when nobody listens."""
        if self._subscribers:
            data = {"conversation_id": conversation_id, "run_id": run_id, "steps": steps}
            self._hop(self._broadcast, ServerFrame(None, "step", data))

    def limits_changed(self) -> None:
        """Trio thread: the run limits were changed (``RunSupervisor.set_limits``)."""
        stats = self._view.statistics()
        self._record(
            "limits",
            max_concurrent_runs=stats.max_concurrent_runs,
            max_queued_runs=stats.max_queued_runs,
        )

    def conversation_changed(self, conversation_id: str, change: str) -> None:
        """Trio thread: a conversation was ``created`` or ``deleted``."""
        self._record("conversation", conversation_id=conversation_id, change=change)

    def _hop(self, deliver: Callable[[T], object], item: T) -> None:
        """Call ``deliver(item)`` on the Trio thread soon (FIFO), from any thread."""
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(deliver, item)
        except trio.RunFinishedError:
            self._token = None

    def _make_status_frames(self, events: list[Event]) -> None:
        """Trio thread: one ``status`` frame per status event, with the live position of
        a run that waits for a slot and the counts as they are now (the same for the whole
        commit: nothing changes them while this runs)."""
        stats = self._view.statistics()
        for event in events:
            payload = event.payload
            if not isinstance(payload, StatusPayload):  # publish() passes status events only
                continue
            position = None
            if payload.status is Status.QUEUED and event.run_id is not None:
                position = self._view.queue_position(event.run_id)  # O(log n)
            self._record(
                "status",
                time=event.timestamp,
                conversation_id=event.conversation_id,
                run_id=event.run_id,
                status=payload.status.value,
                previous=payload.previous.value,
                reason=payload.reason,
                event_seq=event.seq,
                position=position,
                counts={"running": stats.running, "queued": stats.queued},
            )

    def _record(self, type_: str, *, time: datetime | None = None, **fields: Any) -> None:
        """Number a frame, retain it and hand it to every subscriber."""
        self._seq += 1
        moment = (time or utc_now()).isoformat()
        data = {"seq": self._seq, "type": type_, "time": moment, **fields}
        frame = ServerFrame(self._seq, type_, data)
        self._retained.append(frame)
        self._broadcast(frame)

    def _broadcast(self, frame: ServerFrame) -> None:
        for subscription in list(self._subscribers):
            subscription.deliver(frame)
