"""GET /api/conversations/{id} latency: idle, with the run slots saturated, while runs start.

Every sample is one request on a warm keep-alive connection of :class:`RawClient`, timed
around send + read of the whole body; the target conversation has one finished run, so
every scenario reads the same record.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from raw_client import RawClient
from server_process import python_executable
from workload import (
    CREATE_CONNECTIONS,
    QUICK_RUN,
    summarize_ms,
    wait_for_statistics,
)

WARMUP_REQUESTS = 300  # JIT-free CPython still warms caches, pydantic paths, SQLite pages
LATENCY_SAMPLES = 3000  # >= 2000 asked; p99 then rests on the 30 slowest samples
HTTPX_SAMPLES = 1000  # reference only: how much a typical client adds
SAMPLING_TIME_LIMIT_SECONDS = 60.0  # a hard stop for any sampling loop
MIN_SAMPLES_WHILE_STARTING = 2000  # repeat start bursts until at least this many samples
MAX_START_ROUNDS = 8  # bounds the repetitions (each round is one burst of run starts)
CREATOR_READY_TIMEOUT_SECONDS = 10.0  # the creator process is a fresh interpreter: ~0.2 s
# A short request may wait for a thread for as long as a run holds it (naive mode).
OPEN_LOOP_TIMEOUT_SECONDS = 120.0

START_RUNS_SCRIPT = Path(__file__).with_name("start_runs.py")


def conversation_path(conversation_id: str) -> str:
    return f"/api/conversations/{conversation_id}"


def prepare_target(client: RawClient) -> str:
    """A conversation whose one (quick) run has finished: the record every sample reads."""
    body = {"agent": QUICK_RUN, "run": True}
    conversation_id: str = client.call("POST", "/api/conversations", body, 201)["id"]
    deadline = time.perf_counter() + SAMPLING_TIME_LIMIT_SECONDS
    while client.call("GET", conversation_path(conversation_id))["status"] != "finished":
        if time.perf_counter() > deadline:
            raise TimeoutError("the target conversation's quick run did not finish")
        time.sleep(0.01)  # the run takes a few ms
    return conversation_id


def sample_raw(
    port: int, path: str, samples: int = LATENCY_SAMPLES, warmup: int = WARMUP_REQUESTS
) -> dict[str, float]:
    """Warm up (``warmup`` GETs), then time ``samples`` GETs with the raw client."""
    with RawClient(port) as client:
        for _ in range(warmup):
            client.timed_get(path)
        deadline = time.perf_counter() + SAMPLING_TIME_LIMIT_SECONDS
        timings: list[int] = []
        while len(timings) < samples and time.perf_counter() < deadline:
            timings.append(client.timed_get(path))
    return summarize_ms(timings)


def sample_httpx(port: int, path: str, samples: int = HTTPX_SAMPLES) -> dict[str, float]:
    """The same with ``httpx.Client`` (keep-alive), for reference."""
    timings: list[int] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(WARMUP_REQUESTS):
            client.get(path).raise_for_status()
        deadline = time.perf_counter() + SAMPLING_TIME_LIMIT_SECONDS
        while len(timings) < samples and time.perf_counter() < deadline:
            start = time.perf_counter_ns()
            client.get(path).raise_for_status()
            timings.append(time.perf_counter_ns() - start)
    return summarize_ms(timings)


def sample_while_starting(
    port: int,
    path: str,
    runs_per_round: int,
    min_samples: int = MIN_SAMPLES_WHILE_STARTING,
    max_rounds: int = MAX_START_ROUNDS,
) -> dict[str, Any]:
    """Time GETs while a separate process starts ``runs_per_round`` runs as fast as it can.

    Only samples that began inside the creator's busy window count. Rounds repeat (after
    interrupting the previous round's runs, so every burst starts runs into free slots)
    until ``min_samples`` samples or ``max_rounds`` rounds.
    """
    timings: list[int] = []
    rounds, starts, busy_ns = 0, 0, 0
    with RawClient(port) as client:
        for _ in range(WARMUP_REQUESTS):
            client.timed_get(path)
        while len(timings) < min_samples and rounds < max_rounds:
            window, round_timings = _one_start_round(client, port, path, runs_per_round)
            timings += round_timings
            rounds += 1
            starts += window["created"]
            busy_ns += window["ended_ns"] - window["started_ns"]
            _interrupt_all(port, window["conversation_ids"])
            wait_for_statistics(
                client, lambda s: s["running"] == 0 and s["queued"] == 0, "runs to stop"
            )
    summary: dict[str, Any] = summarize_ms(timings)
    summary |= {"rounds": rounds, "runs_started": starts, "start_window_s": busy_ns / 1e9}
    return summary


def _one_start_round(
    client: RawClient, port: int, path: str, runs: int
) -> tuple[dict[str, Any], list[int]]:
    command = [python_executable(), str(START_RUNS_SCRIPT), str(port), str(runs)]
    # The with block closes the pipes; the finally makes sure nothing is left running.
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    ) as creator:
        try:
            window, began = _sample_during_burst(creator, client, path)
            creator.wait(CREATOR_READY_TIMEOUT_SECONDS)
        finally:
            if creator.poll() is None:
                creator.kill()
                creator.wait()
    inside = [d for s, d in began if window["started_ns"] <= s <= window["ended_ns"]]
    return window, inside


def _sample_during_burst(
    creator: subprocess.Popen[str], client: RawClient, path: str
) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Say go, then sample until the creator reports its window; ``(window, [(start ns,
    duration ns)])``."""
    assert creator.stdin is not None and creator.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(creator.stdout, selectors.EVENT_READ)
        if not selector.select(CREATOR_READY_TIMEOUT_SECONDS):
            raise TimeoutError("the run-starting process did not get ready")
        if creator.stdout.readline().strip() != "ready":
            raise RuntimeError("the run-starting process failed before starting")
        creator.stdin.write("go\n")
        creator.stdin.flush()
        began: list[tuple[int, int]] = []
        deadline = time.perf_counter() + SAMPLING_TIME_LIMIT_SECONDS
        while not selector.select(0) and time.perf_counter() < deadline:
            start = time.perf_counter_ns()
            began.append((start, client.timed_get(path)))
        line = creator.stdout.readline()
    if not line:
        raise RuntimeError("the run-starting process failed (its traceback is above)")
    window: dict[str, Any] = json.loads(line)
    return window, began


