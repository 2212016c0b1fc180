"""Workload building blocks shared by the scenarios: scripts, bulk creation, waiting, stats."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raw_client import RawClient

# A run that starts, says something, then sleeps long enough to outlive any scenario (the
# sleep is interruptible, so interrupt and shutdown end it at once).
LONG_SLEEP_SECONDS = 60
LONG_RUN = {
    "kind": "script",
    "steps": [{"say": "hi"}, {"sleep": LONG_SLEEP_SECONDS}, {"finish": "done"}],
}
QUICK_RUN = {"kind": "script", "steps": [{"say": "x"}, {"finish": "y"}]}
# A run whose one step is a terminal command that outlives any scenario (interrupt kills it).
TOOL_RUN = {
    "kind": "script",
    "steps": [{"tool": "terminal", "args": {"command": f"sleep {LONG_SLEEP_SECONDS}"}}],
}


def sleep_run(seconds: float) -> dict[str, Any]:
    """A run that holds its thread for ``seconds`` (one interruptible sleep step)."""
    return {"kind": "script", "steps": [{"sleep": seconds}, {"finish": "done"}]}


CREATE_CONNECTIONS = 4  # parallel client connections for bulk creation: enough to keep the
# server busy on a 2-core machine without the clients themselves eating both cores
WAIT_POLL_SECONDS = 0.02  # statistics polling: ~50 cheap GETs a second at most
WAIT_TIMEOUT_SECONDS = 30.0  # bulk operations here take ~1-3 s; 10x headroom


def log(message: str) -> None:
    """Progress for the reader of the terminal (stderr; stdout carries the table)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def create_conversations(
    port: int,
    count: int,
    agent: dict[str, Any],
    connections: int = CREATE_CONNECTIONS,
    *,
    run: bool = True,
) -> list[dict[str, Any]]:
    """Create ``count`` conversations with ``run: true`` (``run=False``: without a run) over
    ``connections`` keep-alive connections; return the 201 bodies in completion order (each
    with its ``run``, ``None`` without one)."""
    body = {"agent": agent, "run": run}
    shares = [count // connections + (i < count % connections) for i in range(connections)]

    def create(share: int) -> list[dict[str, Any]]:
        with RawClient(port) as client:
            return [client.call("POST", "/api/conversations", body, 201) for _ in range(share)]

    with ThreadPoolExecutor(connections) as pool:
        return [item for batch in pool.map(create, shares) for item in batch]


def server_statistics(client: RawClient) -> dict[str, Any]:
    stats: dict[str, Any] = client.call("GET", "/api/server")["statistics"]
    return stats


def wait_for_statistics(
    client: RawClient,
    done: Callable[[dict[str, Any]], bool],
    what: str,
    timeout_seconds: float = WAIT_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """Poll ``GET /api/server`` until ``done(statistics)``; return them, or raise on timeout."""
    deadline = time.perf_counter() + timeout_seconds
    while True:
        stats = server_statistics(client)
        if done(stats):
            return stats
        if time.perf_counter() > deadline:
            raise TimeoutError(f"waited {timeout_seconds} s for {what}; statistics: {stats}")
        time.sleep(WAIT_POLL_SECONDS)


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (``fraction`` in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(samples_ns: list[int]) -> dict[str, float]:
    """p50 / p90 / p99 / max in milliseconds, and the sample count."""
    ms = [value / 1e6 for value in samples_ns]
    return {
        "samples": len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p90_ms": percentile(ms, 0.90),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms),
    }
