"""``trellis demo``: the design in one command — a line, fast short requests, a clean drain.

Without ``--server`` the demo starts its own server, a real ``python -m app serve`` on
127.0.0.1 (port 0, a temporary data directory, ``--max-concurrent-runs`` = ``--slots``), and
plays one *phase* against it:

1. create ``--runs`` script conversations with ``run: true`` (over
   :data:`CREATE_CONNECTIONS` connections), each saying, sleeping and finishing — runs of
   2, 3 or 4 s (:func:`run_agent`);
2. meanwhile send a short request (``GET`` of a conversation's last events,
   :data:`SAMPLE_EVENTS`) every :data:`SAMPLE_INTERVAL_SECONDS`, open loop: each latency
   counts from the moment it was due, so a stalled server cannot hide behind fewer samples;
3. pause one running run and interrupt another one (:data:`ACTION_AFTER_SECONDS` in);
4. once every create was answered and a run has finished (and :data:`MIN_LOAD_SECONDS`
   have passed; :data:`MAX_LOAD_SECONDS` at most), send SIGTERM and time the drain: every
   queued and running run is paused with reason ``shutdown``, the process exits (code 0).

What each run does is followed on the server-wide stream (``GET /api/events/stream``: one
``status`` frame per change, with its reason and a queued run's position), shown live
(:mod:`app.cli.demo_view`). Then the same load against a second server started with
``--naive-mode`` (runs and short I/O share Trio's default 40 threads; no slots, no line),
and a summary side by side. ``--server URL`` plays one phase against that server instead
(its own limits; no SIGTERM: the demo interrupts its own runs left at the end).

Tasks (all owned by :func:`play_phase`'s nursery, cancelled when the phase ends): the
stream follower, the launcher's create workers, the sampler and its requests, the pause
and interrupt, the screen refresher. The embedded server's process is owned by
:func:`app.cli.demo_server.open_embedded_server`, which stops it if it is still alive on
the way out (an error, Ctrl-C: SIGTERM, then SIGKILL) and deletes its data directory.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import trio

from app.cli.client_parser import API_KEY_ENV_VAR
from app.cli.demo_server import (
    DemoError,
    EmbeddedServer,
    follow_server,
    open_embedded_server,
)
from app.cli.demo_view import (
    REFUSED,
    Action,
    DemoRun,
    Drain,
    PhaseBoard,
    Screen,
    phase_json,
    summary_table,
)
from app.cli.output import ExitCode, Output, report_client_error
from app.client import AsyncTrellisClient, ClientError
from app.client._requests import ClientOptions
from app.lifecycle import Status

# 48 runs: more than the naive mode's 40 shared threads (Trio's default thread limiter).
# With fewer, every naive run gets a thread at once and short requests never wait: the
# naive mode then has nothing to show.
DEFAULT_RUNS = 48
DEFAULT_SLOTS = 3
MAX_RUNS = 1000
CREATE_CONNECTIONS = 4
SAMPLE_INTERVAL_SECONDS = 0.05  # 20 short requests/s: plenty for a p99, cheap for the server
ACTION_AFTER_SECONDS = 0.8  # mid step: the first runs are in their first sleep by then
MIN_LOAD_SECONDS = 3.0  # > the shortest run (2 s): a run has finished, others are mid-run
MAX_LOAD_SECONDS = 12.0  # a phase never takes longer, whatever the server does
DIRECTOR_TICK_SECONDS = 0.05  # how often the phase checks whether to act or to stop
#: The short request: ``GET /api/conversations/{id}/events?limit=10``, a store read in a
#: worker thread (on the I/O limiter; in naive mode on the threads runs hold), as in
#: ``bench/naive_vs_trellis.py``. (A ``GET`` of the conversation itself is answered from
#: the store's record cache without a thread — ``app/api/http.py`` — so it would not show
#: what the threads do.)
SAMPLE_EVENTS = 10
REQUEST_TIMEOUT_SECONDS = 30.0
STREAM_END_TIMEOUT_SECONDS = 2.0  # the final frames come before the process exits
DESCRIPTION = (
    "Start a server, run N script conversations on M run slots and show live how they queue,"
    " run, get paused and interrupted, how short requests stay fast meanwhile, and how"
    " SIGTERM drains; then the same load on a server in naive mode, and both side by side."
)
PROBE_AGENT = {"kind": "script", "steps": [{"say": "I am only read"}]}


def add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``trellis demo`` to ``commands`` (the ``add_subparsers`` of ``trellis``)."""
    parser = commands.add_parser(
        "demo",
        help="watch runs queue, pause, stop and drain on an embedded server, then naive mode",
        description=DESCRIPTION,
        epilog="Exit codes: 0 the demo ran (and each embedded server drained with exit code"
        " 0); 1 a server failed to start or drain, or answered with an error; 2 bad options;"
        " 3 --server cannot be reached; 130 Ctrl-C.",
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        help="play against this running server instead (its own limits; no naive comparison,"
        " no SIGTERM: the demo interrupts its runs left at the end)",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help=f"with --server (default: ${API_KEY_ENV_VAR})"
    )
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, metavar="N",
        help=f"conversations to run (default: {DEFAULT_RUNS})",
    )  # fmt: skip
    parser.add_argument(
        "--slots", type=int, metavar="M",
        help=f"run slots of the embedded server (default: {DEFAULT_SLOTS})",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the summary as JSON, no view")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive-mode phase")


