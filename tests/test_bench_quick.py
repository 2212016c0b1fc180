"""``make bench-quick`` as a test: the quick scale benchmark (bench/scale.py) and the quick
naive-vs-Trellis comparison (bench/run.py --quick) run end to end.

It starts real servers, so it is slow. It checks that the benchmark works (exit 0, the table
with every row) and what is correctness rather than speed: after each SIGTERM every run is
paused with reason ``shutdown`` and no run's event is lost. It never checks the timing
targets: those are the benchmark's verdicts, not test failures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "scale.py"
RUN_SCRIPT = REPO / "bench" / "run.py"
# The quick benchmark takes ~40 s on 2 cores; this bound only catches a hang.
HANG_SECONDS = 240
STOP_SECONDS = 30  # a server's SIGTERM -> exit takes well under 1 s here

# Every row the table must show, per section (the sizes are bench/scale_runs.py QUICK's).
IN_FLIGHT_ROWS = (
    "server RSS, {n} running",
    "RSS per running run (with its conversation)",
    "RSS per idle conversation",
    "create rate, run: true vs plain",
    "CPU while creating: client / server",
    "GET p99, {n} running vs idle",
    "GET p50, running vs idle",
    "server CPU per run start, ",
    "the same at 0 in flight",
    "wall time per start, at N / at 0",
    "server CPU, no requests, {n} sleeping",
    "SIGTERM -> exit, {n} running",
    "runs paused (shutdown) / events lost",
)
QUEUED_ROWS = (
    "server RSS, {n} queued",
    "RSS per queued run (with its conversation)",
    "create rate, run: true, queued",
    "SIGTERM -> exit, {n} queued",
    "runs paused (shutdown) / events lost",
)
BURST_ROWS = ("GET p99 while 64 runs start vs idle", "GET p50 while starting vs idle")
TABLE_HEAD = ("machine: ", "date: ", "commit: ", "python: ", "metric ", "[store]")


@pytest.mark.slow
@pytest.mark.timeout(HANG_SECONDS + 30)
def test_quick_scale_benchmark_prints_every_row_and_loses_nothing(tmp_path: Path) -> None:
    results = tmp_path / "scale.json"
    # Without coverage's subprocess hook: tracing would slow the servers down (the figures
    # are the benchmark's, and the suite's other end-to-end tests cover the same code).
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    finished = _run([sys.executable, str(SCRIPT), "--quick", "--json", str(results)], environment)
    assert finished.returncode == 0, finished.stdout + finished.stderr[-4000:]
    sections = _sections(finished.stdout)
    for size in (100, 300):
        _assert_rows(sections, f"{size} runs in flight", IN_FLIGHT_ROWS, size)
    _assert_rows(sections, "300 runs queued", QUEUED_ROWS, 300)
    _assert_rows(sections, "64 runs starting at once", BURST_ROWS, 64)
    assert sections["store"], "the store section has no row"
    for head in TABLE_HEAD:
        assert head in finished.stdout

    raw: dict[str, Any] = json.loads(results.read_text())["raw"]
    stopped = {key: scenario["sigterm"] for key, scenario in raw.items() if "sigterm" in scenario}
    assert sorted(stopped) == ["in_flight_100", "in_flight_300", "queued"]
    for key, sigterm in stopped.items():
        assert sigterm["found"] == sigterm["runs"] == raw[key]["size"], (key, sigterm)
        assert sigterm["paused_shutdown"] == sigterm["runs"], (key, sigterm)
        assert sigterm["lost"] in (0, None), (key, sigterm)
    assert stopped["in_flight_100"]["lost"] == 0  # the say events were checked, not skipped


# Every row of bench/run.py's naive-vs-Trellis table (K and N: naive_vs_trellis.QUICK's).
NAIVE_ROWS = (
    "short request p50, idle",
    "short request p99, idle",
    *(
        row.format(k=k)
        for k in (16, 64)
        for row in (
            "short request p99, {k} runs holding threads",
            "its p50, {k} runs",
            "runs admitted before sampling, of {k}",
        )
    ),
    "requests/s at 32 connections, idle",
    "queue: runs shown a position",
    "queue wait, median",
    "queue wait, first / last tenth admitted",
    "queue wait vs admission order (r)",
    *(f"interrupt mid {what}, {stat}" for what in ("step", "LLM request", "tool command")
      for stat in ("median", "max")),
    "SIGTERM -> exit, 10 runs in flight",
    "SIGTERM -> exit, 100 runs in flight",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(HANG_SECONDS + 30)
def test_quick_naive_vs_trellis_benchmark_measures_both_modes(tmp_path: Path) -> None:
    """bench/run.py --quick prints every row of the naive-vs-Trellis table, both modes
    measured (no ERROR cell) on servers that say which mode they are in; the naive one has
    no line: no run was shown a queue position. Every SIGTERM exits 0."""
    results = tmp_path / "run.json"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    command = [sys.executable, str(RUN_SCRIPT), "--quick", "--json", str(results)]
    finished = _run(command, environment)
    assert finished.returncode == 0, finished.stdout + finished.stderr[-4000:]
    for head in TABLE_HEAD[:4]:
        assert head in finished.stdout
    document = json.loads(results.read_text())
    rows = {row["metric"].strip(): row for row in document["comparison"]}
    assert sorted(rows) == sorted(NAIVE_ROWS)
    for row in rows.values():
        assert row["trellis"] and row["naive"], row
        assert "ERROR" not in row["trellis"] + row["naive"], row
    raw = document["raw"]["naive_vs_trellis"]
    assert raw["naive"]["server"]["naive_mode"] is True
    assert raw["trellis"]["server"]["naive_mode"] is False
    for mode in ("trellis", "naive"):
        assert raw[mode]["idle"]["samples"] > 0, mode
        assert raw[mode]["loaded_64"]["samples"] > 0, mode
    assert raw["naive"]["queue"]["positions_shown"] == 0  # no line to be shown a place in
    for mode in ("trellis", "naive"):
        for n in (10, 100):
            assert raw[mode][f"sigterm_{n}"]["exit_codes"] == [0], (mode, n)


def _run(command: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the benchmark in its own process group; on a hang, stop the whole group (the
    benchmark and the servers it started) instead of leaving servers behind."""
    with subprocess.Popen(
        command,
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=HANG_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the benchmark stops its servers
            try:
                process.communicate(timeout=STOP_SECONDS)
            finally:
                os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _sections(table: str) -> dict[str, list[str]]:
    """The table's rows (metric column) under each ``[section]`` heading line."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in table.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is not None and " | " in line:
            current.append(line.split(" | ")[0].strip())
    return sections


def _assert_rows(sections: dict[str, list[str]], title: str, rows: tuple[str, ...], n: int) -> None:
    assert title in sections, f"no section {title!r}: {sorted(sections)}"
    metrics = sections[title]
    for row in rows:
        wanted = row.format(n=n).strip()
        assert any(metric.startswith(wanted) for metric in metrics), (title, wanted, metrics)
