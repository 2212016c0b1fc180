"""Turn the scenario results into one table (stdout) and ``bench/results.json``."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).with_name("results.json")
PEER_LABEL = "peer: OpenHands agent server 1.58, figures quoted in the issue (not measured here)"


@dataclass(frozen=True)
class Row:
    metric: str
    measured: str
    target: str
    verdict: str  # "PASS (0.6x)", "FAIL (3.1x idle)", "info" for reference rows
    samples: str
    peer: str


def against_limit(value: float, limit: float) -> str:
    """PASS/FAIL for ``value <= limit``, with the ratio value/limit."""
    return f"{'PASS' if value <= limit else 'FAIL'} ({value / limit:.2f}x)"


def against_idle(p99_ms: float, idle_p99_ms: float, max_ratio: float) -> str:
    ratio = p99_ms / idle_p99_ms
    return f"{'PASS' if ratio <= max_ratio else 'FAIL'} ({ratio:.2f}x idle)"


def latency_text(summary: dict[str, Any]) -> str:
    return f"p50 {summary['p50_ms']:.2f} / p99 {summary['p99_ms']:.2f} ms"


def cpu_per_request(summary: dict[str, Any]) -> str:
    return f"{summary['server_cpu_ms_per_request']:.2f} ms"


def build_rows(r: dict[str, Any]) -> list[Row]:
    """One row per target (plus a few reference rows marked ``info``)."""
    start, idle, idle_p99 = r["cold_starts"], r["idle"], r["idle"]["p99_ms"]
    sat, starting, cpu = r["saturated"], r["starting"], r["cpu_per_start"]
    order, intr, health = r["queue_order"], r["interrupt"], r["health_idle"]
    llm = r["llm_interrupt"]
    sigterm_256 = r["sigterm_256_running"]
    max_ratio = 2.0  # the target: loaded p99 at most twice the idle p99
    return [
        Row("1 time to healthy (median)", f"{start['healthy_median_s']:.3f} s", "<= 1.5 s",
            against_limit(start["healthy_median_s"], 1.5), f"{len(start['healthy_s'])} starts",
            "9.5 s"),
        Row("2 RSS idle", f"{r['rss_idle_mib']:.1f} MiB", "<= 80 MiB",
            against_limit(r["rss_idle_mib"], 80), "1", "358 MiB"),
        Row("3 GET conversation p50, idle", f"{idle['p50_ms']:.3f} ms", "<= 1.5 ms",
            against_limit(idle["p50_ms"], 1.5), str(idle["samples"]), "5.95 ms"),
        Row("3 GET conversation p99, idle", f"{idle['p99_ms']:.3f} ms", "<= 4 ms",
            against_limit(idle["p99_ms"], 4.0), str(idle["samples"]), "7.7 ms"),
        Row("  ref: server CPU per idle GET", f"{cpu_per_request(idle)}", "-", "info",
            str(idle["samples"]), "-"),
        Row("  ref: same GET via httpx.Client", latency_text(r["idle_httpx"]), "-", "info",
            str(r["idle_httpx"]["samples"]), "-"),
        Row("  ref: GET /health (framework floor)", latency_text(health), "-", "info",
            str(health["samples"]), "-"),
        Row("  ref: server CPU per GET /health", f"{cpu_per_request(health)}", "-", "info",
            str(health["samples"]), "-"),
        Row("  ref: client+loopback floor (static)", latency_text(r["floor"]), "-", "info",
            str(r["floor"]["samples"]), "-"),
        Row(f"4 GET p99, {sat['running']} runs running", f"{sat['p99_ms']:.3f} ms",
            f"<= 2x idle p99 ({max_ratio * idle_p99:.2f} ms)",
            against_idle(sat["p99_ms"], idle_p99, max_ratio), str(sat["samples"]),
            "14-35 ms (64 runs)"),
        Row("  ref: its p50", f"{sat['p50_ms']:.3f} ms", "-", "info", str(sat["samples"]), "-"),
        Row(f"5 GET p99 while runs start ({starting['runs_started']} starts)",
            f"{starting['p99_ms']:.3f} ms", f"<= 2x idle p99 ({max_ratio * idle_p99:.2f} ms)",
            against_idle(starting["p99_ms"], idle_p99, max_ratio), str(starting["samples"]),
            "230-260 ms (32-64 starting)"),
        Row("  ref: its p50", f"{starting['p50_ms']:.3f} ms", "-", "info",
            str(starting["samples"]), "-"),
        Row("  ref: idle on that server, just before", latency_text(r["idle_before_starting"]),
            "-", f"info ({starting['p99_ms'] / r['idle_before_starting']['p99_ms']:.2f}x)",
            str(r["idle_before_starting"]["samples"]), "-"),
        Row("6 server CPU per run start (POST /runs)", f"{cpu['cpu_ms_per_start']:.2f} ms",
            "<= 2 ms", against_limit(cpu["cpu_ms_per_start"], 2.0), f"{cpu['runs']} starts",
            "40-60 ms"),
        Row("  ref: wall time per start (sequential)", f"{cpu['wall_ms_per_start']:.2f} ms",
            "-", "info", f"{cpu['runs']} starts", "-"),
        Row("  ref: server CPU per create, no run", f"{cpu['cpu_ms_per_create_without_run']:.2f}"
            " ms", "-", "info", f"{cpu['creates_without_run']} creates", "-"),
        Row("  ref: server CPU per create + run", f"{cpu['cpu_ms_per_create_with_run']:.2f} ms",
            "-", "info", f"{cpu['creates_with_run']} creates", "-"),
        Row("7 queue position = start order", f"{order['mismatches']} mismatches",
            "identical order", "PASS" if order["identical"] else "FAIL", f"{order['runs']} runs",
            "-"),
        Row("8 interrupt round trip, median", f"{intr['median_ms']:.2f} ms", "<= 50 ms",
            against_limit(intr["median_ms"], 50), str(intr["samples"]), "-"),
        Row("8 interrupt round trip, max", f"{intr['max_ms']:.2f} ms", "<= 50 ms",
            against_limit(intr["max_ms"], 50), str(intr["samples"]), "-"),
        Row("8 interrupt mid LLM request, median", f"{llm['median_ms']:.2f} ms", "<= 50 ms",
            against_limit(llm["median_ms"], 50), str(llm["samples"]), "50 ms"),
        Row("8 interrupt mid LLM request, max", f"{llm['max_ms']:.2f} ms", "<= 50 ms",
            against_limit(llm["max_ms"], 50), str(llm["samples"]), "-"),
        Row("  ref: send -> server finished_at, median",
            f"{intr['send_to_finished_at_median_ms']:.2f} ms", "-", "info",
            str(intr["samples"]), "-"),
        Row("9 SIGTERM, 100 runs in flight (median)",
            f"{start['sigterm_median_s']:.3f} s, exit {start['exit_codes']}",
            "exit 0 in <= 0.5 s", _sigterm_verdict(start), f"{len(start['sigterm_exit_s'])}",
            "0.72 s, status -15"),
        Row(f"  ref: SIGTERM, {sat['running']} running", f"{sigterm_256['seconds']:.3f} s,"
            f" exit {sigterm_256['exit_code']}", "-", "info", "1", "-"),
    ]  # fmt: skip


def _sigterm_verdict(start: dict[str, Any]) -> str:
    all_zero = all(code == 0 for code in start["exit_codes"])
    timing = against_limit(start["sigterm_median_s"], 0.5)
    return timing if all_zero else f"FAIL (exit codes {start['exit_codes']})"


def format_table(rows: list[Row]) -> str:
    header = Row("metric", "measured", "target", "ratio / verdict", "samples", "peer (quoted)")
    table = [list(asdict(row).values()) for row in [header, *rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines) + f"\n\n{PEER_LABEL}"


def write_json(rows: list[Row], results: dict[str, Any], total_seconds: float) -> Path:
    document = {
        "generated_at": datetime.now(UTC).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "total_seconds": total_seconds,
        "peer_note": PEER_LABEL,
        "rows": [asdict(row) for row in rows],
        "raw": results,
    }
    RESULTS_PATH.write_text(json.dumps(document, indent=2) + "\n")
    return RESULTS_PATH
