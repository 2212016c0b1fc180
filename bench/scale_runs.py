"""The scale benchmark's server scenarios: N runs in flight, N queued runs, a start burst.

Each scenario owns one fresh server (``TrellisServer``: own temporary data directory, stopped
and deleted also on error) and returns a dict of raw numbers; ``bench/scale.py`` turns them
into the table. Every loop is bounded in count (the sizes) and time (client timeouts,
``wait_for_statistics`` deadlines, ``latency``'s sampling limit).

The N-in-flight scenario on one server, in this order:

1. idle: one target conversation (a finished quick run), ``RSS`` and ``GET`` latency;
2. ``N`` plain creates (no run) over ``CLIENTS`` keep-alive connections: the create rate,
   and ``RSS`` per idle conversation;
3. CPU per run start at 0 in flight: ``P`` sequential ``POST .../runs`` on idle conversations;
4. ``N - 2P`` creates with ``run: true`` over ``CLIENTS`` connections: the create rate;
5. CPU per run start at ``N - P`` in flight: ``P`` more, ending with exactly ``N`` running;
6. ``RSS`` and ``GET`` latency with ``N`` running, the server's CPU while nothing is asked;
7. SIGTERM → exit, then the data directory is opened with ``SqliteStore``: every run must be
   ``paused`` with reason ``shutdown``, and every run's ``say`` event must exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import latency
from raw_client import RawClient
from server_process import TrellisServer
from workload import create_conversations, log, wait_for_statistics

from app.lifecycle import Status
from app.store.base import EventQuery
from app.store.sqlite import SqliteStore

# A run that says something, then sleeps far longer than any scenario (shutdown ends it).
SLEEPING_RUN = {"kind": "script", "steps": [{"say": "hi"}, {"sleep": 600}, {"finish": "x"}]}
CLIENTS = 8  # the setting: 8 keep-alive client connections
MAX_PROBE_STARTS = 200  # sequential run starts per CPU-per-start probe
DATABASE_NAME = "trellis.sqlite3"  # Settings.database_path under the data directory
SIGTERM_TIMEOUT_SECONDS = 120.0  # SIGKILL after this: today's 10k figure is 26 s
RAMP_TIMEOUT_SECONDS = 300.0  # all created runs running (threads alive) at 10,000 runs
WARM_REQUESTS = 20


@dataclass(frozen=True)
class Profile:
    """How much each scenario measures: the full benchmark, or ``--quick``."""

    sizes: tuple[int, ...]  # runs in flight, one server each; the largest is also queued
    samples: int  # GETs per latency figure (after latency.WARMUP_REQUESTS warm-up GETs)
    burst_runs: int  # runs started at once
    burst_samples: int  # GETs inside the bursts: bursts repeat until this many ...
    burst_rounds: int  # ... or this many bursts
    idle_window_seconds: float  # server CPU measured while nothing is asked


FULL = Profile((1000, 5000, 10_000), 3000, 256, 2000, 8, 1.0)
QUICK = Profile((100, 300), 500, 64, 300, 2, 0.3)


def probe_starts(size: int) -> int:
    """``P``: run starts per CPU probe; two probes leave ``size - 2P`` run: true creates."""
    return min(MAX_PROBE_STARTS, max(size // 5, 1))


def in_flight(size: int, profile: Profile) -> dict[str, Any]:
    """The module docstring's scenario with ``size`` runs, measured as much as ``profile``
    says."""
    probe = probe_starts(size)
    out: dict[str, Any] = {"size": size, "probe_starts": probe}
    args = ("--max-concurrent-runs", str(size), "--max-queued-runs", str(2 * size))
    with TrellisServer(*args) as server, RawClient(server.port) as client:
        target = latency.conversation_path(latency.prepare_target(client))
        for _ in range(WARM_REQUESTS):
            client.call("GET", target)
        out["rss_empty_mib"] = server.rss_mib()
        out["idle"] = latency.sample_raw(server.port, target, profile.samples)
        log(f"N={size}: idle GET {_p(out['idle'])}; {size} plain creates")
        plain = timed_creates(server, size, run=False)
        out["plain_creates"] = plain.pop("stats")
        out["rss_idle_conversations_mib"] = server.rss_mib()
        idle_ids = [item["id"] for item in plain["bodies"]]
        out["cpu_start_at_0"] = cpu_per_start(server, client, idle_ids[:probe], probe)
        log(f"N={size}: {size - 2 * probe} creates with run: true")
        with_run = timed_creates(server, size - 2 * probe, run=True)
        out["run_creates"] = with_run.pop("stats")
        wait_running(client, size - probe)
        out["cpu_start_at_n"] = cpu_per_start(server, client, idle_ids[probe : 2 * probe], size)
        out["cpu_start_at_n"]["in_flight_before"] = size - probe
        out["rss_running_mib"] = server.rss_mib()
        out["background_cpu_share"] = background_cpu(server, profile.idle_window_seconds)
        out["loaded"] = latency.sample_raw(server.port, target, profile.samples)
        log(f"N={size}: GET with {size} running {_p(out['loaded'])}; SIGTERM")
        run_ids = [item["run"]["id"] for item in with_run["bodies"]]
        run_ids += out["cpu_start_at_0"].pop("run_ids") + out["cpu_start_at_n"].pop("run_ids")
        out["sigterm"] = sigterm_and_verify(server, run_ids, said=True)
    return out


def queued(size: int) -> dict[str, Any]:
    """``RSS`` per queued run (with its conversation): admission paused, ``size`` queued."""
    args = ("--max-concurrent-runs", "0", "--max-queued-runs", str(2 * size))
    with TrellisServer(*args) as server, RawClient(server.port) as client:
        for _ in range(WARM_REQUESTS):
            client.call("GET", "/api/server")
        out: dict[str, Any] = {"size": size, "rss_empty_mib": server.rss_mib()}
        created = timed_creates(server, size, run=True)
        out["creates"] = created.pop("stats")
        stats = wait_for_statistics(client, lambda s: s["queued"] == size, f"{size} queued")
        out["queued"] = stats["queued"]
        out["rss_queued_mib"] = server.rss_mib()
        run_ids = [item["run"]["id"] for item in created["bodies"]]
        out["sigterm"] = sigterm_and_verify(server, run_ids, said=False)
    return out


def start_burst(profile: Profile) -> dict[str, Any]:
    """GET latency while a separate process starts ``profile.burst_runs`` runs at once
    (bench/run.py item 5: ``latency.sample_while_starting``) vs this server's idle latency."""
    runs = profile.burst_runs
    args = ("--max-concurrent-runs", str(runs), "--max-queued-runs", str(2 * runs))
    with TrellisServer(*args) as server, RawClient(server.port) as client:
        target = latency.conversation_path(latency.prepare_target(client))
        idle = latency.sample_raw(server.port, target, profile.samples)
        starting = latency.sample_while_starting(
            server.port, target, runs, profile.burst_samples, profile.burst_rounds
        )
    return {"runs": runs, "idle": idle, "starting": starting}


