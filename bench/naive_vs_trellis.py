"""Naive vs Trellis: the same measurements on a server in each mode, run side by side.

``naive_mode`` (a server setting, "for benchmarks and teaching only") is the design Trellis
replaces: runs and short store I/O share Trio's default thread limiter (40 threads), with no
run slots and no line. Everything else is the same code, so every difference in this table
is the limiters'. Each mode gets its own servers (``python -m app serve``, 127.0.0.1, own
data directory; see ``server_process.py``), one mode after the other, with the same profile:

- **short request**: ``GET /api/conversations/{id}/events?limit=10`` (a store read in a
  worker thread on the I/O limiter). Idle: warm-up, then ``idle_samples`` sequential GETs.
- **K runs holding threads** (K in ``loads``): K conversations, then K runs started over 4
  connections, each sleeping ``run_seconds`` in its thread. Once all K are admitted — or, in
  naive mode, once admissions stalled for ``stall_seconds`` (a start, too, waits for a
  thread) — GETs go out on a fixed schedule (``rate_per_second`` for ``window_seconds``, a
  pool of connections; each latency counted from its *scheduled* time: open loop, so a
  stalled server cannot hide behind fewer samples). Then the starts not sent yet are
  dropped and every run is interrupted. Trellis serves with K run slots, so all K really
  hold threads. Repeated ``repetitions`` times; p50/p99 over all samples, each repetition's
  p99 kept too; also how many runs were admitted, in how long. In naive mode a GET that
  finds every thread taken waits until a run ends: its latency is bounded by
  ``run_seconds``, which the table states.
- **requests/s** at 32 connections, idle (closed loop), median of the repetitions.
- **queue wait vs position**: ``queue_runs`` runs of ``queue_run_seconds`` created at once
  (one connection each).
  Trellis gets ``NAIVE_THREADS`` (40) run slots, as many threads as the naive mode has, so
  both run the same number at once. Per run: the position it was given, and its wait from
  the client's send time until its first step ran in its thread (the timestamp of the
  event that step stored; in naive mode the create itself may wait for a thread); ``r``
  is the correlation of the wait with the order the creates were sent in
  (1: runs start in the order they came).
- **interrupt**: round trip of ``POST /interrupt`` mid step (sleep), mid LLM request (a
  local fake provider that answers after 60 s) and mid tool command (``sleep 60``), one run
  at a time, ``interrupt_samples`` each (``runs.py``).
- **SIGTERM** with N runs in flight (N in ``sigterm_runs``, ``repetitions`` times): N long
  runs created over 4 connections, then SIGTERM → exit. Each sample on a fresh default
  server, except the first of the smallest N: the main server ends that way (with its
  slots set back to the default 10), which saves a server start in ``--quick``.
  In naive mode a create waits for a thread like any short request: once every thread is
  held by a run, creates stall; SIGTERM is then sent once the admitted count stopped
  growing for ``stall_seconds``, and the row says how many were admitted.

A scenario that fails records its error (an ``ERROR`` cell in the table) and the rest goes
on. Every loop is bounded in count and time; servers are always stopped.
"""

from __future__ import annotations

import statistics
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import latency
import runs
from raw_client import HttpError, RawClient
from server_process import TrellisServer
from workload import (
    CREATE_CONNECTIONS,
    LONG_RUN,
    create_conversations,
    log,
    server_statistics,
    sleep_run,
    summarize_ms,
    wait_for_statistics,
)

from app.testing_llm import FakeChatServer

MODES: dict[str, tuple[str, ...]] = {"trellis": (), "naive": ("--naive-mode",)}
IDLE_TIMEOUT_SECONDS = 30.0  # runs ending after a scenario, on top of their own length


@dataclass(frozen=True)
class Profile:
    loads: tuple[int, ...]  # K: runs holding threads
    run_seconds: float  # how long each of those runs holds its thread (at most)
    window_seconds: float  # short requests are sent for this long, once the runs are in
    repetitions: int
    idle_samples: tuple[int, int]  # samples, warm-up requests
    rate_per_second: float  # short requests sent while K runs hold threads
    sampler_connections: int
    throughput_seconds: float
    queue_runs: int
    queue_run_seconds: float
    interrupt_samples: int
    sigterm_runs: tuple[int, ...]
    stall_seconds: float  # naive: admitted runs stopped growing for this long
    throughput_connections: int = 32