@dataclass(frozen=True)
class DemoOptions:
    runs: int
    slots: int
    server: str | None
    api_key: str | None
    naive: bool


def demo_command(arguments: argparse.Namespace) -> int:
    """Run ``trellis demo``; return its exit code."""
    output = Output(json=arguments.json)
    problem = _usage_problem(arguments)
    if problem:
        output.error(f"demo: {problem}")
        return ExitCode.USAGE
    options = DemoOptions(
        runs=arguments.runs,
        slots=arguments.slots or DEFAULT_SLOTS,
        server=arguments.server.rstrip("/") if arguments.server else None,
        api_key=arguments.api_key or os.environ.get(API_KEY_ENV_VAR) or None,
        naive=not arguments.no_naive and arguments.server is None,
    )
    try:
        try:
            boards = trio.run(play_demo, options, output)
        except BaseExceptionGroup as group:  # a task's error, through the phase's nurseries
            error = _first_of(group)
            if error is None:
                raise
            raise error from group
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except ClientError as error:
        return report_client_error(output, error, options.server or "the embedded server")
    except DemoError as error:
        output.error(f"demo: {error}")
        return ExitCode.API_ERROR
    if output.json:
        body = {"runs": options.runs, "phases": [phase_json(board) for board in boards]}
        output.line(json.dumps(body))
    else:
        output.console.print(summary_table(boards))
    drains = [board.drain for board in boards if board.drain is not None]
    return ExitCode.OK if all(drain.exit_code == 0 for drain in drains) else ExitCode.API_ERROR


def _usage_problem(arguments: argparse.Namespace) -> str | None:
    if not 1 <= arguments.runs <= MAX_RUNS:
        return f"--runs must be 1 to {MAX_RUNS}"
    if arguments.slots is not None and arguments.slots < 1:
        return "--slots must be 1 or more"
    if arguments.server and arguments.slots is not None:
        return "--slots is for the embedded servers; --server keeps its own limits"
    return None


