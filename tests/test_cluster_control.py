"""Pause and interrupt across nodes (app/cluster/control.py, the cluster branch of
app/stopping.py), on a real PostgreSQL: a request to node A reaches a run on node B,
which stops it exactly as a local request would; A answers with the same statuses.

Two nodes are two ``PostgresStore``s on one ``postgres_url``, each with its own
supervisor (or its own live server), in one Trio test. Runs are queued in the database and
claimed by a node with a free slot (app/cluster/claims.py): node A has no slot unless a
test says otherwise, so that every run is B's. Runs are held mid-step by gates; leases
never expire during a test (no sweep pauses anything behind the test's back).
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from app.cluster import control
from app.cluster.control_messages import Reply, Request, parse
from app.errors import IllegalTransition
from app.events import Event, StatusPayload
from app.handles import IfBusy
from app.lifecycle import Status
from app.settings import Settings
from app.stopping import INTERRUPT_JOIN_SECONDS
from app.store.base import EventQuery
from app.store.postgres import PostgresStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from tests import pg
from tests.conftest import assert_all_returned, gated, new_conversation, script
from tests.live import LiveServer, live_server
from tests.test_process import Server, servers
from tests.test_streams import stream

__all__ = ["servers"]  # the fixture, imported to be used here

pytestmark = pytest.mark.timeout(60)

#: A lease whose heartbeat and sweep never tick during a test.
FOREVER = 3600.0


def node_settings(tmp_path: Path, name: str, **fields: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / name, max_queued_runs=3, node_lease_seconds=FOREVER, **fields
    )


@asynccontextmanager
async def two_nodes(
    tmp_path: Path, url: str, gates: Gates, b_slots: int = 2
) -> AsyncIterator[tuple[RunSupervisor, RunSupervisor]]:
    """Nodes A (no run slot: it never claims) and B (``b_slots``), each with its own
    store on ``url``; both left with no run and no thread, their stores closed after."""
    a_settings = node_settings(tmp_path, "a", max_concurrent_runs=0)
    b_settings = node_settings(tmp_path, "b", max_concurrent_runs=b_slots)
    with closing(PostgresStore(url)) as a_store, closing(PostgresStore(url)) as b_store:
        async with (
            open_run_supervisor(a_settings, a_store, registry=gated_registry(gates)) as a,
            open_run_supervisor(b_settings, b_store, registry=gated_registry(gates)) as b,
        ):
            yield a, b
            gates.release_all()
    assert_all_returned(a)
    assert_all_returned(b)


async def running_on(sup: RunSupervisor, gates: Gates, *steps: str) -> tuple[str, str]:
    """A run claimed by ``sup``'s node, held inside its first step; (conversation id, run
    id). Admitted through the node itself (admission on any node queues it cluster-wide)."""
    conversation = await new_conversation(sup, gated(*steps))
    run = await sup.start_run(conversation.id)
    await gates[steps[0]].wait_entered()
    record = await sup.get_run(conversation.id, run.id)
    assert record.node == sup.store.node_id, "claimed by another node"
    return conversation.id, run.id


def stops_recorded(store: PostgresStore, conversation_id: str) -> list[tuple[str, str | None]]:
    """(status, reason) of every ``paused`` or ``pausing`` status event of the conversation."""
    page = store.search_events(conversation_id, EventQuery(kind="status"))
    found = []
    for event in page.items:
        assert isinstance(event.payload, StatusPayload)
        if event.payload.status in (Status.PAUSED, Status.PAUSING):
            found.append((event.payload.status.value, event.payload.reason))
    return found


def set_run(url: str, run_id: str, **columns: Any) -> None:
    """Change a run's row behind the stores' backs (what another node's write would do)."""
    assignments = ", ".join(f"{name} = %s" for name in columns)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            f"UPDATE runs SET {assignments} WHERE id = %s", (*columns.values(), run_id)
        )


# -- the messages ---------------------------------------------------------------------------


def test_control_messages_parse_back_and_malformed_ones_are_none() -> None:
    """Requests and replies survive their payloads; anything else parses to ``None``."""
    request = Request("interrupt", "r1", "node-b", "node-a.7")
    reply = Reply("node-a.7", "node-b")
    assert parse(request.payload()) == request
    assert parse(reply.payload()) == reply
    bad = ["", "done", "done t", "stop r1 b t", "pause r1 b", "pause  b t", "done t b extra"]
    assert [parse(payload) for payload in bad] == [None] * len(bad)


# -- through the supervisor (what the HTTP routes call) -------------------------------------