def timed_creates(server: TrellisServer, count: int, *, run: bool) -> dict[str, Any]:
    """``count`` creates over ``CLIENTS`` connections; the bodies and their rate.

    Also the client's and the server's CPU over the same wall time (shares of one core):
    the client is not the bottleneck while its share stays far below 1.
    """
    wall, client_cpu, server_cpu = time.perf_counter(), time.process_time(), server.cpu_seconds()
    bodies = create_conversations(server.port, count, SLEEPING_RUN, CLIENTS, run=run)
    wall = time.perf_counter() - wall
    stats = {
        "count": count,
        "seconds": wall,
        "per_second": count / wall,
        "client_cpu_share": (time.process_time() - client_cpu) / wall,
        "server_cpu_share": (server.cpu_seconds() - server_cpu) / wall,
    }
    return {"bodies": bodies, "stats": stats}


def cpu_per_start(
    server: TrellisServer, client: RawClient, conversation_ids: list[str], running_after: int
) -> dict[str, Any]:
    """Server CPU (``/proc``) and wall time per run start: sequential ``POST .../runs`` on
    idle conversations, counted until ``running_after`` runs are running with live threads
    (the few ``/api/server`` polls of the wait are counted too)."""
    cpu, wall = server.cpu_seconds(), time.perf_counter()
    run_ids = [
        client.call("POST", f"{latency.conversation_path(cid)}/runs", None, 202)["id"]
        for cid in conversation_ids
    ]
    wait_running(client, running_after)
    cpu, wall = server.cpu_seconds() - cpu, time.perf_counter() - wall
    starts = len(conversation_ids)
    return {
        "starts": starts,
        "cpu_ms_per_start": cpu / starts * 1e3,
        "wall_ms_per_start": wall / starts * 1e3,
        "run_ids": run_ids,
    }


def wait_running(client: RawClient, count: int) -> None:
    wait_for_statistics(
        client,
        lambda s: s["running"] == count and s["run_threads_alive"] == count,
        f"{count} runs running",
        RAMP_TIMEOUT_SECONDS,
    )


def background_cpu(server: TrellisServer, seconds: float) -> float:
    """The server's CPU share (of one core) over ``seconds`` with no request at all."""
    cpu = server.cpu_seconds()
    time.sleep(seconds)
    return (server.cpu_seconds() - cpu) / seconds


def sigterm_and_verify(server: TrellisServer, run_ids: list[str], *, said: bool) -> dict[str, Any]:
    """SIGTERM → exit (code, seconds), then read the stopped server's database: how many
    of ``run_ids`` are ``paused`` with reason ``shutdown``, and (``said``) how many of their
    conversations lack the agent's ``say`` message (lost events)."""
    code, seconds = server.terminate(SIGTERM_TIMEOUT_SECONDS)
    out: dict[str, Any] = {"exit_code": code, "seconds": seconds, "runs": len(run_ids)}
    out |= verify_store(server.data_dir / DATABASE_NAME, run_ids, said=said)
    return out


def verify_store(path: Path, run_ids: list[str], *, said: bool) -> dict[str, Any]:
    """Count shutdown-paused runs and (``said``) conversations without their ``say``."""
    store = SqliteStore(path)
    try:
        runs = store.get_runs(run_ids)
        paused = [r for r in runs if r.status is Status.PAUSED and r.reason == "shutdown"]
        lost = sum(
            said and store.count_events(run.conversation_id, _said(run.id)) == 0 for run in runs
        )
    finally:
        store.close()
    found = len(runs)
    return {"found": found, "paused_shutdown": len(paused), "lost": lost if said else None}


def _said(run_id: str) -> EventQuery:
    """The run's ``say``: an agent message of that run."""
    return EventQuery(kind="message", source="agent", run_id=run_id)


def _p(summary: dict[str, Any]) -> str:
    return f"p50 {summary['p50_ms']:.2f} / p99 {summary['p99_ms']:.2f} ms"
