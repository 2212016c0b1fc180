"""Nodes sharing one PostgreSQL database: leases, ``run.node``, dead nodes' runs, and
``GET /api/cluster``.

Several nodes are several ``PostgresStore``s on the same ``postgres_url``, each with its
own supervisor, in one Trio test (real processes: tests/test_cluster_processes.py). Any
node with a free slot claims a queued run: a test that needs a run on a given node sets
the other nodes' limit to 0 meanwhile (``running_run``).
Heartbeats and sweeps are driven directly (``NodeLease.beat``/``sweep``) where a test is
about what one tick does; a node "stops heartbeating" by a lease long enough that its
loop never ticks during the test (its row is then aged, or expired by a node whose lease
is short). One test runs the real loops with a 0.3 s lease, bounded by ``fail_after``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from app.cluster import recovery
from app.cluster.nodes import NodeLease
from app.errors import ShuttingDown
from app.events import StatusPayload
from app.lifecycle import Status
from app.settings import Settings
from app.store import EventQuery
from app.store.base import NewConversation
from app.store.postgres import PostgresStore
from app.store.schema import SCHEMA_VERSION
from app.store.sqlite import SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from app.web import create_app
from tests import pg
from tests.conftest import gated, new_conversation
from tests.live import live_server

pytestmark = pytest.mark.timeout(60)

#: A lease whose heartbeat loop never ticks during a test (a node that "stopped").
FOREVER = 3600.0


@pytest.fixture
def stores(postgres_url: str) -> Iterator[Callable[[], PostgresStore]]:
    """Opens nodes' stores on the test's database; all closed after the test."""
    opened: list[PostgresStore] = []

    def open_one() -> PostgresStore:
        opened.append(PostgresStore(postgres_url))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def node_settings(tmp_path: Path, name: str, lease: float = FOREVER) -> Settings:
    return Settings(
        data_dir=tmp_path / name, max_concurrent_runs=2, max_queued_runs=3, node_lease_seconds=lease
    )


@asynccontextmanager
async def node(
    settings: Settings, store: PostgresStore, gates: Gates
) -> AsyncIterator[RunSupervisor]:
    async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
        yield sup


@asynccontextmanager
async def by_hand(sup: RunSupervisor, url: str) -> AsyncIterator[NodeLease]:
    """Another lease object of ``sup``'s node (its row, its id), driven by hand."""
    lease = NodeLease(sup, url)
    try:
        yield lease
    finally:
        lease.close()


def rows(url: str) -> dict[str, dict[str, Any]]:
    """The ``nodes`` table by id."""
    with psycopg.connect(url, autocommit=True) as connection:
        result = connection.execute(
            "SELECT id, address, max_concurrent_runs, running, started_at, last_heartbeat,"
            " now() AS now FROM nodes"
        ).fetchall()
    names = ("id", "address", "max_concurrent_runs", "running", "started_at", "last_heartbeat")
    return {row[0]: dict(zip((*names, "now"), row, strict=True)) for row in result}


def age_lease(url: str, node_id: str, seconds: float = 2 * FOREVER) -> None:
    """``node_id`` last heartbeat ``seconds`` ago (it stopped heartbeating back then)."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "UPDATE nodes SET last_heartbeat = now() - make_interval(secs => %s) WHERE id = %s",
            (seconds, node_id),
        )


def pauses(store: PostgresStore | SqliteStore, conversation_id: str) -> list[tuple[str, str]]:
    """(status, reason) of every ``paused`` status event of the conversation."""
    page = store.search_events(conversation_id, EventQuery(kind="status"))
    found = []
    for event in page.items:
        assert isinstance(event.payload, StatusPayload)
        if event.payload.status is Status.PAUSED:
            found.append((event.payload.status.value, event.payload.reason))
    return found


async def running_run(
    sup: RunSupervisor, gates: Gates, gate: str, *others: RunSupervisor
) -> tuple[str, str]:
    """A run held inside its first step, claimed by ``sup``'s node (the ``others`` claim
    nothing meanwhile: limit 0); (conversation id, run id)."""
    limits = [other.statistics().max_concurrent_runs for other in others]
    for other in others:
        other.set_limits(max_concurrent_runs=0)
    conversation = await new_conversation(sup, gated(gate))
    run = await sup.start_run(conversation.id)
    await gates[gate].wait_entered()
    for other, limit in zip(others, limits, strict=True):
        other.set_limits(max_concurrent_runs=limit)
    return conversation.id, run.id


async def test_a_run_records_the_node_that_claimed_it(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates
) -> None:
    """On PostgreSQL a run's record names its node (in the run, and in its conversation's
    record); two nodes' runs name each their own. On SQLite ``node`` is null."""
    a, b = stores(), stores()
    assert a.node_id != b.node_id
    with trio.fail_after(20):
        async with (
            node(node_settings(tmp_path, "a"), a, gates) as sup_a,
            node(node_settings(tmp_path, "b"), b, gates) as sup_b,
        ):
            conv_a, run_a = await running_run(sup_a, gates, "a", sup_b)
            conv_b, _ = await running_run(sup_b, gates, "b", sup_a)
            assert (await sup_a.get_run(conv_a, run_a)).node == a.node_id
            assert (await sup_b.io(b.get_run, conv_a, run_a)).node == a.node_id
            assert (await sup_a.io(a.get_conversation, conv_b)).run.node == b.node_id  # type: ignore[union-attr]
            gates.release_all()
    sqlite = SqliteStore(tmp_path / "one.sqlite3")
    try:
        async with open_run_supervisor(
            node_settings(tmp_path, "s"), sqlite, registry=gated_registry(gates)
        ) as sup:
            conversation = await new_conversation(sup, gated("s"))
            run = await sup.start_run(conversation.id)
            assert run.node is None
            assert (await sup.io(sqlite.get_run, conversation.id, run.id)).node is None
    finally:
        sqlite.close()


