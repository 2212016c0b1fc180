"""Three real ``python -m app serve`` processes on one PostgreSQL database: one cluster.

What only real processes show: the cluster's queue shared by three processes (each with
its own run limiter), claims racing across processes, and a node killed with SIGKILL
(no drain, no clean lease delete) whose runs the others record paused.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import script
from tests.test_process import Server, events_of, servers

__all__ = ["servers"]  # the fixture, imported to be used here

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def start_nodes(
    tmp_path: Path, servers: list[Server], url: str, count: int, *args: str
) -> list[Server]:
    for index in range(count):
        servers.append(Server(tmp_path / f"node{index}", "--database-url", url, *args))
    return servers[-count:]


def admit(nodes: list[Server], agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One conversation with a run per agent, admitted round-robin through the nodes, one
    request after the other (so the queue's order is this order); their runs."""
    runs = []
    for node, agent in zip(itertools.cycle(nodes), agents, strict=False):
        created = node.json("POST", "/api/conversations", json={"agent": agent, "run": True})
        runs.append(created["run"])
    return runs


def read_runs(node: Server, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        node.json("GET", f"/api/conversations/{run['conversation_id']}/runs/{run['id']}")
        for run in runs
    ]


def wait_for(node: Server, runs: list[dict[str, Any]], done: Any, seconds: float) -> list[Any]:
    """Poll until ``done(records)``; the records (bounded by ``seconds``)."""
    deadline = time.monotonic() + seconds
    while not done(records := read_runs(node, runs)):
        assert time.monotonic() < deadline, [(r["status"], r["reason"]) for r in records]
        time.sleep(0.05)
    return records


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one moment (an end before a start at the same time)."""
    moments = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = most = 0
    for _, change in moments:
        open_now += change
        most = max(most, open_now)
    return most


def test_three_nodes_run_sixty_runs_once_each_in_fifo_order(
    tmp_path: Path, servers: list[Server], postgres_url: str
) -> None:
    """60 script runs admitted through three nodes (max_concurrent_runs = 4 each): every
    run finishes, executed exactly once (its one message, one ``running`` status event),
    never more than 12 at once nor 4 on one node, started in the queue's order, and the
    work is shared by the three nodes."""
    nodes = start_nodes(tmp_path, servers, postgres_url, 3, "--max-concurrent-runs", "4")
    agents = [script({"say": f"run {i}"}, {"sleep": 0.2}, {"finish": "ok"}) for i in range(60)]
    runs = admit(nodes, agents)
    assert runs[0]["queue_position"] == 1  # the cluster-wide position, at admission
    assert all(run["status"] == "queued" and run["queue_position"] >= 1 for run in runs)
    records = wait_for(
        nodes[0], runs, lambda rs: all(r["status"] == "finished" for r in rs), seconds=60
    )
    for index, record in enumerate(records):
        events = events_of(nodes[index % 3], record["conversation_id"])
        said = [e for e in events if e["kind"] == "message" and e["source"] == "agent"]
        assert [e["payload"]["text"] for e in said] == [f"run {index}", "ok"]
        statuses = [e["payload"]["status"] for e in events if e["kind"] == "status"]
        assert statuses == ["queued", "running", "finished"]
    times = [
        (datetime.fromisoformat(r["started_at"]), datetime.fromisoformat(r["finished_at"]))
        for r in records
    ]
    assert most_at_once(times) <= 12
    by_node = Counter(record["node"] for record in records)
    assert len(by_node) == 3, by_node
    for node_id in by_node:
        mine = [t for t, r in zip(times, records, strict=True) if r["node"] == node_id]
        assert most_at_once(mine) <= 4
    started = [start for start, _ in times]
    assert started == sorted(started)  # global FIFO: start order = admission order
    for node in nodes:
        assert node.stop(signal.SIGTERM)[0] == 0


def test_a_killed_nodes_runs_are_paused_while_the_others_go_on(
    tmp_path: Path, servers: list[Server], postgres_url: str
) -> None:
    """Three nodes (lease 1 s, 2 slots each), 10 runs of 3 s: 6 run, 4 wait in the queue.
    SIGKILL one node: within the lease and a sweep tick its 2 runs are recorded
    paused / crash_recovery; the other 8 all finish on the two nodes left."""
    args = ("--max-concurrent-runs", "2", "--node-lease-seconds", "1")
    nodes = start_nodes(tmp_path, servers, postgres_url, 3, *args)
    agents = [script({"sleep": 3}, {"finish": "ok"}) for _ in range(10)]
    runs = admit(nodes, agents)
    wait_for(nodes[0], runs, lambda rs: sum(r["status"] == "running" for r in rs) == 6, 20)
    victim = nodes[2]
    victim_id = next(
        n["id"] for n in nodes[0].json("GET", "/api/cluster")["nodes"] if n["address"] == victim.url
    )
    victim.process.kill()
    killed = time.monotonic()
    victim.process.wait(timeout=10)
    mine = [r for r in read_runs(nodes[0], runs) if r["node"] == victim_id]
    assert len(mine) == 2
    paused = wait_for(nodes[0], mine, lambda rs: all(r["status"] == "paused" for r in rs), 10)
    took = time.monotonic() - killed
    assert [r["reason"] for r in paused] == ["crash_recovery"] * 2
    assert took < 1 + 1 / 3 + 1.5  # the lease, a heartbeat tick, slack for a busy machine
    others = [r for r in runs if r["id"] not in {m["id"] for m in mine}]
    finished = wait_for(
        nodes[0], others, lambda rs: all(r["status"] == "finished" for r in rs), seconds=30
    )
    assert {r["node"] for r in finished} <= {
        n["id"] for n in nodes[0].json("GET", "/api/cluster")["nodes"]
    }
    for node in nodes[:2]:
        assert node.stop(signal.SIGTERM)[0] == 0
