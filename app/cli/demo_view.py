"""What ``trellis demo`` knows about one phase, and how it looks in a terminal.

:class:`PhaseBoard` is the state of one phase (one server, one mode): the demo's runs and
where each one stands, the latencies of the short requests sent meanwhile, the pause and
the interrupt, and the drain. It is fed by :mod:`app.cli.demo` — each run's create answer,
and the server stream's ``status`` frames (``GET /api/events/stream``), which say every
change of status with its reason, and a queued run's position in the line. It is plain
data: no I/O, no task, no lock (everything touches it from the one Trio thread).

:func:`render_board` draws a board; :class:`Screen` shows it (redrawn in place by
``rich.live.Live`` while the phase runs, printed once when the output is not a terminal);
:func:`summary_table` sets the phases side by side; :func:`phase_json` is the ``--json``
form of a phase.

Queue positions: a ``queued`` frame carries the run's position when it was admitted; the
line is FIFO, so the run's position *now* is its rank among the demo's runs still queued,
in the order they were admitted (a run of another client, on a ``--server``, is not
counted: the position shown is then "among the demo's runs").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from rich.columns import Columns
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from app.cli.output import Output
from app.lifecycle import Status

#: Statuses of a run that has not ended.
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING, Status.PAUSING})
#: A run that was never admitted: its create was refused or never answered.
REFUSED = "refused"
LAUNCHING = "launching"  # the create was sent, no answer yet
_STYLES = {
    Status.QUEUED: "yellow",
    Status.RUNNING: "bold green",
    Status.PAUSING: "magenta",
    Status.PAUSED: "magenta",
    Status.FINISHED: "blue",
    Status.ERROR: "red",
    REFUSED: "red",
    LAUNCHING: "dim",
}
_TITLES = {"trellis": "Trellis", "naive": "naive mode"}
CHIP_WIDTH = 26  # "r48 paused (interrupt)" and a little air
# The live view's redraws: 4 a second. A redraw of 48 runs takes ~15 ms here, in the
# thread that also times the short requests: more often would skew what they measure.
REFRESH_SECONDS = 0.25


@dataclass
class DemoRun:
    """One of the demo's runs: a conversation created with ``run: true``."""

    label: str
    conversation_id: str | None = None
    status: str = LAUNCHING
    reason: str | None = None
    #: The server stream's seq of the frame that put it in the line (FIFO order).
    queued_seq: int = 0
    error: str | None = None

    @property
    def outcome(self) -> str:
        """``finished``, ``paused (shutdown)``, ``refused`` …: how it ended (or stands)."""
        if self.status == Status.PAUSED and self.reason:
            return f"paused ({self.reason})"
        return self.status


@dataclass
class Action:
    """The pause or the interrupt: which run, how long the request took, its answer."""

    name: str
    label: str
    answered_ms: float | None = None
    answer: str | None = None


@dataclass
class Drain:
    """SIGTERM and what followed: the exit code and the seconds from the signal to exit."""

    exit_code: int | None = None
    seconds: float | None = None


