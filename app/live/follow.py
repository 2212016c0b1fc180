"""Following one conversation: what every stream sends, whatever its transport.

:func:`follow_conversation` is an async generator of typed items — :class:`~app.events.Event`,
:class:`~app.live.feed.Delta`, :class:`Heartbeat`, then one :class:`End` — that the SSE
stream (``app/api/streams.py``) and the WebSocket stream (``app/api/ws_stream.py``) only
*render*. It yields them in batches of what is ready at once (a replay page, or one live
item), so that a transport may write a batch with one send: SSE does, and replays ~10x
faster for it. The rules live here once:

1. **Subscribe first, replay from the store, then follow the feed** (see
   :mod:`app.live.feed`), dropping every ``seq`` already sent: an event committed during
   the replay comes both ways and is yielded once; none can fall between the two. Should
   the feed ever skip ahead, the gap is read from the store.
2. **The position** is the seq of the last event yielded *or skipped by the kinds filter*:
   a client that resumes after it gets exactly what follows. A delta never moves it.
3. **Deltas** (text an agent is producing, not stored) are yielded when ``kinds`` is
   ``None`` or includes ``message``, and only when *fresh*: a delta that the feed delivers
   before an event which the replay already yielded was produced before that event — it may
   be the fragment of a message the client already has in full — and is dropped.
4. **A heartbeat** after ``stream_heartbeat_seconds`` without anything to yield, so that
   the transport can keep idle connections open.
5. **The end** says why (``deleted``, ``shutdown``, ``slow_consumer``) and the position to
   resume from; nothing follows it. A conversation deleted while the replay reads the store
   ends with ``deleted`` too.

Cancellation and ownership: the generator subscribes when it is first iterated (a stream
never started leaves no subscription) and closes the subscription when it finishes or is
closed. The caller owns it: iterate it inside ``contextlib.aclosing`` so that a cancelled
stream (a client gone) closes it at once. It starts no task.

Errors: a store failure other than "not found" (e.g. :class:`~app.errors.StoreUnavailable`)
propagates to the caller, which decides how its transport reports it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from app.errors import NotFound
from app.events import Event
from app.live.feed import Delta, StreamEnd, Subscription
from app.store.base import EventQuery

if TYPE_CHECKING:
    from app.supervisor import RunSupervisor

REPLAY_PAGE = 1000  # events per store read while replaying: one io-limiter hop per page


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing happened for ``stream_heartbeat_seconds``."""


@dataclass(frozen=True, slots=True)
class End:
    """The last item: why the stream ends, and the ``seq`` to resume after."""

    reason: str
    last_seq: int


FollowItem = Event | Delta | Heartbeat | End


class _Position:
    """Where the stream stands: ``seq`` (last event yielded or filtered out) and ``fed``
    (the highest seq the feed itself delivered; tells a fresh delta from a stale one)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.fed = 0


async def follow_conversation(
    sup: RunSupervisor,
    conversation_id: str,
    after_seq: int,
    kinds: frozenset[str] | None,
) -> AsyncGenerator[list[FollowItem], None]:
    """The conversation's events after ``after_seq`` (those of ``kinds``, or all), then the
    live ones and deltas, heartbeats while idle, and an :class:`End` (module docstring).

    Items come in batches of what is ready at once — a page of the replay, or one live
    item — never empty, so that a transport can write a batch with one send."""
    with sup.feed.subscribe(conversation_id) as subscription:
        position = _Position(after_seq)
        try:
            async with aclosing(_pages(sup, conversation_id, after_seq, None)) as pages:
                async for page in pages:
                    if batch := _new(page, position, kinds):
                        yield batch
            async with aclosing(_live(sup, subscription, position, kinds)) as live:
                async for batch in live:
                    yield batch
        except NotFound:  # deleted while the stream read from the store
            yield [End("deleted", position.seq)]


async def _live(
    sup: RunSupervisor,
    subscription: Subscription,
    position: _Position,
    kinds: frozenset[str] | None,
) -> AsyncGenerator[list[FollowItem], None]:
    """Follow the subscription until its end."""
    heartbeat = sup.settings.stream_heartbeat_seconds
    while True:
        with trio.move_on_after(heartbeat) as idle:
            item = await subscription.receive()
        if idle.cancelled_caught:
            yield [Heartbeat()]
        elif isinstance(item, StreamEnd):
            yield [End(item.reason, position.seq)]
            return
        elif isinstance(item, Delta):
            if _wants_delta(item, position, kinds):
                yield [item]
        else:
            position.fed = max(position.fed, item.seq)
            events = [item]
            if item.seq > position.seq + 1:  # never expected: read what the feed skipped
                gap = _pages(sup, item.conversation_id, position.seq, item.seq)
                async with aclosing(gap) as missed:
                    events = [event async for page in missed for event in page] + events
            if batch := _new(events, position, kinds):
                yield batch


def _new(
    events: list[Event], position: _Position, kinds: frozenset[str] | None
) -> list[FollowItem]:
    """The new and wanted ``events``; advances the position past every new one."""
    batch: list[FollowItem] = []
    for event in events:
        if event.seq > position.seq:
            position.seq = event.seq
            if kinds is None or event.payload.kind in kinds:
                batch.append(event)
    return batch


def _wants_delta(delta: Delta, position: _Position, kinds: frozenset[str] | None) -> bool:
    """Whether to yield ``delta``: deltas belong to messages, and a stale one is dropped.

    Fresh means the delta knows every event yielded so far (its ``after_seq`` reaches the
    position; 0 is "unknown" and counts as fresh), or the feed itself has delivered up to
    the position, so the delta comes after all of it in publishing order."""
    if kinds is not None and "message" not in kinds:
        return False
    return delta.after_seq == 0 or delta.after_seq >= position.seq or position.fed >= position.seq


async def _pages(
    sup: RunSupervisor, conversation_id: str, after: int, before: int | None
) -> AsyncGenerator[list[Event], None]:
    """The stored events after ``after`` (and before ``before``), oldest first, a page at
    a time."""
    while True:
        query = EventQuery(after_seq=after, before_seq=before, limit=REPLAY_PAGE)
        page = await sup.io(sup.store.search_events, conversation_id, query)
        if page.items:
            yield list(page.items)
        if page.next_seq is None:
            return
        after = page.next_seq
