"""Trellis scale benchmark: 1k / 5k / 10k runs in flight, and the million-event store.

Usage: ``.venv/bin/python bench/scale.py [--quick] [--sizes 1000,5000,10000] [--json PATH]``
(``make bench-scale``; ``make bench-quick`` is ``--quick``: small sizes, under a minute,
also run by tests/test_bench_quick.py). Prints one table on stdout, with the machine, date,
commit and Python version on top: every ratio in it was measured in the same run, on the same
machine and commit. Progress goes to stderr; ``--json`` writes the table and raw numbers.

Scenarios (``scale_runs.py`` says how each is measured), each on a fresh server:

- per size N: RSS, create rates (``run: true`` vs plain, 8 keep-alive connections), GET
  p50/p99 with N in flight vs idle, server CPU per run start at 0 and at N in flight,
  SIGTERM → exit, and a check of the stopped server's database (runs paused, no event lost);
- RSS per queued run, at the largest size (admission paused: every run waits);
- GET p99 while 256 runs start at once (64 with ``--quick``) vs idle (bench/run.py item 5);
- the store at a million events (``store_scale.py``, 100,000 with ``--quick``).

A scenario that fails (an error, a timeout, a server out of threads or memory) becomes an
``ERROR`` row and the benchmark goes on; the exit status is then 1. Targets are verdicts in
the table, never the exit status: a ``FAIL`` still exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import scale_runs
from report import against_idle, against_limit
from workload import log

RSS_TARGET_MIB, RSS_TARGET_RUNS = 512, 10_000
RATE_RATIO_TARGET = 0.7  # run: true creates at least 0.7x as fast as plain creates
IDLE_RATIO_TARGET = 2.0  # loaded GET p99 at most twice the idle p99
CPU_PER_START_TARGET_MS = 2.0
SIGTERM_TARGET_SECONDS = 1.0
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    metric: str
    value: str
    target: str = "-"
    verdict: str = "info"


Section = tuple[str, list[Row]]


class Scenario(NamedTuple):
    title: str
    key: str  # of its raw numbers in the JSON document
    measure: Callable[[], dict[str, Any]]
    rows: Callable[[dict[str, Any]], list[Row]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server still running is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    profile = scale_runs.QUICK if args.quick else scale_runs.FULL
    header, began = machine_header(), time.perf_counter()
    raw: dict[str, Any] = {}
    sections: list[Section] = []
    for scenario in scenarios(profile, args.sizes):
        sections.append(run_section(raw, scenario))
        if args.json:  # after every scenario: a long run that dies keeps what it measured
            write_json(args.json, header, time.perf_counter() - began, raw, sections)
    sections.append(store_section(args.quick, raw))
    total = time.perf_counter() - began
    print(format_table(header, sections) + f"\n\n{total:.0f} s in total")
    if args.json:
        write_json(args.json, header, total, raw, sections)
    failed = [title for title, rows in sections if any(r.verdict == "ERROR" for r in rows)]
    if failed:
        log(f"scenarios that failed: {', '.join(failed)}")
    return 1 if failed else 0


def scenarios(profile: scale_runs.Profile, sizes: list[int] | None) -> list[Scenario]:
    """N in flight per size (``sizes`` or the profile's), N queued at the largest, a burst."""
    sizes = sizes or list(profile.sizes)
    largest, burst = max(sizes), profile.burst_runs
    return [
        *(
            Scenario(f"{n} runs in flight", f"in_flight_{n}",
                     partial(scale_runs.in_flight, n, profile), size_rows)
            for n in sizes
        ),
        Scenario(f"{largest} runs queued", "queued", partial(scale_runs.queued, largest),
                 queued_rows),
        Scenario(f"{burst} runs starting at once", "start_burst",
                 partial(scale_runs.start_burst, profile), burst_rows),
    ]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--sizes", type=_sizes, help="runs in flight, e.g. 1000,5000,10000")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write raw numbers here")
    return parser.parse_args(argv)


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",")]
    if any(size < 10 or size > RSS_TARGET_RUNS for size in sizes):
        raise argparse.ArgumentTypeError("each size must be in 10..10000 (max_concurrent_runs)")
    return sizes


