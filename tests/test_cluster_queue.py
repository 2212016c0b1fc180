"""One run queue for the cluster: runs admitted into the database, claimed by nodes.

Several nodes are several ``PostgresStore``s on the same ``postgres_url``, each with its
own supervisor, in one Trio test (as ``tests/test_cluster_nodes.py``). Which node claims
is steered with each node's run limit: a node at ``max_concurrent_runs = 0`` claims
nothing, and raising its limit wakes its claims at once (``SlotLine.on_free``).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio

from app.errors import RunQueueFull
from app.events import StatusPayload
from app.handles import IfBusy
from app.lifecycle import Status
from app.records import RunRecord
from app.settings import Settings
from app.store import EventQuery
from app.store.base import NewConversation
from app.store.postgres import PostgresStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from tests.conftest import gated, new_conversation
from tests.test_cluster_nodes import stores

__all__ = ["stores"]  # the fixture, imported to be used here

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def nodes(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates, count: int, **limits: int
) -> AsyncIterator[list[RunSupervisor]]:
    """``count`` nodes, each with run limit 0 (claiming nothing until raised)."""
    async with AsyncExitStack() as stack:
        sups = []
        for index in range(count):
            settings = Settings(
                data_dir=tmp_path / f"node{index}",
                max_concurrent_runs=limits.get("max_concurrent_runs", 0),
                max_queued_runs=limits.get("max_queued_runs", 100),
                node_lease_seconds=3600.0,
            )
            sup = await stack.enter_async_context(
                open_run_supervisor(settings, stores(), registry=gated_registry(gates))
            )
            sups.append(sup)
        yield sups


async def admit(sup: RunSupervisor, gate: str) -> RunRecord:
    conversation = await new_conversation(sup, gated(gate))
    return await sup.start_run(conversation.id)


async def wait_status(sup: RunSupervisor, run: RunRecord, status: Status) -> RunRecord:
    """Poll the store until the run has ``status`` (the caller bounds it)."""
    while True:
        record = await sup.io(sup.store.get_run, run.conversation_id, run.id)
        if record.status is status:
            return record
        await trio.sleep(0.01)


def running_events(store: PostgresStore, conversation_id: str) -> int:
    page = store.search_events(conversation_id, EventQuery(kind="status"))
    return sum(
        1
        for event in page.items
        if isinstance(event.payload, StatusPayload) and event.payload.status is Status.RUNNING
    )


async def test_runs_start_in_queue_order_across_nodes(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates
) -> None:
    """Six runs admitted on two nodes alternately get positions 1-6 (in the answer and
    from GET); as each node's slots open, the oldest runs start first — on whichever node
    has the slot — and the positions of the rest move up; start order = queue order."""
    with trio.fail_after(30):
        async with nodes(tmp_path, stores, gates, 2) as (a, b):
            runs = [await admit((a, b)[i % 2], f"g{i}") for i in range(6)]
            assert [run.queue_position for run in runs] == [1, 2, 3, 4, 5, 6]
            assert [run.node for run in runs] == [None] * 6
            got = [await b.get_run(run.conversation_id, run.id) for run in runs]
            assert [run.queue_position for run in got] == [1, 2, 3, 4, 5, 6]
            a.set_limits(max_concurrent_runs=2)
            await gates["g1"].wait_entered()
            b.set_limits(max_concurrent_runs=1)
            await gates["g2"].wait_entered()
            left = [await a.get_run(run.conversation_id, run.id) for run in runs[3:]]
            assert [run.queue_position for run in left] == [1, 2, 3]
            claimed = [await a.get_run(run.conversation_id, run.id) for run in runs[:3]]
            assert [run.node for run in claimed] == [a.store.node_id] * 2 + [b.store.node_id]
            assert [run.status for run in claimed] == [Status.RUNNING] * 3
            assert a.statistics().running == 2 and b.statistics().running == 1
            for index in range(6):
                gates[f"g{index}"].release()
            finished = [await wait_status(a, run, Status.FINISHED) for run in runs]
    started = [run.started_at for run in finished]
    assert started == sorted(started)  # type: ignore[type-var]
    for run in finished:
        assert running_events(a.store, run.conversation_id) == 1  # type: ignore[arg-type]


async def test_max_queued_runs_is_cluster_wide(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates
) -> None:
    """With max_queued_runs = 3 on each node, three runs queued anywhere fill the
    cluster's queue: the next admission on either node is refused with 429 (RunQueueFull,
    Retry-After) and records nothing; once one is claimed, one more is admitted."""
    with trio.fail_after(30):
        async with nodes(tmp_path, stores, gates, 2, max_queued_runs=3) as (a, b):
            runs = [await admit(sup, f"q{i}") for i, sup in enumerate((a, b, a))]
            for sup in (a, b):
                conversation = await new_conversation(sup, gated("refused"))
                with pytest.raises(RunQueueFull) as caught:
                    await sup.start_run(conversation.id)
                assert caught.value.status == 429
                assert caught.value.headers()["Retry-After"]
                record = await sup.io(sup.store.get_conversation, conversation.id)
                assert record.run is None
            b.set_limits(max_concurrent_runs=1)
            await wait_status(b, runs[0], Status.RUNNING)
            extra = await admit(a, "extra")
            assert extra.queue_position == 3
            gates.release_all()


async def test_a_drain_leaves_queued_runs_to_the_other_nodes(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates
) -> None:
    """Node A (one slot) runs the oldest run; A drains: its run is paused (shutdown), the
    two queued runs stay queued in the database and B claims and finishes them."""
    with trio.fail_after(30):
        async with nodes(tmp_path, stores, gates, 2) as (a, b):
            first, second, third = [await admit(a, f"d{i}") for i in range(3)]
            a.set_limits(max_concurrent_runs=1)
            await gates["d0"].wait_entered()
            await a.drain()
            paused = await b.get_run(first.conversation_id, first.id)
            assert (paused.status, paused.reason) == (Status.PAUSED, "shutdown")
            for run in (second, third):
                record = await b.get_run(run.conversation_id, run.id)
                assert (record.status, record.node) == (Status.QUEUED, None)
            for index in range(3):
                gates[f"d{index}"].release()
            b.set_limits(max_concurrent_runs=2)
            for run in (second, third):
                done = await wait_status(b, run, Status.FINISHED)
                assert done.node == b.store.node_id


async def test_a_run_waits_for_its_conversations_run_on_another_node(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates
) -> None:
    """A run enqueued (if_busy=enqueue) on node B behind a run running on node A has no
    position and is not claimable though B has a free slot; once A's run finishes, B
    claims it, makes it the conversation's current run and runs it."""
    with trio.fail_after(30):
        async with nodes(tmp_path, stores, gates, 2) as (a, b):
            conversation = await new_conversation(a, gated("first"))
            a.set_limits(max_concurrent_runs=1)
            first = await a.start_run(conversation.id)
            await gates["first"].wait_entered()
            b.set_limits(max_concurrent_runs=1)
            later = await b.start_run(conversation.id, if_busy=IfBusy.ENQUEUE)
            assert later.queue_position is None
            assert await b.io(b.store.queue_positions, [later.id]) == {}
            assert (await b.get_run(conversation.id, later.id)).status is Status.QUEUED
            a.set_limits(max_concurrent_runs=0)  # so that B claims it
            gates["first"].release()
            assert (await wait_status(a, first, Status.FINISHED)).node == a.store.node_id
            done = await wait_status(b, later, Status.FINISHED)
            assert done.node == b.store.node_id
            current = await b.io(b.store.get_conversation, conversation.id)
            assert current.run is not None and current.run.id == later.id


