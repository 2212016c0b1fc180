"""Two cluster gaps closed, on a real PostgreSQL: deleting a conversation through any node
stops its runs on every node first (app/stopping.py ``delete_conversation``, through
app/cluster/control.py), and every API answer that presents runs shows their cluster-wide
``queue_position`` (app/run_board.py ``RunBoard.with_positions``).

Two nodes are two live servers (create_app on Hypercorn, port 0) on one ``postgres_url``
in one Trio test, as in tests/test_cluster_control.py; runs are steered to a node with the
nodes' run limits (a node with no slot claims nothing), held mid-step by gates; leases
never expire during a test.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from app.events import Event, StatusPayload
from app.testing import Gates, gated_registry
from tests.conftest import assert_all_returned, gated, script
from tests.live import LiveServer, live_server
from tests.test_cluster_control import node_settings

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def two_servers(
    tmp_path: Path, postgres_url: str, gates: Gates, *, b_slots: int
) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    """Servers A (no run slot) and B (``b_slots``) on one database; both left with no run
    and no thread."""
    settings = {
        name: node_settings(
            tmp_path, name, database_url=postgres_url, max_concurrent_runs=slots
        ).model_copy(update={"max_queued_runs": 100})
        for name, slots in (("a", 0), ("b", b_slots))
    }
    async with (
        live_server(settings["a"], gated_registry(gates)) as a,
        live_server(settings["b"], gated_registry(gates)) as b,
    ):
        yield a, b
        gates.release_all()
    assert_all_returned(a.supervisor)
    assert_all_returned(b.supervisor)


def record_statuses(server: LiveServer) -> list[tuple[str | None, str, str | None]]:
    """(run id, status, reason) of every status event the server's own store commits from
    now on (a store listener: it sees the node's own writes, in commit order)."""
    seen: list[tuple[str | None, str, str | None]] = []

    def listen(events: list[Event]) -> None:
        for event in events:
            if isinstance(event.payload, StatusPayload):
                seen.append((event.run_id, event.payload.status.value, event.payload.reason))

    server.supervisor.store.add_listener(listen)
    return seen


def warnings_of_trellis(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("trellis") and r.levelno >= logging.WARNING
    ]


# -- delete across nodes --------------------------------------------------------------------


@pytest.mark.parametrize("through", ["another node", "the run's own node"])
async def test_delete_stops_the_run_on_its_node_first(
    tmp_path: Path,
    postgres_url: str,
    gates: Gates,
    caplog: pytest.LogCaptureFixture,
    through: str,
) -> None:
    """DELETE of a conversation whose run is mid-step on B, through A (the cluster path)
    or through B itself (the cluster path's own-node stop): 204 once B has recorded the
    run ``paused``/``deleted`` (before the rows went), B is left with no run and no
    thread, its step never went on, and nothing was logged as a warning or error."""
    caplog.set_level(logging.WARNING)
    with trio.fail_after(30):
        async with two_servers(tmp_path, postgres_url, gates, b_slots=2) as (a, b):
            created = await b.client.post(
                "/api/conversations", json={"agent": gated("d1", "d2"), "run": True}
            )
            cid, run_id = created.json()["id"], created.json()["run"]["id"]
            await gates["d1"].wait_entered()
            on_b = record_statuses(b)
            asked = a if through == "another node" else b
            deleted = await asked.client.delete(f"/api/conversations/{cid}")
            stats = b.supervisor.statistics()
            gone = [(await s.client.get(f"/api/conversations/{cid}")).status_code for s in (a, b)]
    assert deleted.status_code == 204
    assert on_b == [(run_id, "paused", "deleted")]
    assert (stats.running, stats.queued, stats.run_threads_alive) == (0, 0, 0)
    assert gone == [404, 404]
    assert (gates["d1"].entries, gates["d2"].entries) == (1, 0)
    assert warnings_of_trellis(caplog) == []


async def test_delete_through_a_of_a_queued_run_stops_it_in_the_database(
    tmp_path: Path, postgres_url: str, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    """A run waiting in the cluster queue (no node has a slot) is recorded ``paused``/
    ``deleted`` by A itself before the rows go; a node given slots afterwards starts
    nothing."""
    caplog.set_level(logging.WARNING)
    with trio.fail_after(30):
        async with two_servers(tmp_path, postgres_url, gates, b_slots=0) as (a, b):
            created = await b.client.post(
                "/api/conversations", json={"agent": gated("q1"), "run": True}
            )
            cid, run = created.json()["id"], created.json()["run"]
            assert (run["status"], run["node"]) == ("queued", None)
            on_a = record_statuses(a)
            deleted = await a.client.delete(f"/api/conversations/{cid}")
            stops = list(on_a)
            b.supervisor.set_limits(max_concurrent_runs=2)
            # A later run B then claims and finishes: the deleted one, older, would go first.
            later = await a.client.post(
                "/api/conversations", json={"agent": script({"say": "hi"}), "run": True}
            )
            ended = await run_of(b, later.json()["id"], wait=True)
            runs = await b.client.get("/api/runs")
    assert deleted.status_code == 204
    assert stops == [(run["id"], "paused", "deleted")]
    assert (ended["status"], ended["node"]) == ("finished", b.supervisor.store.node_id)
    assert runs.json()["items"] == []
    assert gates["q1"].entries == 0
    assert warnings_of_trellis(caplog) == []


async def test_delete_through_a_stops_bs_run_and_the_one_queued_behind_it(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """B runs the conversation's run, a second waits behind it in the database: deleting
    through A records B's ``paused``/``deleted`` (the second, not the conversation's
    current run, has no status event of its own) and B never starts the second."""
    with trio.fail_after(30):
        async with two_servers(tmp_path, postgres_url, gates, b_slots=2) as (a, b):
            created = await b.client.post(
                "/api/conversations", json={"agent": gated("m1"), "run": True}
            )
            cid, first = created.json()["id"], created.json()["run"]["id"]
            await gates["m1"].wait_entered()
            second = await b.client.post(
                f"/api/conversations/{cid}/runs", json={"if_busy": "enqueue"}
            )
            assert (second.status_code, second.json()["status"]) == (202, "queued")
            on_b = record_statuses(b)
            deleted = await a.client.delete(f"/api/conversations/{cid}")
    assert deleted.status_code == 204
    assert on_b == [(first, "paused", "deleted")]
    assert gates["m1"].entries == 1


# -- queue positions ------------------------------------------------------------------------


async def test_positions_are_cluster_wide_in_every_answer(
    tmp_path: Path, postgres_url: str, gates: Gates
) -> None:
    """Runs admitted through both nodes while no node has a slot: the conversation's
    record, its run list and the conversation list on either node show positions 1..n in
    admission order, and that is the order the runs then start in."""
    count = 4
    with trio.fail_after(30):
        async with two_servers(tmp_path, postgres_url, gates, b_slots=0) as (a, b):
            cids = []
            for index in range(count):
                via = (a, b)[index % 2]
                created = await via.client.post(
                    "/api/conversations", json={"agent": script({"say": "hi"}), "run": True}
                )
                cids.append(created.json()["id"])
            seen = [await positions(server, cids) for server in (a, b)]
            b.supervisor.set_limits(max_concurrent_runs=1)  # one at a time: starts in order
            ended = [await run_of(b, cid, wait=True) for cid in cids]
    expected = list(range(1, count + 1))
    assert seen == [{"record": expected, "runs": expected, "list": expected}] * 2
    assert [run["status"] for run in ended] == ["finished"] * count
    started = sorted(range(count), key=lambda index: ended[index]["started_at"])
    assert started == list(range(count))


async def positions(server: LiveServer, cids: list[str]) -> dict[str, list[Any]]:
    """The queue positions ``server`` answers for the conversations' runs, each way."""
    records = [(await server.client.get(f"/api/conversations/{cid}")).json() for cid in cids]
    lists = [(await server.client.get(f"/api/conversations/{cid}/runs")).json() for cid in cids]
    listed = (await server.client.get("/api/conversations?limit=100")).json()["items"]
    by_id = {item["id"]: item["run"]["queue_position"] for item in listed}
    return {
        "record": [record["run"]["queue_position"] for record in records],
        "runs": [runs["items"][-1]["queue_position"] for runs in lists],
        "list": [by_id[cid] for cid in cids],
    }


async def run_of(server: LiveServer, cid: str, *, wait: bool = False) -> dict[str, Any]:
    record = (await server.client.get(f"/api/conversations/{cid}")).json()
    if not wait:
        return dict(record["run"])
    path = f"/api/conversations/{cid}/runs/{record['run']['id']}/wait?timeout=20"
    response = await server.client.get(path)
    assert response.status_code == 200, response.text
    return dict(response.json())