@dataclass
class PhaseBoard:
    """Everything one phase shows; see the module docstring."""

    mode: str  # "trellis", "naive" (embedded servers) or "server" (--server)
    server: str
    slots: int | None  # the server's run slots (naive mode's are unbounded: not shown)
    runs: list[DemoRun]
    elapsed: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    positions_seen: int = 0  # frames or answers that gave a queued run a position
    longest_line: int = 0  # the furthest position the server gave
    actions: list[Action] = field(default_factory=list)
    drain: Drain | None = None
    stream_end: str | None = None  # the server stream's end reason (``shutdown``)
    _by_id: dict[str, DemoRun] = field(default_factory=dict)
    _frames: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def create(cls, mode: str, server: str, slots: int | None, runs: int) -> PhaseBoard:
        width = len(str(runs))
        labels = [f"r{index:0{width}d}" for index in range(1, runs + 1)]
        return cls(mode, server, slots, [DemoRun(label) for label in labels])

    # -- feeding -------------------------------------------------------------------------

    def created(
        self, run: DemoRun, conversation_id: str, status: str, position: int | None
    ) -> None:
        """The create answered: the conversation exists and its run is ``status``."""
        run.conversation_id = conversation_id
        self._by_id[conversation_id] = run
        frame = self._frames.pop(conversation_id, None)
        if frame is not None:  # the stream was faster than the create's answer
            self.status_frame(frame)
        elif run.status == LAUNCHING:
            run.status = status
            self._saw_position(position)

    def refused(self, run: DemoRun, error: str) -> None:
        run.status, run.error = REFUSED, error

    def status_frame(self, data: dict[str, Any]) -> None:
        """A ``status`` frame of the server stream (frames of other conversations are kept
        until a create names them, then dropped with the phase)."""
        run = self._by_id.get(str(data.get("conversation_id")))
        if run is None:
            self._frames[str(data.get("conversation_id"))] = data
            return
        run.status, run.reason = str(data["status"]), data.get("reason")
        if run.status == Status.QUEUED:
            run.queued_seq = int(data.get("seq", 0))
            self._saw_position(data.get("position"))

    def _saw_position(self, position: object) -> None:
        """The server gave a run a place in the line (naive mode never gives one)."""
        if isinstance(position, int):
            self.positions_seen += 1
            self.longest_line = max(self.longest_line, position)

    # -- reading -------------------------------------------------------------------------

    def count(self, status: str) -> int:
        return sum(run.status == status for run in self.runs)

    def active(self) -> list[DemoRun]:
        return [run for run in self.runs if run.status in ACTIVE or run.status == LAUNCHING]

    def positions(self) -> dict[str, int]:
        """Each queued run's place in the line now (1 = starts next)."""
        queued = sorted(
            (run for run in self.runs if run.status == Status.QUEUED), key=lambda r: r.queued_seq
        )
        return {run.label: place for place, run in enumerate(queued, start=1)}

    def outcomes(self) -> dict[str, int]:
        """How many runs ended (or stand) each way: ``{"finished": 3, "refused": 1, …}``."""
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.outcome] = counts.get(run.outcome, 0) + 1
        return dict(sorted(counts.items()))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.99: p99); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency_text(latencies_ms: Sequence[float]) -> str:
    if not latencies_ms:
        return "none answered yet"
    p50, p99 = percentile(latencies_ms, 0.5), percentile(latencies_ms, 0.99)
    slowest = max(latencies_ms)
    return f"{len(latencies_ms)} · p50 {_ms(p50)} · p99 {_ms(p99)} · max {_ms(slowest)}"


def _ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


# -- the live view ---------------------------------------------------------------------


def render_board(board: PhaseBoard) -> RenderableType:
    """The phase as the terminal shows it: counts, latencies, actions, every run, drain."""
    title = _TITLES.get(board.mode, "the server")
    if board.mode == "naive":
        title += " (for benchmarks and teaching only)"
    slots = "no run slots" if board.mode == "naive" else _plural(board.slots or 0, "run slot")
    lines: list[RenderableType] = [
        Text(
            f"{title} · {_runs(len(board.runs))} · {slots} · {board.server}"
            f" · {board.elapsed:.1f} s",
            style="bold",
        ),
        Text("  " + " · ".join(f"{name} {count}" for name, count in _tally(board))),
        Text(f"  short requests: {latency_text(board.latencies_ms)} (GET 10 events)"),
    ]
    for action in board.actions:
        lines.append(Text(f"  {_action_text(action)}"))
    if board.drain is not None:  # above the runs: a short terminal crops from the bottom
        lines.append(Text(f"  {drain_text(board)}", style="bold"))
    positions = board.positions()
    chips = [_chip(run, positions.get(run.label)) for run in board.runs]
    lines.append(Columns(chips, width=CHIP_WIDTH, padding=(0, 1)))
    for line in lines:
        if isinstance(line, Text):  # one screen line each, whatever the width
            line.no_wrap, line.overflow = True, "ellipsis"
    return Group(*lines)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _runs(count: int) -> str:
    return _plural(count, "run")


def _tally(board: PhaseBoard) -> Iterable[tuple[str, int]]:
    for status in (LAUNCHING, Status.QUEUED, Status.RUNNING, Status.PAUSING, Status.PAUSED,
                   Status.FINISHED, Status.ERROR, REFUSED):  # fmt: skip
        count = board.count(status)
        if count or status in (Status.QUEUED, Status.RUNNING, Status.FINISHED):
            yield str(status), count


def _chip(run: DemoRun, position: int | None) -> Text:
    text = run.outcome
    if run.status == Status.QUEUED:
        text = f"queued #{position}" if position is not None else "queued"
    return Text.assemble((f"{run.label} ", "bold"), (text, _STYLES.get(run.status, "")))


def _action_text(action: Action) -> str:
    if action.answered_ms is None:
        return f"{action.name} {action.label}: sent, waiting for the answer …"
    return f"{action.name} {action.label}: answered in {_ms(action.answered_ms)} → {action.answer}"


def drain_text(board: PhaseBoard) -> str:
    drain = board.drain
    if drain is None:
        return ""
    shutdown = sum(run.outcome == "paused (shutdown)" for run in board.runs)
    if drain.exit_code is None:
        return f"SIGTERM sent: draining … {_runs(shutdown)} paused (shutdown) so far"
    still = len(board.active())
    left = f", {_runs(still)} left active" if still else ""
    return (
        f"SIGTERM: exit code {drain.exit_code} after {drain.seconds:.2f} s;"
        f" {_runs(shutdown)} paused (shutdown){left}"
    )


