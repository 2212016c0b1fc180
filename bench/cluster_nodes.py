"""Runs/s with 1, 2 and 3 nodes on one PostgreSQL database (issue 13's cluster benchmark).

    .venv/bin/python bench/cluster_nodes.py [--quick] [--runs N] [--slots K] [--json PATH]

For each cluster size (1, 2, 3 nodes) a fresh throwaway database and that many real
servers (``python -m app serve --database-url URL --max-concurrent-runs K``), then three
phases on them (``N`` = 600, ``K`` = 8; ``--quick``: 60 and 4). The runs are short
scripts (say, sleep 0.05 s, finish); ``K`` slots per node and the sleep would allow
``nodes * K / 0.05`` runs/s, far above what is measured: what bounds the rate is
admissions, claims, run starts and their commits, not the sleep.

* **burst**: ``CLIENTS`` client threads admit ``N`` runs, run ``i`` through node
  ``i % nodes`` (each thread a keep-alive connection per node), while the nodes claim
  them from the cluster's one queue. **runs/s**: ``N`` over the seconds from the first
  admission to the last run recorded ``finished`` (this script polls the ``runs``
  table); also admissions/s, **queue to start** (``started_at - queued_at`` of the run
  records, median and p99 — with every run admitted at once, mostly time spent behind
  the backlog), the runs each node ran, and the **CPU** of the nodes, of the
  ``postgres`` processes and of this script as cores busy (CPU seconds / wall seconds):
  on a 2-core machine the nodes and PostgreSQL share the same 2 cores;
* **prefilled queue**: every node set to 0 slots (``PATCH /api/server/limits``), ``N``
  runs admitted (admissions/s into a growing queue, nothing claimed), ``ANALYZE``, then
  every node back to ``K``: runs/s from that PATCH to the last run finished — claims and
  runs alone, no admissions beside them. The ``ANALYZE`` gives the planner statistics
  taken with the queue long: without them (the burst's fresh database: autovacuum looks
  once a minute) or with statistics taken while little was queued, the claim and
  queue-position queries become a nested-loop anti-join of queued against active runs,
  tens of milliseconds per call with hundreds queued;
* **idle**: 20 runs (quick: 5) admitted one at a time, round-robin, each after the
  previous one finished: queue to start with no backlog (a NOTIFY-woken claim).

One table: a column per cluster size and the ratio to 1 node (machine, date, commit
above it). PostgreSQL: ``$TRELLIS_BENCH_POSTGRES`` as in ``bench/postgres_vs_sqlite.py``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from postgres_vs_sqlite import postgres_cpu_seconds, throwaway_database
from raw_client import RawClient
from scale import machine_header
from server_process import TrellisServer
from tables import aligned
from workload import log, percentile

NODE_COUNTS = (1, 2, 3)
FULL = {"runs": 600, "slots": 8, "idle_samples": 20}
QUICK = {"runs": 60, "slots": 4, "idle_samples": 5}
CLIENTS = 4  # admitting threads: like workload.CREATE_CONNECTIONS, enough to keep the
# nodes busy on 2 cores without the client eating them
SLEEP_SECONDS = 0.05
SHORT_RUN = {
    "kind": "script",
    "steps": [{"say": "hi"}, {"sleep": SLEEP_SECONDS}, {"finish": "ok"}],
}
POLL_SECONDS = 0.02  # the runs table: ~50 cheap counts a second
FINISH_TIMEOUT_SECONDS = 300.0  # 600 runs at the slowest rate seen (~20/s) is 30 s; 10x
ACTIVE = ("queued", "running", "pausing")
STATUS_COUNTS = "SELECT status, count(*) FROM runs GROUP BY status"
PREFILLED = "prefilled: "  # the table's label of the prefilled phase
AUTOANALYZED = "SELECT autoanalyze_count FROM pg_stat_user_tables WHERE relname = 'runs'"


# -- the cluster -----------------------------------------------------------------------------


def start_nodes(stack: ExitStack, url: str, count: int, slots: int) -> list[TrellisServer]:
    """``count`` servers on ``url``, each with ``slots`` run slots, all in the cluster."""
    args = ("--database-url", url, "--max-concurrent-runs", str(slots), "--log-level", "warning")
    nodes = [stack.enter_context(TrellisServer(*args)) for _ in range(count)]
    with RawClient(nodes[0].port) as client:
        listed = client.call("GET", "/api/cluster")["nodes"]
    if len(listed) != count:
        raise RuntimeError(f"expected {count} nodes in /api/cluster, got {listed}")
    return nodes


def admit(nodes: list[TrellisServer], count: int, clients: int = CLIENTS) -> None:
    """``count`` conversations with a run, run ``i`` through node ``i % len(nodes)``, from
    ``clients`` threads (thread ``t`` admits runs ``t, t + clients, …``)."""
    body = {"agent": SHORT_RUN, "run": True}

    def share(first: int) -> None:
        with ExitStack() as stack:
            conns = [stack.enter_context(RawClient(node.port)) for node in nodes]
            for index in range(first, count, clients):
                conns[index % len(conns)].call("POST", "/api/conversations", body, 201)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(share, range(clients)))  # list(): re-raise a thread's error


def wait_until_done(url: str, count: int) -> None:
    """Poll the runs table until ``count`` runs are finished; raise if one ended otherwise
    or on timeout."""
    deadline = time.perf_counter() + FINISH_TIMEOUT_SECONDS
    with psycopg.connect(url, autocommit=True) as db:
        while True:
            rows: dict[str, int] = dict(db.execute(STATUS_COUNTS).fetchall())
            ended_otherwise = {s: n for s, n in rows.items() if s not in (*ACTIVE, "finished")}
            if ended_otherwise:
                raise RuntimeError(f"runs ended other than finished: {rows}")
            if rows.get("finished", 0) >= count:
                return
            if time.perf_counter() > deadline:
                raise TimeoutError(f"waited {FINISH_TIMEOUT_SECONDS} s; runs: {rows}")
            time.sleep(POLL_SECONDS)


def run_rows(url: str) -> list[tuple[str, datetime, datetime]]:
    """(node, queued_at, started_at) of every run, in admission order."""
    with psycopg.connect(url, autocommit=True) as db:
        rows = db.execute("SELECT node, queued_at, started_at FROM runs ORDER BY n").fetchall()
    return [(node, datetime.fromisoformat(q), datetime.fromisoformat(s)) for node, q, s in rows]


def waits_ms(rows: list[tuple[str, datetime, datetime]]) -> list[float]:
    return [(started - queued).total_seconds() * 1e3 for _, queued, started in rows]


# -- one cluster size ------------------------------------------------------------------------


def measure(node_count: int, sizes: dict[str, int]) -> dict[str, Any]:
    """A fresh database and ``node_count`` nodes: the burst, the prefilled queue, then the
    idle claims."""
    with throwaway_database() as url, ExitStack() as stack:
        nodes = start_nodes(stack, url, node_count, sizes["slots"])
        result = burst(url, nodes, sizes["runs"])
        result["autoanalyzed_during_burst"] = autoanalyzed(url)
        result["prefilled"] = prefilled(url, nodes, sizes["runs"], sizes["slots"])
        result["idle_claim"] = idle_claims(url, nodes, sizes["idle_samples"])
    return result


def autoanalyzed(url: str) -> bool:
    """Whether autovacuum has analyzed ``runs`` yet (it looks once a minute by default)."""
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(AUTOANALYZED).fetchone()
    return bool(row and row[0])


class CpuMeter:
    """Cores busy (CPU seconds / wall seconds) of the nodes, the ``postgres`` processes and
    this script, from construction to :meth:`read`."""

    def __init__(self, nodes: list[TrellisServer]) -> None:
        self.nodes = nodes
        self.before = [node.cpu_seconds() for node in nodes]
        self.postgres, self.client = postgres_cpu_seconds(), time.process_time()

    def read(self, seconds: float) -> dict[str, float]:
        nodes = sum(n.cpu_seconds() - b for n, b in zip(self.nodes, self.before, strict=True))
        return {
            "nodes": nodes / seconds,
            "postgres": (postgres_cpu_seconds() - self.postgres) / seconds,
            "client": (time.process_time() - self.client) / seconds,
        }


def burst(url: str, nodes: list[TrellisServer], count: int) -> dict[str, Any]:
    """Admit ``count`` runs at once while the nodes claim: runs/s, admissions/s,
    queue-to-start, runs per node, CPU."""
    already = len(run_rows(url))
    meter = CpuMeter(nodes)
    started = time.perf_counter()
    admit(nodes, count)
    admitted = time.perf_counter() - started
    wait_until_done(url, already + count)
    seconds = time.perf_counter() - started
    rows = run_rows(url)[already:]
    waits = waits_ms(rows)
    return {
        "runs": count,
        "seconds": seconds,
        "runs_per_second": count / seconds,
        "admitted_per_second": count / admitted,
        "wait_median_ms": statistics.median(waits),
        "wait_p99_ms": percentile(waits, 0.99),
        "runs_per_node": sorted(Counter(node for node, _, _ in rows).values()),
        "cores_busy": meter.read(seconds),
    }


def prefilled(url: str, nodes: list[TrellisServer], count: int, slots: int) -> dict[str, Any]:
    """Every node at 0 slots, ``count`` runs admitted, then every node back to ``slots``
    (``PATCH /api/server/limits``): runs/s from the first PATCH to the last finished —
    claims and runs alone, no admission beside them."""
    already = len(run_rows(url))
    with ExitStack() as stack:
        conns = [stack.enter_context(RawClient(node.port)) for node in nodes]
        for conn in conns:
            conn.call("PATCH", "/api/server/limits", {"max_concurrent_runs": 0})
        admitting = time.perf_counter()
        admit(nodes, count)
        admitted = time.perf_counter() - admitting
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("ANALYZE")  # statistics that know the queue is long (module docstring)
        meter = CpuMeter(nodes)
        started = time.perf_counter()
        for conn in conns:
            conn.call("PATCH", "/api/server/limits", {"max_concurrent_runs": slots})
        wait_until_done(url, already + count)
        seconds = time.perf_counter() - started
    rows = run_rows(url)[already:]
    return {
        "runs_per_second": count / seconds,
        "admitted_per_second": count / admitted,
        "runs_per_node": sorted(Counter(node for node, _, _ in rows).values()),
        "cores_busy": meter.read(seconds),
    }


def idle_claims(url: str, nodes: list[TrellisServer], samples: int) -> dict[str, float]:
    """``samples`` runs one at a time, round-robin, each after the last finished."""
    already = len(run_rows(url))
    with ExitStack() as stack:
        conns = [stack.enter_context(RawClient(node.port)) for node in nodes]
        for index, conn in zip(range(samples), itertools.cycle(conns), strict=False):
            conn.call("POST", "/api/conversations", {"agent": SHORT_RUN, "run": True}, 201)
            wait_until_done(url, already + index + 1)
    waits = waits_ms(run_rows(url)[already:])
    return {"median_ms": statistics.median(waits), "max_ms": max(waits)}


# -- report ----------------------------------------------------------------------------------


def table(results: dict[int, dict[str, Any]]) -> str:
    """metric | 1 node | 2 nodes | 3 nodes | 2 / 1 | 3 / 1."""
    counts = sorted(results)

    def line(metric: str, values: list[float], fmt: str) -> list[str]:
        ratios = [f"{v / values[0]:.2f}x" if values[0] else "n/a" for v in values[1:]]
        return [metric, *(format(v, fmt) for v in values), *ratios]

    def dig(*keys: str) -> list[Any]:
        """``results[count][keys[0]][keys[1]]…`` for every cluster size."""
        values = []
        for count in counts:
            value: Any = results[count]
            for key in keys:
                value = value[key]
            values.append(value)
        return values

    def pick(*keys: str) -> list[float]:
        return [float(value) for value in dig(*keys)]

    def per_node(*keys: str) -> list[str]:
        return [*("/".join(map(str, runs)) for runs in dig(*keys)), *[""] * (len(counts) - 1)]

    lines = [
        ["metric", *(f"{c} node{'s' * (c > 1)}" for c in counts)]
        + [f"{c} / {counts[0]}" for c in counts[1:]],
        line("burst: runs/s (first admission -> last finished)", pick("runs_per_second"), ",.1f"),
        line("burst: admissions/s (POST with run: true)", pick("admitted_per_second"), ",.1f"),
        line("burst: queue -> start median, ms", pick("wait_median_ms"), ",.0f"),
        line("burst: queue -> start p99, ms", pick("wait_p99_ms"), ",.0f"),
    ]
    lines += [
        line(f"burst: cores busy, {part}", pick("cores_busy", part), ".2f")
        for part in ("nodes", "postgres", "client")
    ]
    lines.append(["burst: runs per node", *per_node("runs_per_node")])
    autoanalyzed = ["yes" if done else "no" for done in dig("autoanalyzed_during_burst")]
    lines.append(["burst: autovacuum analyzed runs", *autoanalyzed, *[""] * (len(counts) - 1)])
    lines.append(line(PREFILLED + "runs/s", pick("prefilled", "runs_per_second"), ",.1f"))
    admitted = pick("prefilled", "admitted_per_second")
    lines.append(line(PREFILLED + "admissions/s (0 slots)", admitted, ",.1f"))
    lines += [
        line(f"{PREFILLED}cores busy, {part}", pick("prefilled", "cores_busy", part), ".2f")
        for part in ("nodes", "postgres")
    ]
    lines.append([PREFILLED + "runs per node", *per_node("prefilled", "runs_per_node")])
    lines += [
        line("idle: queue -> start median, ms", pick("idle_claim", "median_ms"), ",.1f"),
        line("idle: queue -> start max, ms", pick("idle_claim", "max_ms"), ",.1f"),
    ]
    return aligned(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--runs", type=int, help="runs per cluster size (600; quick: 60)")
    parser.add_argument("--slots", type=int, help="max_concurrent_runs per node (8; quick: 4)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    arguments = parser.parse_args(argv)
    sizes = dict(QUICK if arguments.quick else FULL)
    sizes.update({k: v for k in ("runs", "slots") if (v := getattr(arguments, k)) is not None})
    results = {}
    for count in NODE_COUNTS:
        log(f"{count} node(s): {sizes['runs']} runs, {sizes['slots']} slots each")
        results[count] = measure(count, sizes)
    for key, value in machine_header().items():
        print(f"{key}: {value}")
    print(f"sizes: {sizes}, {CLIENTS} client threads, runs: say + sleep {SLEEP_SECONDS} s + finish")
    print(table(results))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