async def test_interrupt_through_a_stops_a_run_on_b(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """Node A has no run; interrupting through A stops B's run mid-step: the answer is
    ``paused``/``interrupt`` within the brief-join bound, B's thread has stopped (its gate
    entered once, never passed), and the stop is recorded once."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            conversation_id, run_id = await running_on(sup_b, gates, "b1", "b2")
            assert sup_a.statistics().running == 0
            started = trio.current_time()
            run = await sup_a.interrupt(conversation_id)
            elapsed = trio.current_time() - started
            assert (run.id, run.status, run.reason, run.steps) == (
                run_id,
                Status.PAUSED,
                "interrupt",
                0,
            )
            assert run.node == sup_b.store.node_id
            assert elapsed < INTERRUPT_JOIN_SECONDS
            stats = sup_b.statistics()
            assert (stats.running, stats.run_threads_alive) == (0, 0)
            recorded = stops_recorded(sup_a.store, conversation_id)  # type: ignore[arg-type]
            conversation = await sup_a.io(sup_a.store.get_conversation, conversation_id)
    assert recorded == [("paused", "interrupt")]
    assert conversation.status is Status.PAUSED
    assert (gates["b1"].entries, gates["b2"].entries) == (1, 0)


async def test_pause_through_a_of_a_run_on_b_pauses_at_its_step_boundary(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """Pausing through A answers ``pausing`` as B would; B's run ends ``paused`` at its
    next step boundary, its second step never entered."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            conversation_id, run_id = await running_on(sup_b, gates, "p1", "p2")
            run = await sup_a.pause(conversation_id)
            assert (run.id, run.status, run.reason) == (run_id, Status.PAUSING, "pause")
            gates["p1"].release()
            ended = await sup_b.wait_run(conversation_id, run_id, timeout_seconds=10)
            recorded = stops_recorded(sup_a.store, conversation_id)  # type: ignore[arg-type]
    assert ended is not None
    assert (ended.status, ended.reason, ended.steps) == (Status.PAUSED, "pause", 1)
    assert recorded == [("pausing", "pause"), ("paused", "pause")]
    assert gates["p2"].entries == 0


@pytest.mark.parametrize("action", ["pause", "interrupt"])
async def test_a_queued_unclaimed_run_is_stopped_in_the_database(
    tmp_path: Path, postgres_url: str, action: str
) -> None:
    """A run queued in the cluster queue (no node: neither node has a free slot) has no
    thread: pausing or interrupting it through A records it ``paused`` with the action as
    reason, at once, with its status event — and no node ever starts it."""
    gates = Gates()
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates, b_slots=0) as (sup_a, sup_b):
            conversation = await new_conversation(sup_b, gated("never"))
            queued, _ = await sup_b.io(
                sup_b.store.create_run, conversation.id, run_id="queued-1", activate=True,
                reason="user",
            )  # fmt: skip
            assert (queued.status, queued.node) == (Status.QUEUED, None)
            record = await getattr(sup_a, action)(conversation.id)
            recorded = stops_recorded(sup_a.store, conversation.id)  # type: ignore[arg-type]
            again = await sup_b.io(sup_b.store.get_conversation, conversation.id)
    assert (record.id, record.status, record.reason) == ("queued-1", Status.PAUSED, action)
    assert record.node is None and record.started_at is None
    assert recorded == [("paused", action)]
    assert again.status is Status.PAUSED
    assert gates["never"].entries == 0


