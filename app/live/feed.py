"""Where new events come from: one small protocol, like the store.

A stream follows a conversation in two parts: what is already stored (read from the store)
and what is appended from now on (this feed). The rule that makes the seam invisible:
**subscribe first, then replay from the store, then drop what was already seen (by
``seq``)**. An event committed during the replay arrives both ways and is shown once; none
can fall between the two.

:class:`EventFeed` is the protocol. :class:`LocalFeed` is the one-process implementation:
the store calls :meth:`LocalFeed.publish` after each commit (in commit order, from whatever
thread committed), and the events hop to the Trio thread, where each subscriber has a
bounded buffer. Several nodes put PostgreSQL LISTEN/NOTIFY behind it: another node's
events are read from the store by ``app/cluster/changes.py`` and handed to
:meth:`LocalFeed.deliver` on the Trio thread.

**The watermark**: per followed conversation, the feed keeps the highest ``seq`` it has
delivered (:meth:`LocalFeed.watermark`) and drops an event at or below it, so that an event
that arrives both ways (committed here, and read back by the cluster part) is delivered once.
A node's own commits arrive in ``seq`` order, so for them this changes nothing. When two
nodes write one conversation, this node's own event can arrive before an earlier one of the
other node's: the stream sees a gap and reads it from the store (rule 1 of
``app/live/follow.py``), and the late event is dropped as already passed.

A subscriber that does not keep up never slows a run or another subscriber: publishing
never waits. When its buffer is full it is *dropped* — its stream ends with the reason
``slow_consumer`` and the client resumes from its last ``seq``.

Token deltas ride the same feed: :meth:`LocalFeed.publish_delta` hands a :class:`Delta` (a
fragment of text an agent is producing, not stored, without a ``seq``) to the conversation's
subscribers, in order with its events. A stream that was not connected when a delta passed
never sees it; the complete message arrives as a stored event all the same.

Ownership: the supervisor opens its feed (:meth:`LocalFeed.open`, on the Trio thread) when
it starts serving, and closes it after the drain, which ends every stream with ``shutdown``
once the final statuses were delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

import trio

from app.events import Event

T = TypeVar("T")
log = logging.getLogger("trellis.live")


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last item a subscription receives: why its stream ends (``deleted``,
    ``shutdown``, ``slow_consumer``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Delta:
    """A fragment of text an agent is producing right now (e.g. a model's tokens).

    Ephemeral: not stored and without a ``seq``. ``after_seq`` is the seq of the last event
    the run had committed when the fragment was produced (0 when unknown); the message the
    fragments make up is stored later as an ordinary event."""

    conversation_id: str
    run_id: str
    text: str
    after_seq: int = 0


class Mailbox(Generic[T]):
    """A bounded buffer of items for one reader, then a :class:`StreamEnd`.

    The writer never waits: :meth:`deliver` queues an item, or, when the reader has let
    ``buffer_events`` items pile up, ends the mailbox with ``slow_consumer`` instead — a
    *drop*, which it reports by calling ``dropped`` (once), so that its feed counts it.
    ``leave`` is called when the mailbox ends or closes, so that its feed forgets it.
    Trio thread only. Close it when done (``with`` block).
    """

    def __init__(
        self, buffer_events: int, leave: Callable[[], None], dropped: Callable[[], None]
    ) -> None:
        self._leave = leave
        self._dropped = dropped
        # One extra slot, so that the end can always be queued after a full buffer.
        self._send, self._receive = trio.open_memory_channel[T | StreamEnd](buffer_events + 1)
        self._capacity = buffer_events
        self.ended: StreamEnd | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def receive(self) -> T | StreamEnd:
        """The next item, or the end. After the end, the end again."""
        if self.ended is not None and self._receive.statistics().current_buffer_used == 0:
            return self.ended
        return await self._receive.receive()

    def deliver(self, item: T) -> None:
        """Queue ``item`` (Trio thread); past the buffer's bound, end the mailbox."""
        if self.ended is not None:
            return
        if self._receive.statistics().current_buffer_used >= self._capacity:
            self.end(StreamEnd("slow_consumer"))
            self._dropped()
            return
        self._send.send_nowait(item)

    def end(self, end: StreamEnd) -> None:
        """Queue the end after what is buffered; nothing is delivered after it."""
        if self.ended is None:
            self.ended = end
            self._send.send_nowait(end)
            self._leave()

    def close(self) -> None:
        self._leave()
        self._send.close()


class Subscription(Mailbox[Event | Delta]):
    """New events (and deltas) of one conversation, in ``seq`` order, then a :class:`StreamEnd`.

    Trio thread only. Close it when done (``with`` block): it leaves the feed.
    """

    def __init__(self, feed: LocalFeed, conversation_id: str, buffer_events: int) -> None:
        super().__init__(buffer_events, lambda: feed.forget(self), feed.count_drop)
        self.conversation_id = conversation_id


class EventFeed(Protocol):
    """Where new events come from."""

    def subscribe(self, conversation_id: str) -> Subscription: ...
    def publish(self, events: list[Event]) -> None:
        """From any thread, right after the commit that appended ``events``."""
        ...

    def publish_delta(self, delta: Delta) -> None:
        """From any thread: a fragment of text for the live subscribers only."""
        ...

    def end_conversation(self, conversation_id: str, reason: str) -> None: ...
    def end_all(self, reason: str) -> None: ...


class LocalFeed:
    """The in-process :class:`EventFeed` (see the module docstring)."""

    def __init__(self, buffer_events: int = 1000) -> None:
        self.buffer_events = buffer_events
        self._subscribers: dict[str, set[Subscription]] = {}
        #: The highest seq delivered, per followed conversation (the module docstring).
        self._seen: dict[str, int] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        #: Subscriptions ended because their reader fell behind (``GET /metrics`` reads it).
        self.drops = 0

    def __len__(self) -> int:
        """Subscriptions open right now."""
        return sum(len(subs) for subs in self._subscribers.values())

    def open(self) -> None:
        """Start taking events (call on the Trio thread that will deliver them)."""
        self._token = trio.lowlevel.current_trio_token()

    def subscribe(self, conversation_id: str) -> Subscription:
        subscription = Subscription(self, conversation_id, self.buffer_events)
        self._subscribers.setdefault(conversation_id, set()).add(subscription)
        return subscription

    def count_drop(self) -> None:
        """A subscription was dropped as a slow consumer (its mailbox calls this)."""
        self.drops += 1

    def forget(self, subscription: Subscription) -> None:
        subs = self._subscribers.get(subscription.conversation_id)
        if subs is not None:
            subs.discard(subscription)
            if not subs:
                del self._subscribers[subscription.conversation_id]
                self._seen.pop(subscription.conversation_id, None)

    def publish(self, events: Sequence[Event | Delta]) -> None:
        """Hand ``events`` to the Trio thread; never blocks (the store's write lock is held).

        Events of conversations nobody follows right now are not handed over at all (most
        commits: a run's steps, with no stream open): a racy peek, and a safe one, because a
        stream subscribes *before* it replays from the store — one that subscribes after
        this peek replays these events, already committed, from the store."""
        token = self._token
        if token is None or not any(item.conversation_id in self._subscribers for item in events):
            return
        try:
            token.run_sync_soon(self.deliver, events)
        except trio.RunFinishedError:
            self._token = None

    def publish_delta(self, delta: Delta) -> None:
        """Hand ``delta`` to the Trio thread (never blocks); dropped when nobody listens."""
        if delta.conversation_id in self._subscribers:  # a racy peek is fine: best effort
            self.publish([delta])

    def deliver(self, items: Sequence[Event | Delta]) -> None:
        """Hand ``items`` to their conversations' subscribers now (Trio thread), in order;
        an event at or below its conversation's watermark is dropped (seen already)."""
        for item in items:
            subscriptions = self._subscribers.get(item.conversation_id)
            if not subscriptions:
                continue
            if isinstance(item, Event):
                if item.seq <= self._seen.get(item.conversation_id, 0):
                    continue
                self._seen[item.conversation_id] = item.seq
            for subscription in list(subscriptions):
                subscription.deliver(item)

    def followed(self) -> list[str]:
        """The conversations that have subscribers right now."""
        return list(self._subscribers)

    def is_followed(self, conversation_id: str) -> bool:
        return conversation_id in self._subscribers

    def watermark(self, conversation_id: str) -> int | None:
        """The highest seq delivered to the conversation's subscribers since the first of
        them subscribed (``None``: nothing yet, or nobody follows it)."""
        return self._seen.get(conversation_id)

    def assume_delivered(self, conversation_id: str, seq: int) -> None:
        """Set the watermark of a followed conversation that has none yet: its subscribers
        need nothing up to ``seq`` from the feed (the caller knows it was committed before
        they subscribed, so their replay from the store has it)."""
        if conversation_id in self._subscribers:
            self._seen.setdefault(conversation_id, seq)

    def end_conversation(self, conversation_id: str, reason: str) -> None:
        """End the conversation's streams after what they have buffered (e.g. ``deleted``).

        Events still on their way from another thread are not waited for: call
        :meth:`flush` first when they must be delivered before the end."""
        for subscription in list(self._subscribers.get(conversation_id, ())):
            subscription.end(StreamEnd(reason))

    def end_all(self, reason: str) -> None:
        for subs in list(self._subscribers.values()):
            for subscription in list(subs):
                subscription.end(StreamEnd(reason))

    async def flush(self) -> None:
        """Return once every event published before this call has been delivered (the
        hops are FIFO: a hop queued now runs after them)."""
        token = self._token
        if token is None:
            return
        done = trio.Event()
        token.run_sync_soon(done.set)
        await done.wait()
