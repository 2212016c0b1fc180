"""Dead nodes and their runs: expired leases are deleted, orphaned runs recorded paused.

A node is dead when its row in ``nodes`` has not been heartbeaten for the lease
(``node_lease_seconds``; ``app/cluster/nodes.py``). Every node sweeps, each heartbeat tick:

(a) :func:`expire_leases` — ``DELETE … WHERE last_heartbeat < now() - lease RETURNING id``:
    one statement, so of several sweepers exactly one deletes (and reports) a given row.
    Times are the database's (``now()``), never a node's clock.
(b) :func:`stop_orphans` — every active run whose ``node`` has no row in ``nodes`` (a dead
    node's, a node that died between (a) and (b), the runs of the only node that crashed,
    runs from before nodes existed: ``node`` null; but not a queued run no node has claimed
    yet — ``node`` null too —, which is the cluster's queue, ``app/store/claims.py``, and
    waits for a live node) is stopped through the store's
    ``stop_runs`` with reason :data:`REASON`: one transaction per chunk, the runs and their
    conversations ``paused`` with their status events. Idempotent and race-free: the stop
    only changes runs that are still active when its UPDATE gets their row locks
    (``app/store/run_rows.py``), so two sweepers — or the dead node stopping its own runs —
    record each run once.

Crash recovery at start on a shared database is the same sweep (:func:`recover_dead_nodes`):
a node starting never pauses a live node's runs, only those whose node's lease is gone.

Threads: everything here blocks; callers run it in worker threads (the lease's limiter for
the small statements, the I/O limiter for ``stop_runs``, which is store I/O).
"""

from __future__ import annotations

from typing import Any

import psycopg

from app.records import RunRecord
from app.store.base import EventStore

#: The run (and conversation) status reason of a dead node's runs.
REASON = "crash_recovery"

#: Runs stopped per ``stop_runs`` transaction (as the store's own start recovery).
RUNS_PER_STOP = 20_000

_EXPIRE = "DELETE FROM nodes WHERE last_heartbeat < now() - make_interval(secs => %s) RETURNING id"
_ORPHANS = (
    "SELECT r.id FROM runs AS r WHERE r.status IN ('queued', 'running', 'pausing')"
    " AND (r.node IS NOT NULL OR r.status <> 'queued')"  # unclaimed: the cluster's queue
    " AND NOT EXISTS (SELECT 1 FROM nodes AS n WHERE n.id = r.node) ORDER BY r.n LIMIT %s"
)


def expire_leases(connection: psycopg.Connection[Any], lease_seconds: float) -> list[str]:
    """(a): delete the rows of nodes whose lease has expired; their ids (sorted)."""
    rows = connection.execute(_EXPIRE, (lease_seconds,)).fetchall()
    return sorted(str(row[0]) for row in rows)


def orphaned_runs(connection: psycopg.Connection[Any], limit: int = RUNS_PER_STOP) -> list[str]:
    """The ids of at most ``limit`` active runs whose node has no row (oldest first)."""
    return [str(row[0]) for row in connection.execute(_ORPHANS, (limit,)).fetchall()]


def stop_orphans(store: EventStore, run_ids: list[str]) -> list[RunRecord]:
    """(b) for ``run_ids`` (from :func:`orphaned_runs`): the runs this call recorded paused
    (runs ended meanwhile, or stopped by another sweeper, are skipped)."""
    return store.stop_runs(run_ids, reason=REASON) if run_ids else []


def recover_dead_nodes(store: EventStore, url: str, lease_seconds: float) -> list[str]:
    """Crash recovery at start on a shared database: (a), then (b) until no orphan is
    left; returns the conversations whose current run it paused (for
    ``resume_on_start``), in run order. A short connection of its own, closed after."""
    touched: dict[str, None] = {}
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
        expire_leases(connection, lease_seconds)
        while True:
            run_ids = orphaned_runs(connection)
            stopped = stop_orphans(store, run_ids)
            touched.update((run.conversation_id, None) for run in stopped)
            if len(run_ids) < RUNS_PER_STOP or not stopped:
                return list(touched)
