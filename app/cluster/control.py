"""Pause, interrupt and delete across nodes: requests and replies on the control channel.

On a shared database a conversation's runs may be on any node — in the run board of the
node that claimed each — or queued in the database with no node (``app/store/claims.py``),
while a pause or an interrupt may arrive at any node (a load balancer picks one).
:class:`Control`, a cluster part started from ``app/cluster/node.py``, carries the request
to the runs' nodes and brings their answers back, over PostgreSQL's LISTEN/NOTIFY on the
schema's control channel: requests and replies (``app/cluster/control_messages.py``).

**Asking** (node A, :meth:`Control.stop_everywhere`; ``RunStops`` calls it for every pause
and interrupt while this part serves, and for a ``delete`` before it deletes the rows: the
reason recorded is then ``deleted``, and every node waits until its runs' ends are
recorded, bounded by ``shutdown_grace_seconds`` instead of the brief join):

1. read the conversation's active runs from the database, oldest (the current one) first;
2. a run ``queued`` with no node waits in the cluster queue and has no thread: A records it
   ``paused`` itself (``Trigger.STOP``, the action's reason, with its status event, in one
   transaction: ``store.transition_run``, whose UPDATE only matches the status it read,
   under the row's lock — a claimer that took the run meanwhile made it ``running`` and the
   stop changes nothing; A then reads the runs again, at most :data:`ATTEMPTS` times).
   These go first: once the current run stops, a claimer could take a later one;
3. every other node that has a run: one request (naming its oldest run of the
   conversation) — sent in the same hop as the read when nothing was unclaimed;
4. A's own runs of the conversation: the local stop (:meth:`RunStops.stop_here
   <app.stopping.RunStops.stop_here>`), meanwhile the others do theirs;
5. wait for every reply, at most :data:`REPLY_SECONDS` from the start (a delete:
   ``shutdown_grace_seconds`` + :data:`REPLY_MARGIN_SECONDS`), sending a request
   again every :data:`RESEND_SECONDS` until its reply comes (either may have been lost
   while a listener reconnected).

``RunStops`` then answers with the current run's record, read after the replies: what the
run's node recorded — the same statuses as on one node.

**Doing** (node B): a request to B naming a run in B's run board — or one B's claim is
launching (:data:`LAUNCH_WAIT_SECONDS`) — is exactly a local stop of that run's
conversation (``RunStops.stop_here``, brief wait included); B replies when it returns, at
once for a run it does not have (ended meanwhile). Requests to other nodes are ignored.

Rule: a node never records a stop of a run another node claimed (that node would run on a
run the database calls paused); A stops only unclaimed queued runs, which no node runs. A
dead node's runs are the sweeper's (``app/cluster/recovery.py``): a request to it goes
unanswered, and after :data:`REPLY_SECONDS` the answer shows the run as the database has it.

Ownership and cancellation: :meth:`Control.serve` runs in the node's nursery and owns the
listener (and its thread), one task per request being done, and one connection (used in a
thread of its own one-thread limiter) for the reads and the NOTIFYs. All end when the node's
nursery is cancelled; a request being done then ends without a reply. An asker cancelled
while waiting (its client went away) leaves the requests it sent to be done.

Errors: the database unreachable while asking is :class:`~app.store.faults.StoreUnavailable`
(503), as for a store call; while doing or replying, it is logged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import trio
from psycopg.conninfo import make_conninfo

from app.cluster.control_messages import NOTIFY_ALL, Reply, Request, control_channel, parse
from app.cluster.nodes import _first_line
from app.cluster.notifications import Listener, Notification
from app.errors import IllegalTransition, NotFound, TrellisError
from app.lifecycle import Status, Trigger
from app.stopping import INTERRUPT_JOIN_SECONDS, STOP_REASONS, StopAction
from app.store.base import EventStore
from app.store.faults import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from app.supervisor import RunSupervisor

log = logging.getLogger("trellis.cluster")
T = TypeVar("T")

#: How long an asker waits for the replies: the doing node's own brief wait, plus a margin
#: for the two hops and the reads around them (measured: a few milliseconds in all on one
#: machine, bench/cluster_control.py; the margin is for a loaded or distant database).
REPLY_MARGIN_SECONDS = 0.25
REPLY_SECONDS = INTERRUPT_JOIN_SECONDS + REPLY_MARGIN_SECONDS
#: An asker sends a request again when its reply has not come within this: a request or
#: a reply is lost while a listener reconnects (its first retry after 0.2 s,
#: ``app/cluster/notifications.py``); a reply normally takes a few milliseconds. A node
#: ignores a repeat of a request it is still doing, and does a later one again (cheap: a
#: second stop of a stopped run changes nothing), replying again.
RESEND_SECONDS = 0.1
#: A run this node claims is recorded ``running`` by the claim's COMMIT and enters the run
#: board a moment later, when the claim's thread has returned (``app/cluster/claims.py``):
#: a request arriving in between (a client that saw "running" and interrupted at once)
#: waits for it, looking every :data:`LAUNCH_POLL_SECONDS`, at most this long.
LAUNCH_WAIT_SECONDS = 0.5
LAUNCH_POLL_SECONDS = 0.002
#: Reads of the runs while claimers keep taking the unclaimed ones being stopped.
ATTEMPTS = 3
#: Each statement's bound: a database that hangs fails the request instead of holding it.
STATEMENT_TIMEOUT_MS = 5000

_CLAIMED_BY = "SELECT 1 FROM runs WHERE id = %s AND node = %s AND status IN ('running', 'pausing')"
_ACTIVE_RUNS = (
    "SELECT id, status, node FROM runs WHERE conversation_id = %s"
    " AND status IN ('queued', 'running', 'pausing') ORDER BY n"
)


@dataclass(frozen=True, slots=True)
class ActiveRun:
    """A conversation's active run as the database has it."""

    id: str
    status: Status
    node: str | None

    @property
    def unclaimed(self) -> bool:
        """Waiting in the cluster queue: no node has it, nor any thread."""
        return self.status is Status.QUEUED and self.node is None