async def test_if_busy_interrupt_stops_the_run_on_another_node(
    tmp_path: Path, stores: Callable[[], PostgresStore], gates: Gates
) -> None:
    """A run admitted through node B with if_busy=interrupt, while the conversation's run
    runs on node A: A's run is recorded paused / interrupt, and the new run runs."""
    with trio.fail_after(30):
        async with nodes(tmp_path, stores, gates, 2) as (a, b):
            conversation = await new_conversation(a, gated("held", "then"))
            a.set_limits(max_concurrent_runs=1)
            first = await a.start_run(conversation.id)
            await gates["held"].wait_entered()
            later = await b.start_run(conversation.id, if_busy=IfBusy.INTERRUPT)
            stopped = await a.get_run(conversation.id, first.id)
            assert (stopped.status, stopped.reason) == (Status.PAUSED, "interrupt")
            gates["held"].release()
            gates["then"].release()
            assert (await wait_status(b, later, Status.FINISHED)).status is Status.FINISHED


def test_concurrent_claimers_claim_each_run_once(
    stores: Callable[[], PostgresStore], postgres_url: str
) -> None:
    """Three stores claim 150 queued runs in batches of 7 from three threads at once:
    every run is claimed exactly once, with one ``running`` status event, and each
    claimer's runs come in queue order."""
    admitting, *claimers = stores(), stores(), stores(), stores()
    conversations = []
    for index in range(150):
        conversation, _ = admitting.create_conversation(
            NewConversation(agent=gated("x"), title=None, max_iterations=5)
        )
        admitting.create_run(conversation.id, run_id=f"r{index:03}", activate=True, reason="user")
        conversations.append(conversation.id)
    barrier = threading.Barrier(len(claimers))
    claimed: dict[str, list[str]] = {}

    def claim_all(store: PostgresStore) -> None:
        barrier.wait(timeout=10)
        mine = claimed.setdefault(store.node_id, [])
        while batch := store.claim_runs(7):
            mine.extend(run.id for run, _ in batch)

    threads = [threading.Thread(target=claim_all, args=(store,)) for store in claimers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    every = sorted(run_id for ids in claimed.values() for run_id in ids)
    assert every == [f"r{index:03}" for index in range(150)]
    for ids in claimed.values():
        assert ids == sorted(ids)
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT node, count(*) FROM runs WHERE status = 'running' GROUP BY node"
        ).fetchall()
    assert dict(rows) == {node: len(ids) for node, ids in claimed.items() if ids}
    for conversation_id in conversations:
        assert running_events(admitting, conversation_id) == 1
