"""Trellis benchmark: the issue's performance targets, measured on the real server.

Run with ``make bench`` (``.venv/bin/python bench/run.py``); takes about 1 to 1.5 minutes
on a 2-core machine. Every server is a subprocess (``python -m app serve --port 0``, own
temporary data directory, 127.0.0.1 only) and is always stopped by this script (SIGTERM,
then SIGKILL after a timeout), also on error. Every loop is bounded in count and time.

What is measured, and how:

1. Time to healthy: ``Popen`` → first 200 from ``GET /health`` (polled every 2 ms on fresh
   connections); median of 3 cold starts with default limits.
9. SIGTERM with 100 runs in flight: on each of those 3 servers, 100 long runs (10 running +
   90 queued, confirmed via ``GET /api/server``); time from SIGTERM to process exit, and the
   exit code; median of 3.
2. RSS idle: ``VmRSS`` of ``/proc/PID/status`` after start and a few requests.
3. ``GET /api/conversations/{id}`` latency, idle: a minimal keep-alive HTTP/1.1 client on a
   raw socket (``raw_client.py``), 300 warm-up requests, then 3000 timed ones; p50 / p99.
   For reference: server CPU per request; the same with ``httpx.Client``; ``GET /health``
   (the framework's floor); and the raw client against a static responder in its own
   process (``floor_server.py``: what the client, loopback and scheduler cost).
6. Server CPU per run start: utime + stime of the server (``/proc/PID/stat``) around 192
   sequential ``POST /api/conversations/{id}/runs`` on idle conversations, until all their
   run threads are running; also wall time per start, and for comparison the CPU per create
   without a run (256 creates) and per create with ``run: true`` (the last 64 of 256 runs).
4. Latency with the run slots saturated: those 256 runs sleep in 256 slots (server started
   with ``--max-concurrent-runs 256``; confirmed ``running == 256``); 3000 samples; p99
   compared with the idle p99.
5. Latency while runs start: on a fresh 256-slot server, a separate process
   (``start_runs.py``) creates 256 conversations with ``run: true`` over 4 connections as
   fast as it can while this process samples; only samples inside that burst count. Bursts
   repeat (previous runs interrupted first) until at least 2000 samples; p99 vs idle p99
   of item 3 (that server's own idle p99, sampled just before, is reported too).
7. Queue position = start order: admission paused (0 slots), 50 quick runs enqueued over 4
   connections recording each ``queue_position``; then 1 slot; once all finished, sorting
   by ``started_at`` must give exactly the ``queue_position`` order.
8. Interrupt latency: 30 times, a run sleeping mid-step (60 s sleep step) is interrupted;
   round trip of ``POST /interrupt`` (answers after the run stopped, status ``paused``);
   also server ``finished_at`` minus the client's send time. Then the same for an ``llm``
   run whose request is in flight to a provider that answers after 60 s (a real local HTTP
   server in this process, ``app.testing_llm.FakeChatServer``).

10. Fan-out (``fanout.py``, its own server): commit -> receipt latency with 1 and 100 SSE
    subscribers on one conversation, and events/s of a single stream (replay and live).

11. Naive vs Trellis (``naive_vs_trellis.py`` says how): the same measurements on servers
    in each mode — short-request latency idle and with K runs holding threads, requests/s at
    32 connections, queue wait vs position, interrupt latency mid step / LLM request / tool
    command, SIGTERM with 10 and 100 runs in flight — one table with both columns and their
    ratio, and a plot of short-request p99 vs K (``plot.py``, docs/bench-naive-vs-trellis.png).

Prints the targets table, then the naive-vs-Trellis table with the machine, date and commit
(stdout), and writes both, with all raw numbers, to ``bench/results.json``. Progress goes to
stderr. The peer column quotes the issue's figures for another server.

Usage: ``.venv/bin/python bench/run.py [--quick] [--json PATH] [--no-plot]``. ``--quick``
(``make bench-quick``, tests/test_bench_quick.py) runs only item 11, at tiny sizes, in well
under 30 s, writes no plot, and writes JSON only with ``--json``. The exit status is 1 when
a naive-vs-Trellis scenario failed (an ``ERROR`` cell); verdicts never change it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import fanout
import floor_server
import latency
import naive_vs_trellis
import report
import runs
import scale
from raw_client import RawClient
from server_process import TrellisServer
from workload import log, wait_for_statistics

from app.testing_llm import FakeChatServer

SATURATING_RUNS = 256  # the scenario: 256 runs in 256 slots
WARM_REQUESTS = 20  # "a few requests" before reading the idle RSS


def measure_main_server(results: dict[str, Any]) -> None:
    """RSS, idle latency, CPU per start, then latency with the slots saturated."""
    with (
        TrellisServer("--max-concurrent-runs", str(SATURATING_RUNS)) as server,
        RawClient(server.port) as client,
    ):
        target = latency.conversation_path(latency.prepare_target(client))
        for _ in range(WARM_REQUESTS):
            client.call("GET", target)
            client.call("GET", "/api/server")
        results["rss_idle_mib"] = server.rss_mib()
        log(f"RSS idle {results['rss_idle_mib']:.1f} MiB; sampling idle latency")
        results["idle"] = sample_with_cpu(server, target)
        results["idle_httpx"] = latency.sample_httpx(server.port, target)
        results["health_idle"] = sample_with_cpu(server, "/health")
        log(f"idle: {report.latency_text(results['idle'])}; starting {SATURATING_RUNS} runs")
        results["cpu_per_start"] = runs.cpu_per_start(server, client, SATURATING_RUNS)
        stats = wait_for_statistics(
            client, lambda s: s["running"] == SATURATING_RUNS, "slots saturated"
        )
        log(f"{stats['running']} running, {stats['queued']} queued; sampling latency")
        results["saturated"] = latency.sample_raw(server.port, target)
        results["saturated"]["running"] = stats["running"]
        results["rss_saturated_mib"] = server.rss_mib()
        code, seconds = server.terminate()
        results["sigterm_256_running"] = {"exit_code": code, "seconds": seconds}


def sample_with_cpu(server: TrellisServer, path: str) -> dict[str, Any]:
    """``latency.sample_raw`` plus the server's CPU time per request (warm-up included)."""
    cpu_start = server.cpu_seconds()
    summary: dict[str, Any] = latency.sample_raw(server.port, path)
    requests = summary["samples"] + latency.WARMUP_REQUESTS
    summary["server_cpu_ms_per_request"] = (server.cpu_seconds() - cpu_start) / requests * 1e3
    return summary