# -- the summary -----------------------------------------------------------------------


def phase_json(board: PhaseBoard) -> dict[str, Any]:
    """One phase for ``--json``."""
    latencies = board.latencies_ms
    return {
        "mode": board.mode,
        "server": board.server,
        "slots": board.slots,
        "seconds": round(board.elapsed, 3),
        "outcomes": board.outcomes(),
        "runs": [
            {
                "label": run.label,
                "conversation_id": run.conversation_id,
                "status": run.status,
                "reason": run.reason,
                "error": run.error,
            }
            for run in board.runs
        ],
        "short_requests": {
            "count": len(latencies),
            "p50_ms": _rounded(percentile(latencies, 0.5)),
            "p99_ms": _rounded(percentile(latencies, 0.99)),
            "max_ms": _rounded(max(latencies, default=math.nan)),
        },
        "positions_visible": board.positions_seen > 0,
        "longest_line": board.longest_line,
        "actions": {
            action.name: {
                "label": action.label,
                "answered_ms": _rounded(action.answered_ms),
                "answer": action.answer,
            }
            for action in board.actions
        },
        "drain": None
        if board.drain is None
        else {
            "exit_code": board.drain.exit_code,
            "seconds": _rounded(board.drain.seconds),
            "paused_shutdown": sum(run.outcome == "paused (shutdown)" for run in board.runs),
            "stream_end": board.stream_end,
        },
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 2)


def summary_table(boards: Sequence[PhaseBoard]) -> Table:
    """The phases side by side: short-request latency, positions, pause/interrupt, drain."""
    title = "Trellis vs naive: the same load" if len(boards) > 1 else "Summary"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for board in boards:
        table.add_column(_TITLES.get(board.mode, board.server), justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("short request p50", [_ms_or_dash(percentile(b.latencies_ms, 0.5)) for b in boards]),
        ("short request p99", [_ms_or_dash(percentile(b.latencies_ms, 0.99)) for b in boards]),
        ("short requests answered", [str(len(b.latencies_ms)) for b in boards]),
        ("queue positions visible", [_positions_text(b) for b in boards]),
    ]
    for name in ("pause", "interrupt"):
        rows.append((f"{name} answered in", [_action_ms(b, name) for b in boards]))
    rows.append(("runs finished", [str(b.count(Status.FINISHED)) for b in boards]))
    rows.append(("drain: runs paused (shutdown)", [_drained(b) for b in boards]))
    rows.append(("drain: SIGTERM → exit", [_exit_text(b) for b in boards]))
    for name, cells in rows:
        table.add_row(name, *cells)
    return table


def _ms_or_dash(value: float) -> str:
    return "-" if math.isnan(value) else _ms(value)


def _positions_text(board: PhaseBoard) -> str:
    if board.positions_seen == 0:
        return "no"
    return f"yes (line of up to {board.longest_line})"


def _action_ms(board: PhaseBoard, name: str) -> str:
    for action in board.actions:
        if action.name == name and action.answered_ms is not None:
            return _ms(action.answered_ms)
    return "-"


def _drained(board: PhaseBoard) -> str:
    if board.drain is None:
        return "-"
    return str(sum(run.outcome == "paused (shutdown)" for run in board.runs))


def _exit_text(board: PhaseBoard) -> str:
    drain = board.drain
    if drain is None or drain.exit_code is None or drain.seconds is None:
        return "- (no SIGTERM)"
    return f"{drain.seconds:.2f} s, exit code {drain.exit_code}"


# -- the screen ------------------------------------------------------------------------


class Screen:
    """Where a phase is drawn: redrawn in place on a terminal (``rich.live.Live``), printed
    once at its end otherwise, not at all with ``--json``. rich's refresh thread is not
    used: :meth:`refresh_every` redraws from a Trio task."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self.live: Live | None = None

    @contextmanager
    def showing(self, board: PhaseBoard) -> Iterator[None]:
        """The live view for the block; its last frame stays on the screen after it."""
        console = self.output.console
        if not self.output.json and console.is_interactive:
            self.live = Live(console=console, auto_refresh=False, redirect_stdout=False)
            self.live.start()
        try:
            yield
        finally:
            live, self.live = self.live, None
            if live is not None:
                live.update(render_board(board), refresh=True)
                live.stop()
            elif not self.output.json:
                console.print(render_board(board))

    async def refresh_every(self, board: PhaseBoard, started: float) -> None:
        """Redraw ``board`` every :data:`REFRESH_SECONDS` until cancelled."""
        while True:
            board.elapsed = trio.current_time() - started
            if self.live is not None:
                self.live.update(render_board(board), refresh=True)
            await trio.sleep(REFRESH_SECONDS)
