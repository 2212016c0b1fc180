"""This node's lease in the shared database, and the sweep for dead nodes.

Every node has one row in ``nodes`` (``app/store/pg_schema.py``) for as long as it lives:
its id (``store.node_id``, also the ``node`` of every run it admits), the URL it serves on
(``address``: :meth:`RunSupervisor.advertise <app.supervisor.RunSupervisor.advertise>`;
``""`` for an embedded supervisor without HTTP), its run limit and running runs (the
supervisor's statistics, so a limit changed at runtime shows), and two times set by the
database's ``now()``: ``started_at`` and ``last_heartbeat``.

:class:`NodeLease` (a cluster part, started from ``app/cluster/node.py``):

- inserts the row when it starts (before the first run is admitted);
- heartbeats every ``node_lease_seconds / 3`` (at once when the address becomes known):
  updates ``last_heartbeat``, ``running``, ``max_concurrent_runs``, ``address`` — then
  deletes the rows of nodes whose lease expired (``app/cluster/recovery.py``, (a)), but
  only when its own previous heartbeat was within the lease: after an outage of the
  database longer than the lease every lease looks expired, and the first node back would
  otherwise declare all the others dead; each gets a tick to renew its row first;
- sweeps in a task of its own, every tick: stops the active runs of nodes without a row
  (recovery (b), ``paused`` / ``crash_recovery``), through the store on the I/O limiter;
- deletes its row on a clean stop (cancellation of the node's nursery).

Its statements run on a small autocommit psycopg connection of its own, in threads of its
own limiter (one thread): a heartbeat never queues behind store I/O or a group commit.
A database that cannot be reached is logged and retried each tick (a new connection);
a statement is bounded by ``statement_timeout`` (the lease), a connect by the lease too.

Declared dead: a heartbeat that finds its own row gone means another node saw the lease
expire and has recorded (or is recording) this node's runs ``paused``. The node then, once:
logs an error and *stands down* (:meth:`RunSupervisor.stand_down
<app.supervisor.RunSupervisor.stand_down>`): it refuses new runs (503 ``shutting_down``,
``/ready`` 503, as draining) and stops every run it still has, at once. Their ends are
recorded through ``stop_runs``, which changes only runs still active: those the sweeper
paused are not recorded again, and a run admitted after the sweep is paused once, here.
It does not re-insert its row and stops heartbeating and sweeping; the process keeps
serving reads until the operator restarts it (a restarted process is a new node). Until
that heartbeat (at most a third of the lease after the sweep), its runs' threads may still
take steps: leases bound that window, they cannot close it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import trio

from app.cluster import recovery
from app.errors import TrellisError

if TYPE_CHECKING:
    from app.supervisor import RunSupervisor

log = logging.getLogger("trellis.cluster")
T = TypeVar("T")

_INSERT = (
    "INSERT INTO nodes (id, address, max_concurrent_runs, running, started_at, last_heartbeat)"
    " VALUES (%s, %s, %s, %s, now(), now())"
)
#: Renew the row; returns whether the previous heartbeat was within the lease (``old`` is
#: the row as it was before this statement).
_HEARTBEAT = (
    "UPDATE nodes AS n SET last_heartbeat = now(), address = %s, max_concurrent_runs = %s,"
    " running = %s FROM nodes AS old WHERE n.id = %s AND old.id = n.id"
    " RETURNING old.last_heartbeat >= now() - make_interval(secs => %s)"
)
_DELETE = "DELETE FROM nodes WHERE id = %s"
_LIST = "SELECT id, address, max_concurrent_runs, running, last_heartbeat FROM nodes ORDER BY id"


def read_nodes(url: str) -> list[dict[str, Any]]:
    """Every live node's row (``GET /api/cluster``), ordered by id; a short connection of
    its own (an admin route: ~ms to connect on a local network), closed after."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
        rows = connection.execute(_LIST).fetchall()
    return [
        {
            "id": row[0],
            "address": row[1],
            "max_concurrent_runs": row[2],
            "running": row[3],
            "last_heartbeat": row[4],
        }
        for row in rows
    ]