def measure_while_starting(results: dict[str, Any]) -> None:
    with (
        TrellisServer("--max-concurrent-runs", str(SATURATING_RUNS)) as server,
        RawClient(server.port) as client,
    ):
        target = latency.conversation_path(latency.prepare_target(client))
        # This server's own idle baseline: shows how much of the ratio is run-to-run noise.
        results["idle_before_starting"] = latency.sample_raw(server.port, target)
        log("sampling latency while runs start (separate process creating runs)")
        results["starting"] = latency.sample_while_starting(server.port, target, SATURATING_RUNS)


def measure_queue_and_interrupt(results: dict[str, Any]) -> None:
    # The provider is the operator's setting (an agent spec cannot name a URL): start the
    # fake provider first and point the server's default provider at it.
    with (
        FakeChatServer() as provider,
        TrellisServer("--max-concurrent-runs", "1", "--llm-base-url", provider.url) as server,
        RawClient(server.port) as client,
    ):
        log("queue order")
        results["queue_order"] = runs.queue_order(server, client)
        log("interrupt latency")
        results["interrupt"] = runs.interrupt_latency(client)
        log("interrupt latency, llm run mid provider request")
        results["llm_interrupt"] = runs.llm_interrupt_latency(client, provider)


def measure_targets(results: dict[str, Any]) -> list[report.Row]:
    """Items 1 to 10: the issue's targets for Trellis alone."""
    log("measuring floor: raw client against a static responder")
    results["floor"] = floor_server.measure(latency.LATENCY_SAMPLES)
    log("cold starts + SIGTERM with 100 runs in flight")
    results["cold_starts"] = runs.cold_starts_and_sigterm()
    measure_main_server(results)
    measure_while_starting(results)
    measure_queue_and_interrupt(results)
    log("fan-out: stream subscribers")
    results["fanout"] = fanout.measure()
    return report.build_rows(results) + fanout.rows(results["fanout"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server still running is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    began, header = time.perf_counter(), scale.machine_header()
    results: dict[str, Any] = {}
    rows = [] if args.quick else measure_targets(results)
    log("naive vs Trellis: the same measurements in both modes")
    profile = naive_vs_trellis.QUICK if args.quick else naive_vs_trellis.FULL
    comparison = results["naive_vs_trellis"] = naive_vs_trellis.compare(profile)
    compared = report.comparison_rows(comparison)
    total_seconds = time.perf_counter() - began
    if rows:
        print(report.format_table(rows) + "\n")
    print(report.format_comparison(header, compared, report.comparison_notes(comparison)))
    print(f"\n{total_seconds:.0f} s in total")
    path = args.json or (None if args.quick else report.RESULTS_PATH)
    if path is not None:
        report.write_json(
            rows, results, total_seconds, comparison=compared, header=header, path=path
        )
        print(f"results written to {path}")
    if not args.quick and not args.no_plot:
        import plot  # matplotlib: the bench extra

        print(f"plot written to {plot.write_plot(comparison, header)}")
    failed = [row.metric for row in compared if "ERROR" in row.trellis + row.naive]
    if failed:
        log(f"scenarios that failed: {', '.join(failed)}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="naive vs Trellis only, tiny sizes, no plot"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