# run_seconds > the time to start K runs + stall_seconds + window_seconds: the runs still
# hold their threads while the short requests go out.
FULL = Profile(
    loads=(16, 64, 256), run_seconds=5.0, window_seconds=2.0, repetitions=3,
    idle_samples=(3000, 300), rate_per_second=50, sampler_connections=64, throughput_seconds=3.0,
    queue_runs=100, queue_run_seconds=2.0, interrupt_samples=30, sigterm_runs=(10, 100),
    stall_seconds=1.0,
)  # fmt: skip
QUICK = Profile(
    loads=(16, 64), run_seconds=2.0, window_seconds=0.5, repetitions=1, idle_samples=(200, 50),
    rate_per_second=40, sampler_connections=32, throughput_seconds=0.5, queue_runs=60,
    queue_run_seconds=1.0, interrupt_samples=3, sigterm_runs=(10, 100), stall_seconds=0.3,
)  # fmt: skip
#: The queue scenario gives Trellis as many run slots as the naive mode has threads for
#: runs and I/O together: Trio's default thread limiter (``total_tokens`` 40).
NAIVE_THREADS = 40
DEFAULT_SLOTS = 10  # config/default.toml's max_concurrent_runs


def compare(profile: Profile) -> dict[str, Any]:
    """Every scenario in both modes: ``{"profile": ..., "trellis": {...}, "naive": {...}}``."""
    raw: dict[str, Any] = {"profile": profile.__dict__}
    with FakeChatServer() as provider:
        for mode in MODES:
            try:
                raw[mode] = measure_mode(mode, profile, provider)
            except Exception:  # its server failed to start or to serve: every cell an ERROR
                traceback.print_exc()
                raw[mode] = {}
    return raw


def measure_mode(mode: str, profile: Profile, provider: FakeChatServer) -> dict[str, Any]:
    naive, results = mode == "naive", {}
    args = [*MODES[mode], "--max-concurrent-runs", str(max(profile.loads))]
    with (
        TrellisServer(*args, "--llm-base-url", provider.url) as server,
        RawClient(server.port) as client,
    ):
        target = latency.events_path(latency.prepare_target(client))
        info = client.call("GET", "/api/server")
        results["server"] = {"naive_mode": info["settings"]["naive_mode"], **info["limits"]}

        def run(key: str, measure: Callable[[], Any]) -> None:
            _scenario(results, f"{mode}: {key}", key, measure)

        run("idle", lambda: latency.sample_raw(server.port, target, *profile.idle_samples))
        for k in profile.loads:
            run(f"loaded_{k}", lambda k=k: loaded(server.port, client, target, k, profile))
        run("throughput", lambda: throughput(server.port, target, profile))
        run("queue", lambda: queue_waits(server.port, client, profile, naive))
        options = {"samples": profile.interrupt_samples, "one_slot": not naive}
        run("interrupt_step", lambda: runs.interrupt_latency(client, **options))
        run("interrupt_llm", lambda: runs.llm_interrupt_latency(client, provider, **options))
        run("interrupt_tool", lambda: runs.tool_interrupt_latency(client, **options))
        # The first SIGTERM sample of the fewest runs: this server, as a default one would be.
        fewest, first = min(profile.sigterm_runs), None
        try:
            if not naive:
                limits = {"max_concurrent_runs": DEFAULT_SLOTS}
                client.call("PATCH", "/api/server/limits", limits)
            first = _terminate_with_runs(server, fewest, profile.stall_seconds)
        except Exception:
            traceback.print_exc()  # the fresh servers below take every sample instead
    for n in profile.sigterm_runs:
        sample = first if n == fewest else None
        run(f"sigterm_{n}", lambda n=n, s=sample: sigterm_in_flight(MODES[mode], n, profile, s))
    return results