def _first_of(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The group's first error that the demo reports as one line (a client error, a
    server that did not start, Ctrl-C), if it holds one."""
    error: BaseException | None = group.split((ClientError, DemoError, KeyboardInterrupt))[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def play_demo(options: DemoOptions, output: Output) -> list[PhaseBoard]:
    """Every phase, one after the other: its board, as it ended."""
    if options.server is not None:
        async with AsyncTrellisClient(options.server, api_key=options.api_key) as client:
            info = await client.server_info()
        slots = info.statistics.max_concurrent_runs
        board = PhaseBoard.create("server", options.server, slots, options.runs)
        await play_phase(board, options, output, None)
        return [board]
    boards = []
    for mode in ("trellis", "naive") if options.naive else ("trellis",):
        embedded = open_embedded_server(
            slots=options.slots, queued=options.runs, naive=mode == "naive"
        )
        async with embedded as server:
            board = PhaseBoard.create(mode, server.url, options.slots, options.runs)
            await play_phase(board, options, output, server)
            boards.append(board)
    return boards


# -- one phase -------------------------------------------------------------------------


async def play_phase(
    board: PhaseBoard, options: DemoOptions, output: Output, server: EmbeddedServer | None
) -> None:
    """Load the server, pause and interrupt, then drain it (or stop the demo's runs)."""
    url, key = board.server, options.api_key
    screen = Screen(output)
    async with (
        AsyncTrellisClient(url, api_key=key, timeout=REQUEST_TIMEOUT_SECONDS) as client,
        AsyncTrellisClient(url, api_key=key, timeout=REQUEST_TIMEOUT_SECONDS) as sampler,
    ):
        probe = await client.create_conversation(PROBE_AGENT, title="demo: short requests")
        started = trio.current_time()
        with screen.showing(board):
            async with trio.open_nursery() as nursery:
                stream_ended = trio.Event()
                stream_options = ClientOptions(url, key, REQUEST_TIMEOUT_SECONDS, 0)
                await nursery.start(follow_server, stream_options, board, stream_ended)
                nursery.start_soon(screen.refresh_every, board, started)
                async with trio.open_nursery() as load:
                    load.start_soon(sample_short_requests, sampler, probe.id, board)
                    launched = trio.Event()
                    load.start_soon(launch_runs, client, board, launched)
                    await direct(client, board, load, launched, started)
                    load.cancel_scope.cancel()
                _unsent(board)
                if server is not None:
                    board.drain = Drain()
                    board.drain = await server.terminate()
                    with trio.move_on_after(STREAM_END_TIMEOUT_SECONDS):
                        await stream_ended.wait()
                else:
                    await stop_demo_runs(client, board)
                board.elapsed = trio.current_time() - started
                nursery.cancel_scope.cancel()


async def sample_short_requests(
    client: AsyncTrellisClient, conversation_id: str, board: PhaseBoard
) -> None:
    """A short request (:data:`SAMPLE_EVENTS`) every :data:`SAMPLE_INTERVAL_SECONDS`, each in a
    task of its own (open loop), until cancelled; latencies (ms, from when the request was
    due) go to ``board.latencies_ms``."""

    async def sample(due: float) -> None:
        try:
            await client.search_events(conversation_id, limit=SAMPLE_EVENTS)
        except ClientError:
            return  # not counted: the board's p99 is of answers
        board.latencies_ms.append((trio.current_time() - due) * 1000)

    async with trio.open_nursery() as nursery:
        due = trio.current_time()
        while True:
            nursery.start_soon(sample, due)
            due += SAMPLE_INTERVAL_SECONDS
            await trio.sleep_until(due)


def run_agent(run: DemoRun, index: int) -> dict[str, Any]:
    """Say, sleep, say, sleep, finish: 2, 3 or 4 s of sleeping by ``index``, so that runs
    end at different times (and a pause waits for the sleep it finds to end)."""
    seconds = 1.0 + 0.5 * (index % 3)
    steps = [
        {"say": f"{run.label}: starting"},
        {"sleep": seconds},
        {"say": f"{run.label}: halfway"},
    ]
    steps += [{"sleep": seconds}, {"finish": f"{run.label}: done"}]
    return {"kind": "script", "steps": steps}


async def launch_runs(client: AsyncTrellisClient, board: PhaseBoard, launched: trio.Event) -> None:
    """Create every run's conversation (``run: true``) over a few connections; set
    ``launched`` once every create was answered."""
    pending: Iterator[tuple[int, DemoRun]] = enumerate(board.runs, start=1)

    async def worker() -> None:
        for index, run in pending:  # shared: each run is taken by one worker
            try:
                record = await client.create_conversation(
                    run_agent(run, index), title=f"demo {run.label}", run=True
                )
            except ClientError as error:
                board.refused(run, str(error))
                continue
            assert record.run is not None
            board.created(run, record.id, record.run.status, record.run.queue_position)

    async with trio.open_nursery() as nursery:
        for _ in range(CREATE_CONNECTIONS):
            nursery.start_soon(worker)
    launched.set()


async def direct(
    client: AsyncTrellisClient,
    board: PhaseBoard,
    nursery: trio.Nursery,
    launched: trio.Event,
    started: float,
) -> None:
    """Send the pause and the interrupt (each to a run running then), and return when the
    load has shown what it came to show (see the module docstring, step 4)."""
    unsent = ["interrupt", "pause"]
    while (elapsed := trio.current_time() - started) < MAX_LOAD_SECONDS:
        if elapsed >= ACTION_AFTER_SECONDS:
            unsent = [name for name in unsent if not _send_action(client, board, nursery, name)]
        ended = launched.is_set() and (board.count(Status.FINISHED) > 0 or not board.active())
        if ended and elapsed >= MIN_LOAD_SECONDS:
            return
        await trio.sleep(DIRECTOR_TICK_SECONDS)


def _send_action(
    client: AsyncTrellisClient, board: PhaseBoard, nursery: trio.Nursery, name: str
) -> bool:
    """Send ``name`` (pause, interrupt) to the first running run no other action took, if
    there is one now; whether it was sent."""
    taken = {other.label for other in board.actions}
    run = next((r for r in board.runs if r.status == Status.RUNNING and r.label not in taken), None)
    if run is None or run.conversation_id is None:
        return False
    action, conversation_id = Action(name, run.label), run.conversation_id
    board.actions.append(action)

    async def send() -> None:
        started = trio.current_time()
        call = client.pause if action.name == "pause" else client.interrupt
        try:
            answer = await call(conversation_id)
            action.answer = (
                answer.status if answer.status != Status.PAUSED else f"paused ({answer.reason})"
            )
        except ClientError as error:
            action.answer = f"refused: {error}"
        action.answered_ms = (trio.current_time() - started) * 1000

    nursery.start_soon(send)
    return True


def _unsent(board: PhaseBoard) -> None:
    """Creates cut short with the load (a stalled server): never answered, not admitted."""
    for run in board.runs:
        if run.conversation_id is None and run.status != REFUSED:
            board.refused(run, "not answered before the load ended")


async def stop_demo_runs(client: AsyncTrellisClient, board: PhaseBoard) -> None:
    """``--server``: interrupt the demo's runs still active, and let their frames arrive."""
    for run in board.active():
        if run.conversation_id is not None:
            with suppress(ClientError):  # it ended meanwhile (409): its frame says how
                await client.interrupt(run.conversation_id)
    with trio.move_on_after(STREAM_END_TIMEOUT_SECONDS):
        while board.active():  # noqa: ASYNC110 - plain data, polled like the director does
            await trio.sleep(DIRECTOR_TICK_SECONDS)
