"""The plot of ``make bench``: short-request p99 vs runs holding threads, both modes.

matplotlib comes with the ``bench`` extra (``pip install -e '.[bench]'``; ``make bench``
installs it) and is imported only here, so the rest of the benchmark, and ``--quick`` in the
test suite, never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_PATH = Path(__file__).resolve().parent.parent / "docs" / "bench-naive-vs-trellis.png"
MODE_STYLE = {"trellis": ("Trellis (three limiters)", "o-"), "naive": ("naive mode", "s--")}


def p99_vs_load(raw: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """``{mode: [(K, p99 ms), ...]}`` with K = 0 for idle; failed scenarios left out."""
    keys = [(0, "idle")] + [(k, f"loaded_{k}") for k in raw["profile"]["loads"]]
    points: dict[str, list[tuple[int, float]]] = {}
    for mode in MODE_STYLE:
        scenarios = raw.get(mode, {})
        points[mode] = [
            (k, scenarios[key]["p99_ms"])
            for k, key in keys
            if key in scenarios and "p99_ms" in scenarios[key]
        ]
    return points


def write_plot(raw: dict[str, Any], header: dict[str, str], path: Path = PLOT_PATH) -> Path:
    """Draw :func:`p99_vs_load` (log scale: the modes differ by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    loads = [0, *raw["profile"]["loads"]]  # evenly spaced: K grows 4x a step
    for mode, points in p99_vs_load(raw).items():
        if points:
            label, style = MODE_STYLE[mode]
            xs = [loads.index(k) for k, _ in points]
            axes.plot(xs, [p99 for _, p99 in points], style, label=label)
    axes.set_xticks(range(len(loads)), ["idle", *(str(k) for k in loads[1:])])
    seconds = raw["profile"]["run_seconds"]
    axes.set_yscale("log")
    axes.set_xlabel(f"runs holding threads (K), each for up to {seconds} s")
    axes.set_ylabel("short request p99 (ms, log scale)")
    axes.set_title("GET .../events while K runs hold threads: naive vs Trellis")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.text(
        0.01, 0.01, f"{header.get('machine', '')} · {header.get('date', '')} ·"
        f" commit {header.get('commit', '')}", fontsize=7, color="gray",
    )  # fmt: skip
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
