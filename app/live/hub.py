"""The live side of a supervisor: its feeds, its webhooks, and the store listeners behind them.

Everything a client can follow live hangs off the store's commit listeners, and every part
must be opened, flushed and ended in the same order relative to the runs. The hub holds the
parts together so that the supervisor does that in one place:

=================  ======================================================================
``feed``           :class:`~app.live.feed.LocalFeed`: each conversation's new events and
                   its runs' live text fragments (``…/events/stream``, ``…/events/ws``)
``server_feed``    :class:`~app.live.server_feed.ServerFeed`: the server's changes
                   (``GET /api/events/stream``, the dashboard)
``webhooks``       :class:`~app.live.webhooks.WebhookDispatcher`: a POST when a run ends
``listeners``      other store listeners with the same lifetime (the metrics' event count)
=================  ======================================================================

Ownership and order:
    The supervisor creates the hub and, in ``serve()``, opens it (:meth:`LiveHub.open`)
    after crash recovery — whose pauses are no news to anyone — and before the first run is
    admitted; it starts :meth:`WebhookDispatcher.serve` in its own nursery: the hub owns
    no task. At a drain, once every run's final status is committed,
    :meth:`LiveHub.close_after_drain` *first* flushes the feed (the hops to the Trio thread
    are FIFO, and the server feed's share it), so that every stream gets the final statuses,
    *then* ends the streams with the drain's reason, *then* gives the webhooks of those
    statuses what is left of the drain's deadline. Deleting a conversation does the same for
    it alone (:meth:`LiveHub.conversation_deleted`). However ``serve()`` ends — drained,
    failed or cancelled — :meth:`LiveHub.close` (synchronous, so it runs even in a cancelled
    scope) removes the listeners and ends every stream still open with ``shutdown``.

Cancellation:
    :meth:`LiveHub.close_after_drain` and :meth:`LiveHub.conversation_deleted` wait only for
    the flush (one trip through the Trio thread's FIFO) and, at a drain, for the webhook
    dispatcher, which its deadline bounds. If cancelled, the streams they would have ended
    are ended by :meth:`LiveHub.close` when ``serve()`` ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.events import Event
from app.live.feed import LocalFeed
from app.live.server_feed import RunView, ServerFeed
from app.live.webhooks import WebhookDispatcher
from app.settings import Settings
from app.store.base import EventStore

#: A store listener: called after each commit with the events it appended (any thread,
#: write lock held: it must not block).
Listener = Callable[[list[Event]], None]


class LiveHub:
    """The supervisor's feeds and webhook dispatcher (see the module docstring).

    ``view`` is what the server feed reads while it makes a frame (the supervisor); ``io``
    runs the dispatcher's store calls on the supervisor's I/O limiter. Trio thread only.
    """

    def __init__(
        self,
        settings: Settings,
        store: EventStore,
        *,
        view: RunView,
        io: Callable[..., Awaitable[Any]],
        listeners: Sequence[Listener] = (),
    ) -> None:
        self._store = store
        #: Where streams get new events (fed by the store after each commit) and the runs'
        #: live text fragments.
        self.feed = LocalFeed(settings.stream_buffer_events)
        #: The server-wide stream's feed: status changes, limits, conversations, steps.
        self.server_feed = ServerFeed(
            view,
            buffer_events=settings.stream_buffer_events,
            retain_events=settings.server_stream_retain_events,
        )
        #: POSTs to a conversation's webhook when each of its runs ends (store listener).
        self.webhooks = WebhookDispatcher(settings, store, io)
        self._listeners = (self.feed.publish, self.webhooks.listen, *listeners)

    def open(self) -> None:
        """Start taking the store's events (call on the Trio thread that delivers them)."""
        self.feed.open()
        for listener in self._listeners:
            self._store.add_listener(listener)
        self.server_feed.open(self._store)

    def close(self) -> None:
        """Stop taking events; end every stream still open with ``shutdown`` (once, after
        :meth:`open`)."""
        for listener in self._listeners:
            self._store.remove_listener(listener)
        self.feed.end_all("shutdown")
        self.server_feed.close(self._store)

    async def close_after_drain(self, reason: str, deadline: float) -> None:
        """Every run's end is committed: deliver the final statuses to the streams, end
        them with ``reason``, then close the webhook dispatcher by ``deadline`` (Trio time).
        """
        await self.feed.flush()  # streams get every final status, then their end
        self.feed.end_all(reason)
        self.server_feed.end_all(reason)  # its hops share the flushed FIFO
        await self.webhooks.aclose(deadline)  # the final statuses' webhooks, bounded

    async def conversation_deleted(self, conversation_id: str) -> None:
        """The conversation is gone from the store: drop its pending webhooks, end its
        streams with ``deleted`` once its last events are delivered, and tell the server
        stream."""
        self.webhooks.forget(conversation_id)  # its pending deliveries: dropped
        await self.feed.flush()
        self.feed.end_conversation(conversation_id, "deleted")
        self.server_feed.conversation_changed(conversation_id, "deleted")

    def limits_changed(self) -> None:
        """The run limits were changed at runtime: a ``limits`` frame for the server stream."""
        self.server_feed.limits_changed()