async def test_interrupt_through_a_stops_the_unclaimed_run_behind_bs_run_first(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """B runs the conversation's run; a second one waits behind it in the cluster queue.
    Interrupting through A stops both — the queued one before B's frees B's slot, so that
    B never claims and starts it."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates, b_slots=1) as (sup_a, sup_b):
            conversation_id, first_id = await running_on(sup_b, gates, "m")
            second = await sup_b.start_run(conversation_id, if_busy=IfBusy.ENQUEUE)
            run = await sup_a.interrupt(conversation_id)
            later = await sup_a.get_run(conversation_id, second.id)
            recorded = stops_recorded(sup_a.store, conversation_id)  # type: ignore[arg-type]
    assert (run.id, run.status, run.reason) == (first_id, Status.PAUSED, "interrupt")
    assert (later.status, later.reason, later.started_at) == (Status.PAUSED, "interrupt", None)
    assert recorded == [("paused", "interrupt")]  # the current run's: the conversation's
    assert gates["m"].entries == 1


@pytest.mark.parametrize("action", ["pause", "interrupt"])
async def test_nothing_active_anywhere_is_409(
    tmp_path: Path, postgres_url: str, gates: Gates, action: str
) -> None:
    """With no active run on any node, A refuses as a single server does."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            conversation = await new_conversation(sup_b, gated("x"))
            with pytest.raises(IllegalTransition, match=f"cannot {action}"):
                await getattr(sup_a, action)(conversation.id)


async def test_a_run_its_node_does_not_have_is_left_alone(
    tmp_path: Path, postgres_url: str, gates: Gates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database says B runs a run B does not have (made so here): B waits
    ``LAUNCH_WAIT_SECONDS`` for a launch that never comes, then replies; A — which never
    records another node's run — answers with the record as the database has it, on B's
    reply, before its own wait would end."""
    monkeypatch.setattr(control, "LAUNCH_WAIT_SECONDS", 0.1)
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            conversation_id, run_id = await running_on(sup_b, gates, "e")
            gates["e"].release()
            assert await sup_b.wait_run(conversation_id, run_id, timeout_seconds=10)
            set_run(postgres_url, run_id, status="running")
            started = trio.current_time()
            run = await sup_a.interrupt(conversation_id)
            elapsed = trio.current_time() - started
    assert (run.id, run.status) == (run_id, Status.RUNNING)
    assert 0.1 <= elapsed < control.REPLY_SECONDS


async def test_a_request_for_a_run_b_is_launching_waits_for_it(
    tmp_path: Path, postgres_url: str, gates: Gates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's claim has recorded the run ``running`` but B has not launched it yet when the
    interrupt arrives (held here until B has looked for it): B waits for the launch and
    stops the run; A answers ``paused``/``interrupt`` as for a run B had all along."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            launch, looked = trio.Event(), trio.Event()
            launch_claimed, conversation_here = (
                sup_b.desk.launch_claimed,
                sup_b.stops.conversation_here,
            )

            async def held(claimed: Any) -> None:
                await launch.wait()
                await launch_claimed(claimed)

            def watched(run_id: str) -> str | None:
                found = conversation_here(run_id)
                if found is None:
                    looked.set()
                return found

            monkeypatch.setattr(sup_b.desk, "launch_claimed", held)
            monkeypatch.setattr(sup_b.stops, "conversation_here", watched)
            conversation = await new_conversation(sup_a, gated("l"))
            with sup_a.feed.subscribe(conversation.id) as subscription:
                started = await sup_a.start_run(conversation.id)  # queued; B claims it
                while not is_running(await subscription.receive()):
                    pass
            answers = []

            async def interrupt() -> None:
                answers.append(await sup_a.interrupt(conversation.id))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(interrupt)
                await looked.wait()
                launch.set()
    (run,) = answers
    assert (run.id, run.status, run.reason) == (started.id, Status.PAUSED, "interrupt")
    assert run.node == sup_b.store.node_id


def is_running(item: object) -> bool:
    return (
        isinstance(item, Event)
        and isinstance(item.payload, StatusPayload)
        and item.payload.status is Status.RUNNING
    )


async def test_a_run_of_a_node_that_does_not_answer_is_left_to_the_sweeper(
    tmp_path: Path,
    postgres_url: str,
    gates: Gates,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of a node that does not answer (dead, not yet swept): A waits for its reply
    for ``REPLY_SECONDS`` only, then answers with the run as it is — still running: only
    its node, or the sweeper once the lease expired, may record it stopped."""
    monkeypatch.setattr(control, "REPLY_SECONDS", 0.2)
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            conversation_id, run_id = await running_on(sup_b, gates, "d")
            set_run(postgres_url, run_id, node="gone")
            started = trio.current_time()
            run = await sup_a.interrupt(conversation_id)
            elapsed = trio.current_time() - started
            set_run(postgres_url, run_id, node=sup_b.store.node_id)  # B ends it at the close
    assert (run.id, run.status, run.node) == (run_id, Status.RUNNING, "gone")
    assert 0.2 <= elapsed < 1.0


async def test_control_connections_ended_by_the_server_are_made_again(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """The database ends both nodes' control sessions (a restart, an administrator): the
    next interrupt through A still reaches B's run and answers ``paused``: A's asking
    connection (made when A started) is made again at once, and the request, lost while
    B's listener reconnects, is sent again until B replies."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url, gates) as (sup_a, sup_b):
            conversation_id, run_id = await running_on(sup_b, gates, "t")
            for sup in (sup_a, sup_b):
                ended = pg.terminate_sessions(postgres_url, f"trellis-control-{sup.store.node_id}")
                assert ended and all(ended)
            run = await sup_a.interrupt(conversation_id)
    assert (run.id, run.status, run.reason) == (run_id, Status.PAUSED, "interrupt")
    assert gates["t"].entries == 1


# -- through HTTP: two live servers ---------------------------------------------------------


@asynccontextmanager
async def two_servers(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    """Servers A (no run slot) and B (create_app on Hypercorn, port 0) on one database."""
    settings = {
        name: node_settings(tmp_path, name, database_url=postgres_url, max_concurrent_runs=slots)
        for name, slots in (("a", 0), ("b", 2))
    }
    async with (
        live_server(settings["a"], gated_registry(gates)) as a,
        live_server(settings["b"], gated_registry(gates)) as b,
    ):
        yield a, b
        gates.release_all()


async def test_pause_and_interrupt_through_as_api_of_a_run_on_b(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """Over HTTP, as on one server: pause → 202 pausing; interrupt → 202 paused; then
    409 for both — all asked of A while B runs the run."""
    with trio.fail_after(30):
        async with two_servers(tmp_path, postgres_url, gates) as (a, b):
            created = await b.client.post(
                "/api/conversations", json={"agent": gated("h1", "h2"), "run": True}
            )
            cid = created.json()["id"]
            await gates["h1"].wait_entered()
            paused = await a.client.post(f"/api/conversations/{cid}/pause")
            info = await a.client.get(f"/api/conversations/{cid}")
            interrupted = await a.client.post(f"/api/conversations/{cid}/interrupt")
            refused = [
                await a.client.post(f"/api/conversations/{cid}/{action}")
                for action in ("pause", "interrupt")
            ]
    assert (paused.status_code, paused.json()["status"]) == (202, "pausing")
    assert info.json()["status"] == "pausing"
    body = interrupted.json()
    assert (interrupted.status_code, body["status"], body["reason"]) == (202, "paused", "interrupt")
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [
        (409, "illegal_transition")
    ] * 2


async def test_a_stream_on_a_of_a_conversation_running_on_b_gets_every_event(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """A's event stream of a run on B: every event B stored, in order, none twice, up to
    the final status."""
    with trio.fail_after(30):
        async with two_servers(tmp_path, postgres_url, gates) as (a, b):
            created = await b.client.post(
                "/api/conversations", json={"agent": gated("s1", "s2", "s3"), "run": True}
            )
            cid = created.json()["id"]
            await gates["s1"].wait_entered()
            async with stream(a, cid) as frames:
                for name in ("s1", "s2", "s3"):
                    gates[name].release()
                seen: list[dict[str, Any]] = []
                while not seen or seen[-1]["data"].get("payload", {}).get("status") != "finished":
                    frame = await frames.next()
                    if "id" in frame:
                        seen.append(frame)
            stored = (await b.client.get(f"/api/conversations/{cid}/events?limit=100")).json()
    assert [frame["data"]["id"] for frame in seen] == [event["id"] for event in stored["items"]]
    assert [int(frame["id"]) for frame in seen] == list(range(1, len(seen) + 1))


# -- two real server processes --------------------------------------------------------------


@pytest.mark.slow
def test_two_server_processes_interrupt_through_a_of_a_run_asleep_on_b(
    tmp_path: Path, servers: list[Server], postgres_url: str
) -> None:
    """Two ``python -m app serve`` processes: A (no run slot) answers an interrupt of a
    run asleep on B with 202 ``paused``/``interrupt`` within the brief-join bound, and B
    has no run and no run thread left."""
    flags = ["--database-url", postgres_url, "--node-lease-seconds", str(FOREVER)]
    a = Server(tmp_path / "a", *flags, "--max-concurrent-runs", "0")
    servers.append(a)
    b = Server(tmp_path / "b", *flags, "--max-concurrent-runs", "2")
    servers.append(b)
    agent = script({"sleep": 60})
    created = b.json("POST", "/api/conversations", json={"agent": agent, "run": True})
    b.wait_until_running(1)
    started = time.monotonic()
    answer = a.client.post(f"/api/conversations/{created['id']}/interrupt")
    elapsed = time.monotonic() - started
    body = answer.json()
    assert (answer.status_code, body["status"], body["reason"]) == (202, "paused", "interrupt")
    assert body["id"] == created["run"]["id"]
    assert elapsed < INTERRUPT_JOIN_SECONDS
    stats = b.json("GET", "/api/server")["statistics"]
    assert (stats["running"], stats["run_threads_alive"]) == (0, 0)
    for server in (a, b):
        assert server.stop(signal.SIGTERM)[0] == 0