async def test_heartbeats_keep_the_row_current_and_a_clean_stop_deletes_it(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """The row is there once the supervisor has started (address "", its limit, nothing
    running, times from the database); a heartbeat renews it with the running runs, a
    limit changed at runtime and the advertised address; a clean stop deletes it."""
    store = stores()
    with trio.fail_after(20):
        async with node(node_settings(tmp_path, "a"), store, gates) as sup:
            first = rows(postgres_url)[store.node_id]
            assert (first["address"], first["max_concurrent_runs"], first["running"]) == ("", 2, 0)
            assert first["started_at"] == first["last_heartbeat"] <= first["now"]
            await running_run(sup, gates, "g")
            sup.set_limits(max_concurrent_runs=5)
            sup.address = "http://127.0.0.1:1"  # as advertise() sets it
            async with by_hand(sup, postgres_url) as lease:
                assert await lease.beat() is True
            beaten = rows(postgres_url)[store.node_id]
            assert beaten["last_heartbeat"] > first["last_heartbeat"]
            assert (beaten["address"], beaten["max_concurrent_runs"], beaten["running"]) == (
                "http://127.0.0.1:1",
                5,
                1,
            )
            gates.release_all()
    assert rows(postgres_url) == {}


async def test_a_heartbeat_survives_its_connection_being_ended(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """The server ends the lease's connection (a restart, an administrator): the next
    heartbeat reconnects and renews the row, without failing; so does the clean stop's
    delete."""
    store = stores()
    with trio.fail_after(20):
        async with (
            node(node_settings(tmp_path, "a"), store, gates) as sup,
            by_hand(sup, postgres_url) as lease,
        ):
            assert await lease.beat() is True
            before = rows(postgres_url)[store.node_id]["last_heartbeat"]
            ended = pg.terminate_sessions(postgres_url, f"trellis-node-{store.node_id}")
            assert len(ended) == 2  # the node's own lease and this one
            assert await lease.beat() is True
            assert rows(postgres_url)[store.node_id]["last_heartbeat"] > before
    assert rows(postgres_url) == {}


async def test_advertise_writes_the_address_at_once(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """advertise() wakes the heartbeat: the row has the address long before the next
    periodic tick (an hour away with this lease)."""
    store = stores()
    with trio.fail_after(10):
        async with node(node_settings(tmp_path, "a"), store, gates) as sup:
            sup.advertise("http://127.0.0.1:8123")
            while rows(postgres_url)[store.node_id]["address"] != "http://127.0.0.1:8123":
                await trio.sleep(0.01)  # the lease's thread writes it; fail_after bounds it


async def test_a_dead_nodes_runs_are_paused_once_by_a_live_node(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """Real loops: node B (lease 0.3 s) sees A's lease expire (A stopped heartbeating)
    and records A's two running runs paused / crash_recovery, one status event each,
    within a few ticks; B's own run goes on and finishes. A run admitted on A that no node
    had claimed stays queued (it is the cluster's, not A's) and B claims it once B has a
    free slot. A's drain at the end records nothing more (its runs had been recorded)."""
    b_store, a_store = stores(), stores()
    # B first: A's start recovery (lease an hour) leaves B alone.
    with trio.fail_after(20):
        async with (
            node(node_settings(tmp_path, "b", lease=0.3), b_store, gates) as sup_b,
            node(node_settings(tmp_path, "a"), a_store, gates) as sup_a,
        ):
            conv_b, run_b = await running_run(sup_b, gates, "b", sup_a)
            conv_a, run_a = await running_run(sup_a, gates, "a", sup_b)
            conv_a2, _ = await running_run(sup_a, gates, "a-second", sup_b)  # A is full
            sup_b.set_limits(max_concurrent_runs=1)  # B is full
            unclaimed = await new_conversation(sup_a, gated("unclaimed"))
            waiting = await sup_a.start_run(unclaimed.id)
            started = trio.current_time()
            while (await sup_b.io(b_store.get_run, conv_a, run_a)).status is not Status.PAUSED:
                await trio.sleep(0.02)  # B's sweep: bounded by fail_after
            took = trio.current_time() - started
            assert a_store.node_id not in rows(postgres_url)
            for conversation_id in (conv_a, conv_a2):
                record = await sup_b.io(b_store.get_conversation, conversation_id)
                assert (record.status, record.run.reason) == (Status.PAUSED, "crash_recovery")  # type: ignore[union-attr]
                assert pauses(b_store, conversation_id) == [("paused", "crash_recovery")]
            queued = await sup_b.io(b_store.get_run, unclaimed.id, waiting.id)
            assert (queued.status, queued.node) == (Status.QUEUED, None)
            assert (await sup_b.get_run(conv_b, run_b)).status is Status.RUNNING
            assert took < 3.0  # the lease (0.3 s) and a few ticks (0.1 s), slack for threads
            sup_b.set_limits(max_concurrent_runs=2)
            await gates["unclaimed"].wait_entered()
            assert (await sup_b.get_run(unclaimed.id, waiting.id)).node == b_store.node_id
            gates["b"].release()
            gates["unclaimed"].release()
            assert (await sup_b.wait_run(conv_b, run_b, 10)).status is Status.FINISHED  # type: ignore[union-attr]
    for conversation_id in (conv_a, conv_a2):  # A's drain ("shutdown") added nothing
        assert pauses(b_store, conversation_id) == [("paused", "crash_recovery")]


async def test_a_node_back_from_an_outage_gives_the_others_a_tick(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """After an outage longer than the lease (every row old), the first heartbeat back
    renews its own row but declares nobody dead; the next one, a tick later, expires the
    nodes that did not come back."""
    a_store, b_store = stores(), stores()
    with trio.fail_after(20):
        async with (
            node(node_settings(tmp_path, "a"), a_store, gates),
            node(node_settings(tmp_path, "b"), b_store, gates) as sup_b,
            by_hand(sup_b, postgres_url) as lease_b,
        ):
            age_lease(postgres_url, a_store.node_id)
            age_lease(postgres_url, b_store.node_id)
            assert await lease_b.beat() is True
            assert set(rows(postgres_url)) == {a_store.node_id, b_store.node_id}
            assert await lease_b.beat() is True
            assert set(rows(postgres_url)) == {b_store.node_id}


def test_two_sweepers_racing_record_each_run_once(
    stores: Callable[[], PostgresStore], postgres_url: str
) -> None:
    """Two nodes stop the same 200 orphaned runs at the same moment (two threads): every
    run is stopped by exactly one of them, with one status event."""
    dead, b, c = stores(), stores(), stores()
    conversations = []
    for index in range(200):
        conversation, _ = dead.create_conversation(
            _new_conversation({"kind": "script", "steps": [{"say": str(index)}]})
        )
        dead.create_run(
            conversation.id, run_id=f"r{index}", activate=True, reason="user", started=True
        )
        conversations.append(conversation.id)
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        orphans = recovery.orphaned_runs(connection)
    assert sorted(orphans) == sorted(f"r{index}" for index in range(200))
    barrier = threading.Barrier(2)
    stopped: dict[str, list[str]] = {}

    def sweep(name: str, store: PostgresStore) -> None:
        barrier.wait(timeout=10)
        stopped[name] = [run.id for run in recovery.stop_orphans(store, orphans)]

    threads = [threading.Thread(target=sweep, args=(n, s)) for n, s in (("b", b), ("c", c))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(stopped["b"] + stopped["c"]) == sorted(orphans)
    for conversation_id in conversations:
        assert pauses(b, conversation_id) == [("paused", "crash_recovery")]
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        assert recovery.orphaned_runs(connection) == []


async def test_a_node_declared_dead_stops_its_runs_without_recording_them_again(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """A's lease expired and B recorded its runs paused. A's next heartbeat finds its
    row gone: A stands down — refuses new runs, stops its run (the thread returns) — and
    records nothing again; it does not come back into ``nodes``."""
    a_store, b_store = stores(), stores()
    with trio.fail_after(20):
        async with (
            node(node_settings(tmp_path, "a"), a_store, gates) as sup_a,
            node(node_settings(tmp_path, "b"), b_store, gates) as sup_b,
        ):
            conv_a, run_a = await running_run(sup_a, gates, "a", sup_b)
            age_lease(postgres_url, a_store.node_id)
            async with by_hand(sup_b, postgres_url) as lease_b:
                assert await lease_b.beat() is True  # (a): A's row deleted
                assert await lease_b.sweep() == [run_a]  # (b): A's run paused
                assert await lease_b.sweep() == []  # idempotent
            async with by_hand(sup_a, postgres_url) as lease_a:
                assert await lease_a.beat() is False
                assert lease_a.declared_dead.is_set() and sup_a.draining
                assert await lease_a.beat() is False  # at most once: nothing more happens
            assert sup_a.statistics().running == 0  # the run's thread has returned
            assert gates["a"].entries == 1
            with pytest.raises(ShuttingDown):
                await new_and_start(sup_a)
            assert pauses(a_store, conv_a) == [("paused", "crash_recovery")]
            assert a_store.node_id not in rows(postgres_url)
    assert pauses(a_store, conv_a) == [("paused", "crash_recovery")]


async def new_and_start(sup: RunSupervisor) -> None:
    conversation = await new_conversation(sup, gated("late"))
    await sup.start_run(conversation.id)


async def test_start_recovery_on_postgres_leaves_live_nodes_runs_alone(
    tmp_path: Path, stores: Callable[[], PostgresStore], postgres_url: str, gates: Gates
) -> None:
    """A node starting on a shared database pauses only the runs of nodes without a
    live lease (here: one a crashed process left, recorded with its node), never a live
    node's running run."""
    crashed, live, starting = stores(), stores(), stores()
    left, _ = crashed.create_conversation(_new_conversation(gated("never")))
    crashed.create_run(left.id, run_id="left", activate=True, reason="user", started=True)
    with trio.fail_after(20):
        async with node(node_settings(tmp_path, "live"), live, gates) as sup_live:
            conv_live, run_live = await running_run(sup_live, gates, "live")
            async with node(node_settings(tmp_path, "new"), starting, gates):
                assert (await sup_live.get_run(conv_live, run_live)).status is Status.RUNNING
                recovered = starting.get_conversation(left.id)
                assert (recovered.status, recovered.run.reason) == (  # type: ignore[union-attr]
                    Status.PAUSED,
                    "crash_recovery",
                )
                assert pauses(starting, conv_live) == []
                assert set(rows(postgres_url)) == {live.node_id, starting.node_id}
            gates.release_all()


async def test_get_cluster_over_http_on_postgres(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """GET /api/cluster on a real server on PostgreSQL lists its node with the documented
    fields, and the advertised address."""
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    with trio.fail_after(20):
        async with live_server(settings) as server:
            sup: RunSupervisor = server.app.extensions["trellis.supervisor"]
            sup.advertise(str(server.client.base_url).rstrip("/"))
            while True:
                response = await server.client.get("/api/cluster")
                assert response.status_code == 200
                nodes = response.json()["nodes"]
                if nodes[0]["address"]:
                    break
                await trio.sleep(0.01)  # the heartbeat the address woke: bounded
            assert [set(n) for n in nodes] == [
                {"id", "address", "max_concurrent_runs", "running", "last_heartbeat"}
            ]
            assert nodes[0]["id"] == sup.store.node_id
            assert nodes[0]["address"] == str(server.client.base_url).rstrip("/")
            assert (nodes[0]["max_concurrent_runs"], nodes[0]["running"]) == (10, 0)


async def test_get_cluster_on_sqlite_is_this_server_alone(settings: Settings) -> None:
    """On SQLite the route answers one node built from this server's own numbers."""
    app = create_app(settings)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/api/cluster")
        assert response.status_code == 200
        body = await response.get_json()
        sup: RunSupervisor = app.extensions["trellis.supervisor"]
    assert len(body["nodes"]) == 1
    alone = body["nodes"][0]
    assert (alone["id"], alone["address"]) == (sup.store.node_id, "")
    assert (alone["max_concurrent_runs"], alone["running"]) == (2, 0)
    assert alone["last_heartbeat"]


def test_a_version_5_file_gets_runs_node(tmp_path: Path) -> None:
    """(SQLite's v6 migration.) A v5 file (no runs.node) with a run is upgraded on open:
    the old run reads with node null, new runs too, and user_version is 6."""
    path = tmp_path / "old.sqlite3"
    store = SqliteStore(path)
    conversation, _ = store.create_conversation(_new_conversation(gated("x")))
    store.create_run(conversation.id, run_id="old", activate=True, reason="user")
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN node")
        conn.execute("PRAGMA user_version = 5")
        conn.commit()
    migrated = SqliteStore(path)
    try:
        assert migrated.get_run(conversation.id, "old").node is None
        migrated.stop_runs(["old"], reason="test")
        migrated.create_run(conversation.id, run_id="new", activate=True, reason="user")
        assert migrated.get_run(conversation.id, "new").node is None
    finally:
        migrated.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert "node" in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}


def _new_conversation(agent: dict[str, Any]) -> NewConversation:
    return NewConversation(agent=agent, title=None, max_iterations=100)
