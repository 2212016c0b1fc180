"""Interrupt across nodes: how long a request to node A takes to stop a run on node B.

    .venv/bin/python bench/cluster_control.py [--samples N] [--processes] [--json PATH]

Two nodes on one throwaway PostgreSQL database: A has no run slot (it never claims a run),
B has four. Each sample starts a run on B that sleeps 60 s (``{"sleep": 60}``: a script
step asleep in ``ctx.sleep``), waits until B has recorded it ``running``, then times
``interrupt`` asked of A — until A answers, with the run's record ``paused``/``interrupt``
(B stopped the thread and committed the end before replying; A read the record after
the reply). The same, asked of B itself, is the local baseline. One table: median,
p90, p99 and max per path (the issue's target: <= 100 ms through another node).

* in-process (default): two supervisors in this process, each with its own store — the
  supervisor's ``interrupt`` is what the HTTP route calls;
* ``--processes``: two real servers (``python -m app serve``), timed over HTTP
  (``POST /api/conversations/<id>/interrupt`` on keep-alive connections).

PostgreSQL: ``$TRELLIS_BENCH_POSTGRES`` as in ``bench/postgres_vs_sqlite.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from postgres_vs_sqlite import throwaway_database
from scale import machine_header
from server_process import TrellisServer
from workload import log

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tables import aligned

from app.events import Event, StatusPayload
from app.lifecycle import Status
from app.records import RunRecord
from app.settings import Settings
from app.store.base import NewConversation
from app.store.postgres import PostgresStore
from app.supervisor import RunSupervisor, open_run_supervisor

SLEEPER = {"kind": "script", "steps": [{"sleep": 60}]}
TARGET_MS = 100.0
POLL_SECONDS = 0.002  # over HTTP, waiting for "running" before a sample (not timed)


def summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def rank(fraction: float) -> float:  # nearest rank: of 30 samples, p99 is the largest
        return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]

    return {
        "n": len(ordered),
        "median_ms": statistics.median(ordered),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ordered[-1],
    }


# -- in-process ------------------------------------------------------------------------------


async def sleeping_run_on(b: RunSupervisor) -> str:
    """A conversation whose run sleeps on B (recorded running); its id."""
    new = NewConversation(agent=SLEEPER, title=None, max_iterations=10)
    conversation, _ = await b.io(b.store.create_conversation, new)
    with b.feed.subscribe(conversation.id) as subscription:  # B's own commits reach it
        run = await b.start_run(conversation.id)
        while not is_running(await subscription.receive()):
            pass
    record = await b.get_run(conversation.id, run.id)
    assert record.node == b.store.node_id, "claimed by the wrong node"
    return conversation.id


def is_running(item: object) -> bool:
    return (
        isinstance(item, Event)
        and isinstance(item.payload, StatusPayload)
        and item.payload.status is Status.RUNNING
    )


async def time_interrupts(
    b: RunSupervisor, interrupt: Callable[[str], Awaitable[RunRecord]], samples: int
) -> list[float]:
    timings = []
    for _ in range(samples):
        conversation_id = await sleeping_run_on(b)
        started = time.perf_counter()
        record = await interrupt(conversation_id)
        timings.append((time.perf_counter() - started) * 1000)
        assert (record.status, record.reason) == (Status.PAUSED, "interrupt"), record
    return timings


async def in_process(url: str, samples: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="trellis-bench-") as data:
        settings = {
            name: Settings(data_dir=Path(data) / name, max_concurrent_runs=slots)
            for name, slots in (("a", 0), ("b", 4))
        }
        stores = [PostgresStore(url), PostgresStore(url)]
        try:
            async with (
                open_run_supervisor(settings["a"], stores[0]) as a,
                open_run_supervisor(settings["b"], stores[1]) as b,
            ):
                await time_interrupts(b, a.interrupt, 3)  # warm-up: connections, threads
                through_a = await time_interrupts(b, a.interrupt, samples)
                local = await time_interrupts(b, b.interrupt, samples)
        finally:
            for store in stores:
                store.close()
    return {"through A (in-process)": summary(through_a), "on B (in-process)": summary(local)}


# -- real processes --------------------------------------------------------------------------


def http_sleeping_run_on(b: httpx.Client) -> str:
    created = b.post("/api/conversations", json={"agent": SLEEPER, "run": True})
    created.raise_for_status()
    body = created.json()
    path = f"/api/conversations/{body['id']}/runs/{body['run']['id']}"
    while b.get(path).json()["status"] != "running":
        time.sleep(POLL_SECONDS)
    conversation_id: str = body["id"]
    return conversation_id


def http_time_interrupts(b: httpx.Client, asked: httpx.Client, samples: int) -> list[float]:
    timings = []
    for _ in range(samples):
        conversation_id = http_sleeping_run_on(b)
        started = time.perf_counter()
        answer = asked.post(f"/api/conversations/{conversation_id}/interrupt")
        timings.append((time.perf_counter() - started) * 1000)
        body = answer.json()
        assert (answer.status_code, body["status"], body["reason"]) == (
            202,
            "paused",
            "interrupt",
        ), body
    return timings


def processes(url: str, samples: int) -> dict[str, dict[str, float]]:
    common = ["--database-url", url, "--log-level", "warning"]
    with (
        TrellisServer(*common, "--max-concurrent-runs", "0") as server_a,
        TrellisServer(*common, "--max-concurrent-runs", "4") as server_b,
        httpx.Client(base_url=f"http://127.0.0.1:{server_a.port}", timeout=30) as a,
        httpx.Client(base_url=f"http://127.0.0.1:{server_b.port}", timeout=30) as b,
    ):
        http_time_interrupts(b, a, 3)  # warm-up
        through_a = http_time_interrupts(b, a, samples)
        local = http_time_interrupts(b, b, samples)
    return {"through A (2 servers, HTTP)": summary(through_a), "on B (HTTP)": summary(local)}


# -- report ----------------------------------------------------------------------------------


def format_table(results: dict[str, dict[str, float]]) -> str:
    header = ["interrupt asked of", "n", "median ms", "p90 ms", "p99 ms", "max ms"]
    header.append(f"p99 <= {TARGET_MS:.0f} ms")
    lines = [header]
    for name, result in results.items():
        verdict = "met" if result["p99_ms"] <= TARGET_MS else "MISSED"
        lines.append(
            [
                name,
                str(result["n"]),
                f"{result['median_ms']:.1f}",
                f"{result['p90_ms']:.1f}",
                f"{result['p99_ms']:.1f}",
                f"{result['max_ms']:.1f}",
                verdict if name.startswith("through") else "",
            ]
        )
    return aligned(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30, help="interrupts per path (30)")
    parser.add_argument("--processes", action="store_true", help="also two real servers")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    arguments = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with throwaway_database() as url:
        log("two supervisors in this process")
        results.update(trio.run(in_process, url, arguments.samples))
    if arguments.processes:
        with throwaway_database() as url:
            log("two server processes")
            results.update(processes(url, arguments.samples))
    for key, value in machine_header().items():
        print(f"{key}: {value}")
    print(format_table(results))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