def run_section(raw: dict[str, Any], scenario: Scenario) -> Section:
    """Run one scenario, its raw numbers into ``raw``; its rows, or one ``ERROR`` row
    saying why it failed (the traceback goes to stderr)."""
    title, key = scenario.title, scenario.key
    log(f"{title}: starting")
    started = time.perf_counter()
    try:
        raw[key] = scenario.measure()
        raw[key]["seconds_total"] = time.perf_counter() - started
        log(f"{title}: done in {raw[key]['seconds_total']:.1f} s")
        return title, scenario.rows(raw[key])
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        raw[key] = {"error": f"{type(exc).__name__}: {exc}"}
        return title, [Row("scenario failed", _one_line(raw[key]["error"]), "-", "ERROR")]


def size_rows(r: dict[str, Any]) -> list[Row]:
    n, probe = r["size"], r["probe_starts"]
    rss, before = r["rss_running_mib"], r["rss_idle_conversations_mib"]
    plain, run = r["plain_creates"], r["run_creates"]
    ratio = run["per_second"] / plain["per_second"]
    idle, loaded = r["idle"], r["loaded"]
    at_0, at_n = r["cpu_start_at_0"], r["cpu_start_at_n"]
    rss_target = f"<= {RSS_TARGET_MIB} MiB" if n == RSS_TARGET_RUNS else "-"
    rss_verdict = against_limit(rss, RSS_TARGET_MIB) if n == RSS_TARGET_RUNS else "info"
    return [
        Row(f"server RSS, {n} running", f"{rss:.0f} MiB", rss_target, rss_verdict),
        Row("  RSS per running run (with its conversation)", _kib(rss - before, n)),
        Row("  RSS per idle conversation", _kib(before - r["rss_empty_mib"], n)),
        Row("create rate, run: true vs plain", f"{run['per_second']:.0f}/s vs"
            f" {plain['per_second']:.0f}/s", f">= {RATE_RATIO_TARGET}x",
            _at_least(ratio, RATE_RATIO_TARGET)),
        Row("  CPU while creating: client / server", f"{_share(run['client_cpu_share'])} /"
            f" {_share(run['server_cpu_share'])} (plain: {_share(plain['client_cpu_share'])} /"
            f" {_share(plain['server_cpu_share'])})"),
        Row(f"GET p99, {n} running vs idle", f"{loaded['p99_ms']:.2f} vs {idle['p99_ms']:.2f}"
            " ms", f"<= {IDLE_RATIO_TARGET:.0f}x idle",
            against_idle(loaded["p99_ms"], idle["p99_ms"], IDLE_RATIO_TARGET)),
        Row("  GET p50, running vs idle", f"{loaded['p50_ms']:.2f} vs {idle['p50_ms']:.2f} ms"),
        Row(f"server CPU per run start, {at_n['in_flight_before']} in flight",
            f"{at_n['cpu_ms_per_start']:.2f} ms", f"<= {CPU_PER_START_TARGET_MS:.0f} ms",
            against_limit(at_n["cpu_ms_per_start"], CPU_PER_START_TARGET_MS)),
        Row("  the same at 0 in flight", f"{at_0['cpu_ms_per_start']:.2f} ms",
            verdict=f"info ({at_n['cpu_ms_per_start'] / at_0['cpu_ms_per_start']:.2f}x)"),
        Row("  wall time per start, at N / at 0", f"{at_n['wall_ms_per_start']:.2f} /"
            f" {at_0['wall_ms_per_start']:.2f} ms ({probe} starts each)"),
        Row(f"  server CPU, no requests, {n} sleeping",
            f"{_share(r['background_cpu_share'])} of a core"),
        *sigterm_rows(r["sigterm"], f"{n} running"),
    ]  # fmt: skip


