"""``trellis queue``: the server's active runs and run slots as a live table.

Each refresh asks for the runs (``GET /api/runs``: running ones first, then the line in
start order) and the limiter usage (``GET /api/server``), and shows::

    run slots 2/2 busy · line 1 (max 100) · io threads 0/8 · tool threads 0/16
     #   RUN        CONVERSATION   STATUS    FOR     STEPS
         3f0c…      9a1b…          running   4.1 s       2
     1   77de…      c2aa…          queued    1.0 s       0

On an interactive terminal the table is redrawn in place every ``--interval`` seconds; when
piped, each refresh is printed below the last. ``--once`` prints it once; ``--count N``
stops after N refreshes (for scripts and tests); otherwise it runs until Ctrl-C. With
``--json``, one line per refresh: ``{"runs": [...], "limits": {...}, "statistics": {...}}``.

Threads: none of its own; rich's refresh thread redraws the live table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from app.api.schemas import ServerInfo
from app.cli.output import ExitCode, UsageError
from app.cli.session import Session
from app.lifecycle import Status
from app.records import RunRecord

#: Characters of an id shown in the table (a uuid's first group and a bit: unique enough
#: to tell runs apart on one screen; ``--json`` has them whole).
SHORT_ID = 13


def queue_command(session: Session, arguments: argparse.Namespace) -> int:
    """Print or redraw the queue table until ``--once``/``--count`` is satisfied."""
    if arguments.interval <= 0:
        raise UsageError("--interval must be above 0 seconds")
    count = 1 if arguments.once else arguments.count
    if count is not None and count < 1:
        raise UsageError("--count must be 1 or more")
    refreshes = range(count) if count is not None else itertools.count()
    console = session.output.console
    live = None
    if console.is_interactive and not session.output.json and count != 1:
        live = Live(console=console, auto_refresh=False, redirect_stdout=False)
        live.start()
    try:
        for index in refreshes:
            if index:
                time.sleep(arguments.interval)
            runs = session.client.server_runs()
            info = session.client.server_info()
            if session.output.json:
                session.output.line(snapshot_json(runs, info))
            elif live is not None:
                live.update(queue_table(runs, info), refresh=True)
            else:
                console.print(queue_table(runs, info))
    finally:
        if live is not None:
            live.stop()  # leaves the last table on the screen
    return ExitCode.OK


def snapshot_json(runs: list[RunRecord], info: ServerInfo) -> str:
    """One refresh as a JSON line."""
    return json.dumps(
        {
            "runs": [run.model_dump(mode="json") for run in runs],
            "limits": info.limits.model_dump(mode="json"),
            "statistics": dataclasses.asdict(info.statistics),
        }
    )


def queue_table(runs: list[RunRecord], info: ServerInfo) -> RenderableType:
    """The summary line and the table of runs, as of ``now``."""
    stats = info.statistics
    summary = (
        f"run slots {stats.running}/{stats.max_concurrent_runs} busy"
        f" · line {stats.waiting_for_slot} (max {stats.max_queued_runs})"
        f" · io threads {stats.io_borrowed}/{stats.io_total}"
        f" · tool threads {stats.tool_borrowed}/{stats.tool_total}"
    )
    if stats.draining:
        summary += " · draining"
    table = Table("#", "RUN", "CONVERSATION", "STATUS", "FOR", "STEPS", box=None, pad_edge=False)
    for column in (table.columns[0], table.columns[4], table.columns[5]):
        column.justify = "right"
    now = datetime.now(UTC)
    for run in runs:
        since = run.started_at if run.status != Status.QUEUED and run.started_at else run.queued_at
        position = str(run.queue_position) if run.queue_position is not None else ""
        table.add_row(
            position,
            run.id[:SHORT_ID],
            run.conversation_id[:SHORT_ID],
            Text(run.status, style="yellow" if run.status == Status.QUEUED else "green"),
            f"{(now - since).total_seconds():.1f} s",
            str(run.steps),
        )
    if not runs:
        return Group(Text(summary), Text("no active runs", style="dim"))
    return Group(Text(summary), table)