class _Replies:
    """The nodes that replied to one asking so far."""

    def __init__(self) -> None:
        self.nodes: set[str] = set()
        self._arrived = trio.Event()

    def add(self, node: str) -> None:
        self.nodes.add(node)
        self._arrived.set()

    async def wait_for(self, nodes: set[str]) -> None:
        """Until every node in ``nodes`` has replied."""
        while not nodes <= self.nodes:
            self._arrived = trio.Event()
            await self._arrived.wait()


class Control:
    """The control part of a cluster node (see the module docstring)."""

    def __init__(self, supervisor: RunSupervisor) -> None:
        store = supervisor.store
        if store.cluster_url is None:
            raise TypeError(f"cluster control needs a shared (PostgreSQL) store, not {store!r}")
        self._supervisor = supervisor
        self._store: EventStore = store
        self._stops = supervisor.stops
        self._node_id = store.node_id
        # Named, so that an operator (or a test) can tell these sessions in pg_stat_activity.
        self._url = make_conninfo(
            store.cluster_url, application_name=f"trellis-control-{store.node_id}"
        )
        self._limiter = trio.CapacityLimiter(1)
        self._connection: psycopg.Connection[Any] | None = None
        self._channel = ""
        self._tags = itertools.count()
        self._waiting: dict[str, _Replies] = {}  # by tag: this node's askings
        self._doing: set[str] = set()  # tags of the requests being done here
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and do requests until cancelled; started (and the supervisor's stops
        routed through here) once LISTEN is in place."""
        try:
            self._channel = await self._call(_schema_channel)
            listener = Listener(self._url, [self._channel], self._receive)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(listener.serve)
                self._stops.cluster = self
                task_status.started()
        finally:
            self._stops.cluster = None
            self._nursery = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    # -- asking (node A) ----------------------------------------------------------------

    async def stop_everywhere(self, conversation_id: str, action: StopAction) -> str | None:
        """Have ``action`` done to the conversation's active runs wherever they are
        (module docstring, "Asking"); the id of its current active run, or ``None`` if it
        has none anywhere.

        Errors: :class:`~app.store.faults.StoreUnavailable` (503): the database cannot be
        reached; what was stopped or sent before the failure stays so. As a local stop's,
        for this node's runs.
        """
        tag = f"{self._node_id}.{next(self._tags)}"
        replies = self._waiting[tag] = _Replies()
        wait = REPLY_SECONDS  # a delete: the nodes' bounded join instead of the brief one
        if action == "delete":
            wait = self._supervisor.settings.shutdown_grace_seconds + REPLY_MARGIN_SECONDS
        deadline = trio.current_time() + wait
        try:
            current, asked = await self._stop_unclaimed_then_ask(conversation_id, action, tag)
            if self._stops.runs_here(conversation_id):
                with contextlib.suppress(IllegalTransition):  # they ended meanwhile
                    await self._stops.stop_here(conversation_id, action)
            with trio.move_on_at(deadline):
                await self._wait_for_replies(replies, asked)
        finally:
            del self._waiting[tag]
        return current

    async def _wait_for_replies(self, replies: _Replies, asked: list[Request]) -> None:
        """Until every asked node replied; sending again, every :data:`RESEND_SECONDS`,
        the requests not answered yet (one lost with a listener's connection)."""
        while True:
            with trio.move_on_after(RESEND_SECONDS):
                await replies.wait_for({request.target for request in asked})
                return
            again = [request.payload() for request in asked if request.target not in replies.nodes]
            try:
                await self._call(self._notify, again)
            except psycopg.Error as error:  # the next round tries again
                log.warning("could not send control requests again: %s", _first_line(error))

    async def _stop_unclaimed_then_ask(
        self, conversation_id: str, action: StopAction, tag: str
    ) -> tuple[str | None, list[Request]]:
        """Read the active runs; record the unclaimed ones ``paused`` — first: once the
        other nodes' runs stop, a claimer could take a later one — and ask each other
        node that has one. The current run's id (``None``: none is active), and the
        requests sent."""
        for _ in range(ATTEMPTS):
            runs, asked = await self._database(
                self._read_and_ask, conversation_id, action, tag, True
            )
            unclaimed = [run.id for run in runs if run.unclaimed]
            current = runs[0].id if runs else None
            if not unclaimed:
                return current, asked  # asked already, in the same hop
            if await self._stop_unclaimed(unclaimed, action):
                _, asked = await self._database(
                    self._read_and_ask, conversation_id, action, tag, False
                )
                return current, asked
        # Claimers took the runs being stopped each time: ask whoever has them now.
        runs, asked = await self._database(self._read_and_ask, conversation_id, action, tag, False)
        return (runs[0].id if runs else None), asked

    async def _database(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`_call`, a failure being :class:`~app.store.faults.StoreUnavailable`."""
        try:
            return await self._call(fn, *args)
        except psycopg.Error as error:
            raise StoreUnavailable(
                "cannot stop runs of other nodes: the database cannot be"
                f" reached ({_first_line(error)}). Check that the PostgreSQL server is running"
                " and reachable from this host",
                detail={"sqlite_error": None, "sqlstate": getattr(error, "sqlstate", None)},
            ) from error

    async def _stop_unclaimed(self, run_ids: list[str], action: StopAction) -> bool:
        """Record the unclaimed queued runs ``paused``; ``False`` if one of them was
        claimed (or ended, or deleted) meanwhile: read the runs again."""
        reason = STOP_REASONS[action]

        def stop(store: EventStore) -> bool:
            for run_id in run_ids:
                try:
                    store.transition_run(run_id, Trigger.STOP, reason=reason)
                except (IllegalTransition, NotFound):
                    return False
            return True

        return await self._supervisor.io(stop, self._store)

    # -- doing (node B) -----------------------------------------------------------------

    def _receive(self, batch: list[Notification]) -> None:
        """The listener's batch (Trio thread, never blocks): replies to this node's
        askings are counted; requests to this node are done, each in a task."""
        for notification in batch:
            message = parse(notification.payload)
            if isinstance(message, Reply):
                replies = self._waiting.get(message.tag)
                if replies is not None:
                    replies.add(message.node)
            elif isinstance(message, Request):
                if message.target != self._node_id or self._nursery is None:
                    continue
                if message.tag not in self._doing:  # not a repeat of one being done
                    self._doing.add(message.tag)
                    self._nursery.start_soon(self._do, message)
            else:
                log.warning("ignoring a malformed control message: %r", notification.payload[:200])

    async def _do(self, request: Request) -> None:
        """The local pause, interrupt or delete stop of the run's conversation (if the run
        is here), then the reply."""
        conversation_id = await self._conversation_here(request.run_id)
        try:
            if conversation_id is not None:
                await self._stops.stop_here(conversation_id, request.action)
        except IllegalTransition:
            pass  # its runs ended meanwhile: nothing left to stop
        except TrellisError as error:  # the store failing: the asker sees the record
            log.warning("%s of run %s failed: %s", request.action, request.run_id, error)
        finally:
            self._doing.discard(request.tag)
        try:
            await self._call(self._notify, [Reply(request.tag, self._node_id).payload()])
        except psycopg.Error as error:
            log.warning("could not reply to a %s request: %s", request.action, _first_line(error))

    async def _conversation_here(self, run_id: str) -> str | None:
        """The conversation of ``run_id`` if the run is in this node's run board — once it
        is there, if the database says this node has claimed it (see
        :data:`LAUNCH_WAIT_SECONDS`). A run whose handle is gone has ended: its task
        records the end before it leaves the board, so the database says so too."""
        conversation_id = self._stops.conversation_here(run_id)
        if conversation_id is not None:
            return conversation_id
        try:
            claimed = await self._call(self._claimed_here, run_id)
        except psycopg.Error as error:
            log.warning("could not read run %s: %s", run_id, _first_line(error))
            return None
        for _ in range(round(LAUNCH_WAIT_SECONDS / LAUNCH_POLL_SECONDS) if claimed else 0):
            await trio.sleep(LAUNCH_POLL_SECONDS)
            conversation_id = self._stops.conversation_here(run_id)
            if conversation_id is not None:
                break
        return conversation_id

    # -- the connection (in the control's thread) ---------------------------------------

    def _read_and_ask(
        self,
        connection: psycopg.Connection[Any],
        conversation_id: str,
        action: StopAction,
        tag: str,
        unless_unclaimed: bool,
    ) -> tuple[list[ActiveRun], list[Request]]:
        """The conversation's active runs (oldest first), and a request sent to each other
        node that has one — none if ``unless_unclaimed`` and a run is unclaimed (those
        are stopped first)."""
        rows = connection.execute(_ACTIVE_RUNS, (conversation_id,)).fetchall()
        runs = [ActiveRun(str(row[0]), Status(row[1]), row[2]) for row in rows]
        if unless_unclaimed and any(run.unclaimed for run in runs):
            return runs, []
        return runs, self._send_requests(connection, runs, action, tag)

    def _send_requests(
        self,
        connection: psycopg.Connection[Any],
        runs: list[ActiveRun],
        action: StopAction,
        tag: str,
    ) -> list[Request]:
        """One request to each other node that has one of ``runs`` (naming its oldest);
        the requests."""
        oldest_on: dict[str, str] = {}
        for run in runs:
            if run.node is not None and run.node != self._node_id:
                oldest_on.setdefault(run.node, run.id)
        requests = [Request(action, run_id, node, tag) for node, run_id in oldest_on.items()]
        self._notify(connection, [request.payload() for request in requests])
        return requests

    def _claimed_here(self, connection: psycopg.Connection[Any], run_id: str) -> bool:
        return connection.execute(_CLAIMED_BY, (run_id, self._node_id)).fetchone() is not None

    def _notify(self, connection: psycopg.Connection[Any], payloads: list[str]) -> None:
        if payloads:
            connection.execute(NOTIFY_ALL, (self._channel, payloads))

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in the control's thread."""
        return await trio.to_thread.run_sync(self._on_connection, fn, *args, limiter=self._limiter)

    def _on_connection(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the kept connection, made if needed; a kept one the
        server ended meanwhile is replaced and ``fn`` run once more (every statement here
        may run twice: reads, and NOTIFYs whose repeats are harmless). Any failure closes
        the connection, so the next call makes a new one."""
        for attempt in (1, 2):
            fresh = self._connection is None or self._connection.closed
            if self._connection is None or fresh:
                self._connection = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
                self._connection.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    (str(STATEMENT_TIMEOUT_MS),),
                )
            try:
                return fn(self._connection, *args)
            except psycopg.Error as error:
                self._connection.close()
                if fresh or attempt == 2 or not isinstance(error, psycopg.OperationalError):
                    raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def _schema_channel(connection: psycopg.Connection[Any]) -> str:
    """The control channel of the schema the connection works in (the store's)."""
    row = connection.execute("SELECT current_schema()").fetchone()
    return control_channel(str(row[0]) if row is not None else "public")
