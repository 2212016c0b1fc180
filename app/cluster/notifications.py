"""Messages between nodes: PostgreSQL's LISTEN/NOTIFY, delivered into Trio.

A node keeps one connection that listens, in a thread of its own for as long as the node
serves (psycopg's blocking API: its async API is asyncio-only). A notification is small —
"conversation X has seq N", "pause run R" — and carries no data that matters on its own:
the receiver reads the truth from the store. So a lost notification (the connection broke;
PostgreSQL keeps none for a session that is gone) costs only latency: after reconnecting,
:class:`Listener` calls ``on_reconnect`` and its owner re-reads what it watches.

Delivery: the listening thread appends each notification to a pending list and, if no
delivery is scheduled yet, schedules one on the Trio thread with
``TrioToken.run_sync_soon`` (never blocks the thread, never waits for Trio). The delivery
hands ``deliver`` every notification pending by then, in arrival order: a burst costs one
hop into Trio, not one per notification. ``deliver`` runs on the Trio thread and must not
block (hand the batch to tasks through channels or events).

Ownership and cancellation: :meth:`Listener.serve` owns the thread. Cancelling it (the
node's nursery closing) wakes the thread with a NOTIFY on a channel only this listener
listens on — a thread blocked on a socket cannot be cancelled otherwise — and waits for it
to return, so no thread outlives the node.

Errors: a connection that cannot be made or breaks is logged and retried with backoff
until cancelled; ``serve`` only returns by cancellation.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
import trio
from psycopg import sql

from app.backoff import backoff_seconds

log = logging.getLogger("trellis.cluster")

#: Reconnecting: the first retry after about this long, doubling up to the cap.
RETRY_BASE_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Notification:
    channel: str
    payload: str


def notify(connection: psycopg.Connection[object], channel: str, payload: str) -> None:
    """Send ``payload`` on ``channel`` through ``connection``: delivered when its
    transaction commits (at once in autocommit), never if it rolls back."""
    connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))


class Listener:
    """LISTEN on ``channels`` at ``url``; hand batches of notifications to ``deliver``."""

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        deliver: Callable[[list[Notification]], None],
        *,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._url = url
        self._channels = list(channels)
        self._deliver = deliver
        self._on_reconnect = on_reconnect
        self._wake_channel = f"trellis_wake_{uuid.uuid4().hex}"
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _pending and _scheduled
        self._pending: list[Notification] = []
        self._scheduled = False

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started`` once the first LISTEN is in place (a NOTIFY
        sent after that is delivered). While the database cannot be reached it retries, so
        ``nursery.start`` waits for it."""
        token = trio.lowlevel.current_trio_token()

        def started() -> None:
            trio.from_thread.run_sync(task_status.started, trio_token=token)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wake_when_cancelled)
            await trio.to_thread.run_sync(
                self._listen, token, started, limiter=trio.CapacityLimiter(1)
            )

    async def _wake_when_cancelled(self) -> None:
        """Sleep until the listener is cancelled; then stop and wake its thread."""
        try:
            await trio.sleep_forever()
        finally:
            self._stopping.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._wake_thread, limiter=trio.CapacityLimiter(1))

    def _wake_thread(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as connection:
                notify(connection, self._wake_channel, "")
        except psycopg.Error:
            # The listening connection is broken too (the server is gone): its thread is
            # in its backoff wait, which _stopping ends.
            log.debug("could not wake the listener's thread", exc_info=True)

    def _listen(self, token: trio.lowlevel.TrioToken, started: Callable[[], None]) -> None:
        """The thread: connect, LISTEN, forward notifications; reconnect on failure."""
        failures = 0
        first = True
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True) as connection:
                    for channel in [*self._channels, self._wake_channel]:
                        connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if first:
                        started()
                    elif self._on_reconnect is not None:
                        token.run_sync_soon(self._on_reconnect)
                    first, failures = False, 0
                    self._forward(connection, token)
            except psycopg.Error as error:
                if self._stopping.is_set():
                    break
                delay = backoff_seconds(
                    failures, None, base_seconds=RETRY_BASE_SECONDS, max_seconds=RETRY_MAX_SECONDS
                )
                log.warning(
                    "listening for notifications failed (%s); again in %.1f s", error, delay
                )
                failures += 1
                self._stopping.wait(delay)

    def _forward(
        self, connection: psycopg.Connection[object], token: trio.lowlevel.TrioToken
    ) -> None:
        """Until woken to stop: queue each notification and schedule its delivery."""
        for note in connection.notifies():
            if note.channel == self._wake_channel:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                self._pending.append(Notification(note.channel, note.payload))
                schedule, self._scheduled = not self._scheduled, True
            if schedule:
                token.run_sync_soon(self._deliver_pending)

    def _deliver_pending(self) -> None:
        """On the Trio thread: everything pending, in arrival order, as one batch."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._scheduled = False
        if not batch:
            return
        try:
            self._deliver(batch)
        except Exception:  # raised here, it would crash the whole Trio run
            log.exception("delivering %d notifications failed; they are dropped", len(batch))