class NodeLease:
    """This node's row, its heartbeat and its sweep (see the module docstring)."""

    def __init__(self, supervisor: RunSupervisor, url: str) -> None:
        self.supervisor = supervisor
        self.url = url
        self.node_id = supervisor.store.node_id
        self.lease_seconds = supervisor.settings.node_lease_seconds
        self._limiter = trio.CapacityLimiter(1)
        self._connection: psycopg.Connection[Any] | None = None
        self._written_address: str | None = None
        #: Set once this node learned it was declared dead (and stood down).
        self.declared_dead = trio.Event()

    @property
    def period(self) -> float:
        """Seconds between heartbeats (and sweeps): a third of the lease."""
        return self.lease_seconds / 3

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Insert the row, report started, heartbeat and sweep until cancelled or declared
        dead; delete the row and close the connection however it ends."""
        try:
            await self._call(self._insert, self._numbers())
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweep_every_tick)
                await self._heartbeat_every_tick()
                nursery.cancel_scope.cancel()  # declared dead: no more sweeps either
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.lease_seconds):
                await trio.to_thread.run_sync(self._leave, limiter=self._limiter)

    async def beat(self) -> bool:
        """One heartbeat, then (a) of the sweep; ``False`` (after standing down, once) when
        the row was gone. A database error is logged: the next tick tries again."""
        try:
            alive = await self._call(self._heartbeat, self._numbers())
        except psycopg.Error as error:
            log.warning("node %s: heartbeat failed: %s", self.node_id, _first_line(error))
            return True
        if not alive:
            await self._stand_down()
        return alive

    async def sweep(self) -> list[str]:
        """(b) of the sweep: record the runs of nodes without a row paused; returns the
        ids of the runs this call stopped. A database error is logged (next tick)."""
        try:
            run_ids = await self._call(recovery.orphaned_runs)
            stopped = await self.supervisor.io(
                recovery.stop_orphans, self.supervisor.store, run_ids
            )
        except (psycopg.Error, TrellisError) as error:
            log.warning("node %s: sweep failed: %s", self.node_id, _first_line(error))
            return []
        if stopped:
            log.warning("recorded %d run(s) of dead node(s) paused (crash_recovery)", len(stopped))
        return [run.id for run in stopped]

    def close(self) -> None:
        """Close the lease's connection (blocking, quick) without deleting the row: for a
        lease driven by hand (``beat``/``sweep``); :meth:`serve` closes its own."""
        if self._connection is not None:
            self._connection.close()

    # -- the loops ---------------------------------------------------------------------

    async def _heartbeat_every_tick(self) -> None:
        """Heartbeat until declared dead (then return); early when the address changes."""
        while True:
            changed = self.supervisor.address_changed
            if self.supervisor.address == self._written_address:
                with trio.move_on_after(self.period):
                    await changed.wait()
            if not await self.beat():
                return

    async def _sweep_every_tick(self) -> None:
        while True:
            await trio.sleep(self.period)
            await self.sweep()

    async def _stand_down(self) -> None:
        """Declared dead (once): log, and stop every run without re-recording them."""
        if self.declared_dead.is_set():
            return
        self.declared_dead.set()
        log.error(
            "node %s was declared dead by another node (its lease of %s s expired):"
            " its runs were recorded paused there; refusing new runs and stopping its runs"
            " now. Restart this server to serve runs again",
            self.node_id,
            self.lease_seconds,
        )
        await self.supervisor.stand_down(recovery.REASON)

    # -- statements (in the lease's thread) --------------------------------------------

    def _numbers(self) -> tuple[str, int, int]:
        """``(address, max_concurrent_runs, running)`` now (read on the Trio thread)."""
        stats = self.supervisor.statistics()
        return self.supervisor.address, stats.max_concurrent_runs, stats.running

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` in the lease's thread, on a connection made if needed
        (dropped after a database error, so the next call makes a new one)."""
        return await trio.to_thread.run_sync(self._on_connection, fn, *args, limiter=self._limiter)

    def _on_connection(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)``; a kept connection that the server ended meanwhile (a
        restart, a failover, an administrator) is replaced and ``fn`` tried once more on
        the new one — every statement here may run twice. Any failure closes it."""
        for attempt in (1, 2):
            fresh = self._connection is None or self._connection.closed
            if self._connection is None or fresh:
                self._connection = self._connect()
            try:
                return fn(self._connection, *args)
            except psycopg.OperationalError:
                self._connection.close()
                if fresh or attempt == 2:
                    raise
            except psycopg.Error:
                self._connection.close()
                raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _connect(self) -> psycopg.Connection[Any]:
        """An autocommit connection whose connect and statements are bounded by the lease
        (named ``trellis-node-<id>`` in ``pg_stat_activity``)."""
        connection = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(1, math.ceil(self.lease_seconds)),
            application_name=f"trellis-node-{self.node_id}",
        )
        milliseconds = str(max(1, int(self.lease_seconds * 1000)))
        connection.execute("SELECT set_config('statement_timeout', %s, false)", (milliseconds,))
        return connection

    def _insert(self, connection: psycopg.Connection[Any], numbers: tuple[str, int, int]) -> None:
        address, limit, running = numbers
        connection.execute(_INSERT, (self.node_id, address, limit, running))
        self._written_address = address

    def _heartbeat(
        self, connection: psycopg.Connection[Any], numbers: tuple[str, int, int]
    ) -> bool:
        address, limit, running = numbers
        values = (address, limit, running, self.node_id, self.lease_seconds)
        row = connection.execute(_HEARTBEAT, values).fetchone()
        if row is None:
            return False
        self._written_address = address
        if not row[0]:  # this node was cut off too (say, the database restarted): the
            return True  # others get a tick to come back before anyone is declared dead
        dead = recovery.expire_leases(connection, self.lease_seconds)
        if dead:
            log.warning("node(s) %s: lease expired, declared dead", ", ".join(dead))
        return True

    def _leave(self) -> None:
        """Delete the row (a clean stop) and close the connection; errors are logged."""
        try:
            self._on_connection(lambda connection: connection.execute(_DELETE, (self.node_id,)))
        except psycopg.Error as error:
            log.warning("node %s: could not delete its row: %s", self.node_id, _first_line(error))
        finally:
            self.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
