"""Other nodes' changes, seen on this node: cached records forgotten, streams fed.

Every write transaction on the shared database sends a *change note* per conversation it
changed — "node N committed K new events of conversation X, up to seq S" — delivered at its
COMMIT (``app/store/change_notes.py``). :class:`Changes`, a cluster part started from
``app/cluster/node.py``, listens on the store's changes channel
(``app/cluster/notifications.py``) and, for the notes of *other* nodes:

1. **forgets** those conversations' cached records (``store.forget_cached``, on the I/O
   limiter: it takes the store's write lock, which keeps the invariant of
   ``app/store/cache.py``; the next reader reads the record again);
2. **then feeds the streams**: for each conversation that has subscribers here
   (``app/live/feed.py``), reads the events after the feed's watermark from the store
   (``supervisor.io``, a page of :data:`PAGE` at a time) and delivers them in seq order.

This node's own notes are ignored: its events reach its feed through the store's commit
listener (``app/live/hub.py``), exactly as on SQLite.

Rules that make a subscriber get every event once, in order:

- *Forget, then feed*: a stream shows another node's event only after this node's cache
  forgot the record that event changed — a client that saw a final status in its stream
  and then reads the conversation sees that status. (A read forgets its conversation's
  record once more, after reading: a reader may have cached it again since the pump did.)
- *A note without events* (a run's step count, a deletion) is read too — only from the
  watermark, or for the conversation's existence: one deleted on another node ends its
  streams with ``deleted``.
- *One read at a time per conversation*: a note arriving while its conversation is being
  read makes that read go round once more; the read starts from the watermark (the highest
  seq delivered), and the feed drops what is at or below it, so nothing is delivered twice
  or skipped. At most :data:`READERS` reads run at once, whatever the number of notes.
- *A watermark for a new subscription*: until something is delivered, a followed
  conversation has none. The first note about it processed after the subscription sets it
  to the seq before that note's events: notes arrive in commit order, so that transaction
  is the first one after the subscription or an earlier one — its earlier events were in
  the store before the subscriber replayed it (``app/live/follow.py``, rule 1).
- *Lost notes* (the listener reconnected, or :data:`MAX_PENDING` conversations piled up
  unprocessed): the whole cache is forgotten and every followed conversation read again
  from its watermark. One without a watermark gets its newest event, so that its streams
  notice and read what they missed from the store (follow's gap rule).

Memory is bounded: the pending notes by :data:`MAX_PENDING` conversations, the reads to do
by the followed conversations (each queued at most once), the subscribers' buffers by the
feed.

Ownership and cancellation: :meth:`Changes.serve` runs in the node's nursery and owns the
listener (and its thread), the pump task and the reader tasks; all end when the node's
nursery is cancelled. A read is a store call on the I/O limiter: cancelling waits for it.

Errors: a read that fails (the database unreachable...) is logged and tried again with
backoff for as long as the conversation is followed; a conversation gone (deleted on
another node) ends its streams with ``deleted``. A note that does not parse is logged
and skipped.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio
from psycopg.conninfo import make_conninfo

from app.backoff import backoff_seconds
from app.cluster.notifications import Listener, Notification
from app.errors import NotFound
from app.store.base import INT64_MAX, EventPage, EventQuery, Order
from app.store.change_notes import ChangeNote
from app.store.sql_store import SqlStore

if TYPE_CHECKING:
    from app.supervisor import RunSupervisor

log = logging.getLogger("trellis.cluster")

#: Events per store read when feeding a stream (as follow.py's replay page).
PAGE = 1000
#: Store reads for streams at once: each holds one I/O-limiter thread, which handlers
#: share, so a burst of other nodes' commits never takes more than this many of them.
READERS = 4
#: Conversations whose notes may wait for the pump before they count as lost (a stalled
#: database): beyond, the node forgets every cached record and re-reads what it follows.
MAX_PENDING = 10_000

RETRY_BASE_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


class _Inbox:
    """Notes waiting for the pump: per conversation, the lowest ``seq_before`` among its
    notes with events (``None``: its notes had none); ``lost``: notes were lost."""

    def __init__(self) -> None:
        self.changed: dict[str, int | None] = {}
        self.lost = False

    def add(self, note: ChangeNote) -> None:
        if self.lost:
            return  # everything is read again anyway
        conversation_id = note.conversation_id
        if conversation_id not in self.changed and len(self.changed) >= MAX_PENDING:
            self.lose()
            return
        before = note.seq_before if note.count else None
        known = self.changed.get(conversation_id)
        if known is not None and (before is None or known < before):
            before = known
        self.changed[conversation_id] = before

    def lose(self) -> None:
        self.lost = True
        self.changed.clear()


class Changes:
    """The changes part of a cluster node (see the module docstring)."""

    def __init__(self, supervisor: RunSupervisor) -> None:
        store = supervisor.store
        if not isinstance(store, SqlStore) or store.changes_channel is None:
            raise TypeError(f"cluster changes need a PostgreSQL store, not {store!r}")
        self._supervisor = supervisor
        self._store = store
        self._feed = supervisor.feed
        self._channel = store.changes_channel
        self._inbox = _Inbox()
        self._arrived = trio.Event()
        self._send, self._receive = trio.open_memory_channel[str](math.inf)
        self._queued: set[str] = set()  # in the channel (each at most once)
        self._reading: set[str] = set()  # being read by a reader
        self._again: set[str] = set()  # noted while being read: read once more
        self._resync: set[str] = set()  # to read after lost notes

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, pump and read until cancelled; started once LISTEN is in place."""
        # Named, so that an operator (or a test) can tell this session in pg_stat_activity.
        url = make_conninfo(
            self._supervisor.store.cluster_url or "",
            application_name=f"trellis-changes-{self._store.node_id}",
        )
        listener = Listener(url, [self._channel], self._receive_notes, on_reconnect=self._lost)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump)
            for _ in range(READERS):
                nursery.start_soon(self._reader)
            await nursery.start(listener.serve)
            task_status.started()

    # -- notes (Trio thread, never blocks) --------------------------------------------------

    def _receive_notes(self, batch: list[Notification]) -> None:
        """The listener's batch: other nodes' notes into the inbox; wake the pump."""
        for notification in batch:
            note = ChangeNote.parse(notification.payload)
            if note is None:
                log.warning("ignoring a malformed change note: %r", notification.payload[:200])
            elif note.node_id != self._store.node_id:
                self._inbox.add(note)
                self._arrived.set()

    def _lost(self) -> None:
        """The listener reconnected: notes sent meanwhile are lost."""
        log.info("change notes may have been lost; re-reading every followed conversation")
        self._inbox.lose()
        self._arrived.set()

    # -- the pump: forget, then mark for reading ----------------------------------------

    async def _pump(self) -> None:
        """For each round of notes: forget the cached records, then queue the reads."""
        while True:
            await self._arrived.wait()
            self._arrived = trio.Event()
            inbox, self._inbox = self._inbox, _Inbox()
            if not inbox.lost and not inbox.changed:
                continue
            forget = None if inbox.lost else list(inbox.changed)
            try:
                await self._supervisor.io(self._store.forget_cached, forget)
            except Exception:  # no I/O in there: never expected
                log.exception("forgetting cached records failed")
            if inbox.lost:
                self._resync.update(self._feed.followed())
                for conversation_id in self._feed.followed():
                    self._mark(conversation_id)
                continue
            for conversation_id, before in inbox.changed.items():
                if self._feed.is_followed(conversation_id):
                    if before is not None:
                        self._feed.assume_delivered(conversation_id, before)
                    self._mark(conversation_id)  # no event too: it may have been deleted

    def _mark(self, conversation_id: str) -> None:
        """Have the conversation read (once more, if a reader is reading it now)."""
        if conversation_id in self._reading:
            self._again.add(conversation_id)
        elif conversation_id not in self._queued:
            self._queued.add(conversation_id)
            self._send.send_nowait(conversation_id)

    # -- readers ------------------------------------------------------------------------

    async def _reader(self) -> None:
        """Take a conversation, read it until caught up (again while noted meanwhile)."""
        async for conversation_id in self._receive:
            self._queued.discard(conversation_id)
            self._reading.add(conversation_id)
            try:
                await self._catch_up(conversation_id)
                while conversation_id in self._again:
                    self._again.discard(conversation_id)
                    await self._catch_up(conversation_id)
            finally:
                self._reading.discard(conversation_id)
                self._again.discard(conversation_id)
                self._resync.discard(conversation_id)

    async def _catch_up(self, conversation_id: str) -> None:
        """Deliver the conversation's events after its watermark, page by page, while it is
        followed; retry a failed read with backoff."""
        failures = 0
        while self._feed.is_followed(conversation_id):
            try:
                if await self._deliver_page(conversation_id):
                    return
                failures = 0
            except NotFound:  # deleted (on another node)
                self._feed.end_conversation(conversation_id, "deleted")
                return
            except Exception as error:
                delay = backoff_seconds(
                    failures, None, base_seconds=RETRY_BASE_SECONDS, max_seconds=RETRY_MAX_SECONDS
                )
                log.warning(
                    "reading conversation %s for its streams failed (%s); again in %.1f s",
                    conversation_id,
                    error,
                    delay,
                )
                failures += 1
                await trio.sleep(delay)

    async def _deliver_page(self, conversation_id: str) -> bool:
        """Read and deliver one page; whether the conversation is caught up."""
        after = self._feed.watermark(conversation_id)
        if after is not None:
            query = EventQuery(after_seq=after, limit=PAGE)
        elif conversation_id in self._resync:  # notes lost before anything was delivered:
            query = EventQuery(order=Order.DESC, limit=1)  # the newest, so streams notice
        else:  # nothing delivered, and the note had no event: whether it still exists
            query = EventQuery(after_seq=INT64_MAX, limit=1)
        self._resync.discard(conversation_id)
        page = await self._supervisor.io(self._read, conversation_id, query)
        self._feed.deliver(page.items)
        return after is None or page.next_seq is None

    def _read(self, conversation_id: str, query: EventQuery) -> EventPage:
        """Worker thread: the page, then the conversation's cached record forgotten —
        *after* the read, so that no record older than the events about to be delivered
        can still be cached (a reader may have cached one since the pump's forget)."""
        page = self._store.search_events(conversation_id, query)
        self._store.forget_cached([conversation_id])
        return page