def queued_rows(r: dict[str, Any]) -> list[Row]:
    n, rss = r["size"], r["rss_queued_mib"]
    return [
        Row(f"server RSS, {n} queued", f"{rss:.0f} MiB"),
        Row("  RSS per queued run (with its conversation)", _kib(rss - r["rss_empty_mib"], n)),
        Row("  create rate, run: true, queued", f"{r['creates']['per_second']:.0f}/s"),
        *sigterm_rows(r["sigterm"], f"{n} queued"),
    ]


def burst_rows(r: dict[str, Any]) -> list[Row]:
    idle, starting = r["idle"], r["starting"]
    return [
        Row(f"GET p99 while {r['runs']} runs start vs idle",
            f"{starting['p99_ms']:.2f} vs {idle['p99_ms']:.2f} ms",
            f"<= {IDLE_RATIO_TARGET:.0f}x idle",
            against_idle(starting["p99_ms"], idle["p99_ms"], IDLE_RATIO_TARGET)),
        Row("  GET p50 while starting vs idle",
            f"{starting['p50_ms']:.2f} vs {idle['p50_ms']:.2f} ms",
            verdict=f"info ({starting['samples']} samples, {starting['rounds']} bursts)"),
    ]  # fmt: skip


def sigterm_rows(s: dict[str, Any], what: str) -> list[Row]:
    timing = against_limit(s["seconds"], SIGTERM_TARGET_SECONDS)
    exit_verdict = timing if s["exit_code"] == 0 else f"FAIL (exit {s['exit_code']})"
    complete = s["paused_shutdown"] == s["runs"] and s["lost"] in (0, None)
    lost = "" if s["lost"] is None else f", {s['lost']} lost"
    return [
        Row(f"SIGTERM -> exit, {what}", f"{s['seconds']:.2f} s, exit {s['exit_code']}",
            f"<= {SIGTERM_TARGET_SECONDS:.0f} s, exit 0", exit_verdict),
        Row("  runs paused (shutdown) / events lost",
            f"{s['paused_shutdown']}/{s['runs']} paused{lost}", "all paused, 0 lost",
            "PASS" if complete else "FAIL"),
    ]  # fmt: skip


def store_section(quick: bool, raw: dict[str, Any]) -> Section:
    """``store_scale.measure(quick)``'s rows, imported lazily (another module's work)."""
    try:
        store_scale = importlib.import_module("store_scale")
    except ModuleNotFoundError as exc:
        if exc.name != "store_scale":
            raise
        return "store", [Row("store", "not available")]
    measure = getattr(store_scale, "measure", None)
    if measure is None:
        return "store", [Row("store", "not available")]

    def rows(r: dict[str, Any]) -> list[Row]:
        return [Row(metric, value, target, "-") for metric, value, target in r["rows"]]

    return run_section(raw, Scenario("store", "store", lambda: {"rows": measure(quick)}, rows))


def write_json(
    path: Path, header: dict[str, str], seconds: float, raw: dict[str, Any], sections: list[Section]
) -> None:
    document = {"header": header, "total_seconds": seconds, "raw": raw}
    document["sections"] = {title: [asdict(r) for r in rows] for title, rows in sections}
    path.write_text(json.dumps(document, indent=2) + "\n")


def machine_header() -> dict[str, str]:
    return {
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "python": platform.python_version(),
    }


def format_table(header: dict[str, str], sections: list[Section]) -> str:
    """The header lines, then one aligned table: a heading line per section."""
    names = Row("metric", "value", "target", "verdict")
    lines = [f"{key}: {value}" for key, value in header.items()]
    cells = [list(asdict(row).values()) for row in [names, *(r for _, s in sections for r in s)]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(names.__dict__))]

    def line(row: Row) -> str:
        values = asdict(row).values()
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    lines += ["", line(names), "-+-".join("-" * w for w in widths)]
    for title, rows in sections:
        lines += [f"[{title}]", *(line(row) for row in rows)]
    return "\n".join(lines)


def _kib(mib: float, count: int) -> str:
    return f"{mib * 1024 / count:.1f} KiB"


def _share(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _at_least(value: float, floor: float) -> str:
    return f"{'PASS' if value >= floor else 'FAIL'} ({value:.2f}x)"


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + (
            "+dirty" if git("status", "--porcelain") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