def _scenario(results: dict[str, Any], title: str, key: str, measure: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        results[key] = measure()
    except Exception as exc:
        traceback.print_exc()
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    log(f"{title}: {time.perf_counter() - started:.1f} s")


def loaded(port: int, client: RawClient, target: str, k: int, profile: Profile) -> dict[str, Any]:
    """Short-request latency while ``k`` runs hold their threads (see the module doc)."""
    samples: list[int] = []
    per_repetition, admitted, admit_seconds = [], [], []
    for _ in range(profile.repetitions):
        agent = sleep_run(profile.run_seconds)
        ids = [item["id"] for item in create_conversations(port, k, agent, run=False)]
        stop = threading.Event()  # naive mode: starts still waiting are not sent at all
        with ThreadPoolExecutor(1) as starter:
            starts = starter.submit(_start_runs, port, ids, stop)
            count, seconds = _wait_admitted(client, k, profile.stall_seconds)
            timings = latency.sample_open_loop(
                port, target, profile.rate_per_second, profile.window_seconds,
                profile.sampler_connections,
            )  # fmt: skip
            stop.set()
            starts.result()
        admitted.append(count)
        admit_seconds.append(seconds)
        samples += timings
        per_repetition.append(summarize_ms(timings)["p99_ms"])
        _interrupt_all(port, ids)
        _wait_idle(client, IDLE_TIMEOUT_SECONDS)
    return summarize_ms(samples) | {
        "k": k,
        "p99_ms_per_repetition": per_repetition,
        "admitted": admitted,
        "admitted_median": statistics.median(admitted),
        "admit_seconds": admit_seconds,
        "admit_seconds_median": statistics.median(admit_seconds),
    }


def _interrupt_all(port: int, conversation_ids: list[str]) -> None:
    """Interrupt the conversations' runs over a few connections; a run that already ended
    (409: nothing to interrupt) is fine."""

    def interrupt(ids: list[str]) -> None:
        with RawClient(port, timeout_seconds=latency.OPEN_LOOP_TIMEOUT_SECONDS) as client:
            for conversation_id in ids:
                path = f"/api/conversations/{conversation_id}/interrupt"
                status = client.request("POST", path).status
                if status not in (202, 409):
                    raise HttpError(f"POST {path}: status {status}")

    shares = [conversation_ids[i::CREATE_CONNECTIONS] for i in range(CREATE_CONNECTIONS)]
    with ThreadPoolExecutor(CREATE_CONNECTIONS) as pool:
        list(pool.map(interrupt, shares))


def _start_runs(port: int, conversation_ids: list[str], stop: threading.Event) -> None:
    """``POST .../runs`` for each conversation over a few connections, until ``stop``."""

    def start(ids: list[str]) -> None:
        with RawClient(port, timeout_seconds=latency.OPEN_LOOP_TIMEOUT_SECONDS) as client:
            for conversation_id in ids:
                if stop.is_set():
                    return
                client.call("POST", f"/api/conversations/{conversation_id}/runs", None, 202)

    shares = [conversation_ids[i::CREATE_CONNECTIONS] for i in range(CREATE_CONNECTIONS)]
    with ThreadPoolExecutor(CREATE_CONNECTIONS) as pool:
        list(pool.map(start, shares))


def _wait_idle(client: RawClient, timeout_seconds: float) -> None:
    wait_for_statistics(
        client,
        lambda s: s["running"] == 0 and s["queued"] == 0,
        "every run to end",
        timeout_seconds,
    )


def throughput(port: int, target: str, profile: Profile) -> dict[str, Any]:
    rates = [
        latency.requests_per_second(
            port, target, profile.throughput_connections, profile.throughput_seconds
        )
        for _ in range(profile.repetitions)
    ]
    return {
        "connections": profile.throughput_connections,
        "per_second": rates,
        "median_per_second": statistics.median(rates),
    }


def queue_waits(port: int, client: RawClient, profile: Profile, naive: bool) -> dict[str, Any]:
    """``queue_runs`` runs created at once; each one's position and wait, from the moment
    its create was *sent* (in naive mode the create itself may wait for a thread)."""
    if not naive:
        client.call("PATCH", "/api/server/limits", {"max_concurrent_runs": NAIVE_THREADS})
    n = profile.queue_runs
    # The first step's event is stored from the run's thread: its timestamp is when the
    # thread really began, whatever the run's status said meanwhile.
    steps = [{"say": "in my thread"}, {"sleep": profile.queue_run_seconds}, {"finish": "ok"}]
    agent = {"kind": "script", "steps": steps}
    created = _create_timed(port, n, agent)
    _wait_idle(client, IDLE_TIMEOUT_SECONDS + n * profile.queue_run_seconds)
    points = []
    for sent, item in sorted(created, key=lambda pair: pair[0]):
        path = f"/api/conversations/{item['id']}/events?kind=message&limit=1"
        events = client.call("GET", path)["items"]
        if not events:
            raise RuntimeError(f"the run of {item['id']} never ran its first step")
        wait_ms = (datetime.fromisoformat(events[0]["timestamp"]).timestamp() - sent) * 1e3
        points.append((item["run"]["queue_position"], wait_ms))
    waits = [wait for _, wait in points]
    tenth = max(1, n // 10)
    return {
        "runs": n,
        "slots": None if naive else NAIVE_THREADS,
        "positions_shown": sum(position is not None for position, _ in points),
        "wait_median_ms": statistics.median(waits),
        "wait_max_ms": max(waits),
        "first_tenth_median_ms": statistics.median(waits[:tenth]),
        "last_tenth_median_ms": statistics.median(waits[-tenth:]),
        "wait_vs_admission_r": _correlation(list(range(n)), waits),
        "points": [{"position": p, "wait_ms": w} for p, w in points],
    }


def _create_timed(port: int, n: int, agent: dict[str, Any]) -> list[tuple[float, Any]]:
    """Create ``n`` conversations with a run, each on a connection of its own, all at once
    (so that a create waiting for a thread delays no other one): ``(wall-clock time the
    request was sent, the 201 body)`` each (same machine, same clock as ``started_at``)."""

    def create(_: int) -> tuple[float, Any]:
        with RawClient(port, timeout_seconds=latency.OPEN_LOOP_TIMEOUT_SECONDS) as client:
            sent = time.time()
            body = {"agent": agent, "run": True}
            return sent, client.call("POST", "/api/conversations", body, 201)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(create, range(n)))


def _correlation(xs: list[float], ys: list[float]) -> float | None:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # fewer than 2 points, or every wait the same
        return None


def sigterm_in_flight(
    mode_args: tuple[str, ...],
    n: int,
    profile: Profile,
    first: tuple[int, int, float] | None = None,
) -> dict[str, Any]:
    """``n`` long runs in flight, then SIGTERM: ``repetitions`` samples, each on a fresh
    default server — except ``first``, a sample already taken (on the main server)."""
    samples = [] if first is None else [first]
    while len(samples) < profile.repetitions:
        with TrellisServer(*mode_args) as server:
            samples.append(_terminate_with_runs(server, n, profile.stall_seconds))
    admitted, codes, seconds = (list(column) for column in zip(*samples, strict=True))
    return {
        "runs": n,
        "admitted": admitted,
        "exit_codes": codes,
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
    }


def _terminate_with_runs(
    server: TrellisServer, n: int, stall_seconds: float
) -> tuple[int, int, float]:
    """Create ``n`` long runs from background threads; once all are admitted (or, in naive
    mode, the count stalled), SIGTERM. ``(admitted, exit code, seconds to exit)``."""
    per, extra = divmod(n, CREATE_CONNECTIONS)
    shares = [per + (i < extra) for i in range(CREATE_CONNECTIONS)]

    def create(share: int) -> None:
        try:
            with RawClient(server.port, timeout_seconds=latency.OPEN_LOOP_TIMEOUT_SECONDS) as c:
                for _ in range(share):
                    c.call("POST", "/api/conversations", {"agent": LONG_RUN, "run": True}, 201)
        except (OSError, HttpError):
            pass  # cut off by the shutdown (naive mode: creates stalled for a thread)

    with ThreadPoolExecutor(CREATE_CONNECTIONS) as pool, RawClient(server.port) as client:
        for share in shares:
            pool.submit(create, share)
        admitted, _ = _wait_admitted(client, n, stall_seconds)
        code, elapsed = server.terminate()
    return admitted, code, elapsed


def _wait_admitted(client: RawClient, n: int, stall_seconds: float) -> tuple[int, float]:
    """Poll until ``n`` runs are admitted (running + queued), or the count has not moved
    for ``stall_seconds`` (bounded by ``IDLE_TIMEOUT_SECONDS``): ``(the count, seconds
    from the call until it was reached)``."""
    began = time.perf_counter()
    deadline = began + IDLE_TIMEOUT_SECONDS
    last, since = -1, began
    while time.perf_counter() < deadline:
        stats = server_statistics(client)
        count = stats["running"] + stats["queued"]
        if count >= n:
            return int(count), time.perf_counter() - began
        if count != last:
            last, since = count, time.perf_counter()
        elif count > 0 and time.perf_counter() - since >= stall_seconds:
            break
        time.sleep(0.02)
    return max(last, 0), since - began