def _interrupt_all(port: int, conversation_ids: list[str]) -> None:
    """Interrupt the conversations' runs over a few connections (202 each)."""

    def interrupt(ids: list[str]) -> None:
        with RawClient(port) as client:
            for conversation_id in ids:
                client.call("POST", f"{conversation_path(conversation_id)}/interrupt", None, 202)

    shares = [conversation_ids[i::CREATE_CONNECTIONS] for i in range(CREATE_CONNECTIONS)]
    with ThreadPoolExecutor(CREATE_CONNECTIONS) as pool:
        list(pool.map(interrupt, shares))


def events_path(conversation_id: str) -> str:
    """A short request that always reads the store in a worker thread (I/O limiter): the
    conversation record itself may be served from the store's cache without a thread."""
    return f"{conversation_path(conversation_id)}/events?limit=10"


def sample_open_loop(
    port: int, path: str, rate_per_second: float, window_seconds: float, connections: int
) -> list[int]:
    """Send GETs on a fixed schedule (``rate_per_second`` for ``window_seconds`` from now),
    each on a free connection of a pool; return each one's latency in ns, counted from the
    time it was *scheduled* — so a request that found every connection busy counts its
    wait too, and a stalled server cannot hide behind fewer samples (open loop).
    Returns once every request has answered."""
    opened: list[RawClient] = []
    local = threading.local()  # one connection per worker thread of the pool
    first = time.perf_counter_ns() + 1_000_000  # 1 ms: the pool is being submitted to
    step_ns = int(1e9 / rate_per_second)
    schedule = [first + i * step_ns for i in range(max(1, int(rate_per_second * window_seconds)))]

    def one(scheduled_ns: int) -> int:
        if not hasattr(local, "client"):
            local.client = RawClient(port, timeout_seconds=OPEN_LOOP_TIMEOUT_SECONDS)
            opened.append(local.client)
        time.sleep(max(0.0, (scheduled_ns - time.perf_counter_ns()) / 1e9))
        local.client.timed_get(path)
        return time.perf_counter_ns() - scheduled_ns

    try:
        with ThreadPoolExecutor(connections) as pool:
            return list(pool.map(one, schedule))
    finally:
        for client in opened:
            client.close()


def requests_per_second(port: int, path: str, connections: int, seconds: float) -> float:
    """GETs answered per second by the server with ``connections`` keep-alive connections,
    each sending its next request as soon as the previous one answered (closed loop)."""

    def hammer(deadline: float) -> int:
        count = 0
        with RawClient(port, timeout_seconds=OPEN_LOOP_TIMEOUT_SECONDS) as client:
            while time.perf_counter() < deadline:
                client.timed_get(path)
                count += 1
        return count

    with ThreadPoolExecutor(connections) as pool:
        began = time.perf_counter()
        counts = list(pool.map(hammer, [began + seconds] * connections))
        elapsed = time.perf_counter() - began
    return sum(counts) / elapsed
