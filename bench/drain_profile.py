"""Where a drain's time goes: N sleeping script runs, stopped at once, timed phase by phase.

Usage: ``.venv/bin/python bench/drain_profile.py [--sizes 1000,2000,3000] [--repeat 3]
[--json PATH] [--no-gc-freeze] [--window N] [--log PATH] [--cprofile PATH] [--py-spy PATH]
[--threads-only]`` (``--cprofile``: the Trio thread's drain, pstats; ``--py-spy``: the GIL
holder's stacks, raw; needs ``pip install py-spy``). To compare against another version of
``app/``, put a copy of it first on ``PYTHONPATH``.

Embedded, no HTTP: each measurement opens :func:`~app.supervisor.open_run_supervisor` with a
real :class:`~app.store.SqliteStore` in a fresh temporary directory, starts N runs of a
script that says one message and then sleeps for a minute (the same runs as
``bench/scale.py`` and ``tests/test_shutdown_many.py``), waits until every run's message is
committed — every thread is then asleep in ``ctx.sleep`` — and drains. Like the real server
(``app/cli/serving.py``), what start-up allocated is frozen out of the garbage collector's
scans and full collections are made rare (``--no-gc-freeze``: Python's defaults).

The phases, each the time from the drain's start until the *last* run got there (and the
median run, in the JSON):

==============  ===========================================================================
``cancel``      every handle was cancelled (``RunHandle.cancel``; ``stop`` before it)
``noticed``     each run thread saw ``trio.Cancelled`` come out of its ``ctx.sleep``
``returned``    each run thread's function returned (in the thread)
``joined``      each thread's host task saw it return (run slot given back)
``ending``      each run task began to record its end (``ActiveRuns.mark_ending``)
``batch``       each batch of stops was handed to the store (``EndLedger._write_stops``)
``recorded``    each run task's end was committed and its handle unregistered
``drain``       ``RunSupervisor.drain`` returned (the streams ended too)
``exit``        the ``open_run_supervisor`` block was left (the nursery joined)
==============  ===========================================================================

plus every ``stop_runs`` transaction (its size, and when it started and ended). The
instruments are wrappers installed by this script around those functions (a
``time.monotonic()`` and a list append each); nothing in ``app/`` is changed for them.

``--threads-only``: no runs, only N threads asleep on stop bells in ``to_thread``, woken
through a ``BellRinger`` (``--window N`` sets ``app.stop_bell.WAKE_WINDOW``; a window of N
or more wakes them all at once): what waking costs by itself.

Keep N at 3,000 or less on a shared machine: each run is one OS thread.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # after PYTHONPATH: a snapshot of app/ may come first

from app import run_task, stop_bell  # noqa: E402
from app.conversation import RunContext  # noqa: E402
from app.end_ledger import EndLedger  # noqa: E402
from app.events import Event, MessagePayload, Source  # noqa: E402
from app.handles import ActiveRuns, RunHandle  # noqa: E402
from app.logs import configure_logging  # noqa: E402
from app.metrics import Metrics  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.stop_bell import BellRinger, StopBell  # noqa: E402
from app.store import NewConversation, SqliteStore  # noqa: E402
from app.supervisor import open_run_supervisor  # noqa: E402
from app.threads import apply_thread_settings  # noqa: E402

SLEEPER = {"kind": "script", "steps": [{"say": "started"}, {"sleep": 60}, {"finish": "never"}]}
PHASES = ("cancel", "noticed", "returned", "joined", "ending", "batch", "recorded", "drain", "exit")


class Clock:
    """Timestamps of each phase, from any thread (``list.append`` is atomic)."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.transactions: list[tuple[int, float, float]] = []  # (runs, began, ended)
        self.armed = False

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def mark(self, phase: str) -> None:
        if self.armed:
            self.marks[phase].append(time.monotonic())


CLOCK = Clock()


def _wrap(owner: Any, name: str, phase: str, *, on_error: bool = False) -> None:
    """Mark ``phase`` after ``owner.name`` returns (``on_error``: when it raises)."""
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = original(*args, **kwargs)
        except BaseException:
            if on_error:
                CLOCK.mark(phase)
            raise
        if not on_error:
            CLOCK.mark(phase)
        return result

    setattr(owner, name, wrapper)


def _wrap_async(owner: Any, name: str, phase: str) -> None:
    """Mark ``phase`` when ``owner.name`` (a coroutine function) is called."""
    original: Callable[..., Any] = getattr(owner, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        CLOCK.mark(phase)
        return await original(*args, **kwargs)

    setattr(owner, name, wrapper)


def install_instruments() -> None:
    # The stop loop's per-run call: ``cancel`` (the bell is rung apart), ``stop`` before it.
    _wrap(RunHandle, "cancel" if hasattr(RunHandle, "cancel") else "stop", "cancel")
    _wrap(RunContext, "sleep", "noticed", on_error=True)
    original_thread = run_task.run_conversation

    def thread_fn(ctx: RunContext) -> None:
        try:
            original_thread(ctx)
        finally:
            CLOCK.mark("returned")

    run_task.run_conversation = thread_fn  # type: ignore[assignment]
    _wrap(Metrics, "thread_returned", "joined")
    _wrap(ActiveRuns, "mark_ending", "ending")
    _wrap_async(EndLedger, "_write_stops", "batch")
    _wrap(ActiveRuns, "remove", "recorded")


class TimedStore(SqliteStore):
    """A real store that times its ``stop_runs`` transactions."""

    def stop_runs(self, run_ids: list[str], *, reason: str) -> Any:
        began = time.monotonic()
        try:
            return super().stop_runs(run_ids, reason=reason)
        finally:
            if CLOCK.armed:
                CLOCK.transactions.append((len(run_ids), began, time.monotonic()))


class Said:
    """A store listener: ``all`` is set once ``count`` agent messages were committed."""

    def __init__(self, count: int) -> None:
        self.count, self.seen, self.all = count, 0, threading.Event()

    def __call__(self, events: list[Event]) -> None:
        self.seen += sum(
            1 for e in events if isinstance(e.payload, MessagePayload) and e.source is Source.AGENT
        )
        if self.seen >= self.count:
            self.all.set()


def start_py_spy(output: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of this process (GIL holders only, not pausing it), to ``output``
    in raw (collapsed stacks) format; thread ids in the stacks."""
    py_spy = Path(sys.executable).parent / "py-spy"
    command = [str(py_spy), "record", "--pid", str(os.getpid()), "--gil", "--idle"]
    command += ["--nonblocking", "-t", "-r", "200", "-f", "raw", "-o", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


async def measure(
    size: int, data_dir: Path, profile: Path | None = None, cprofile: Path | None = None
) -> dict[str, Any]:
    """Start ``size`` sleepers, drain, return the phases (seconds from the drain's start);
    with ``profile``, record the drain with py-spy there."""
    settings = Settings(
        data_dir=data_dir, max_concurrent_runs=size, max_queued_runs=size, io_threads=4
    )
    store = TimedStore(settings.database_path)
    said = Said(size)
    store.add_listener(said)
    began = 0.0
    try:
        async with open_run_supervisor(settings, store) as sup:
            for _ in range(size):
                new = NewConversation(agent=SLEEPER, title=None, max_iterations=10)
                conversation, _ = await sup.io(store.create_conversation, new)
                await sup.start_run(conversation.id)
            await trio.to_thread.run_sync(said.all.wait, abandon_on_cancel=True)
            spy = start_py_spy(profile) if profile else None
            await trio.sleep(2.0 if spy else 0.5)  # py-spy attaches; spare threads settle
            CLOCK.reset()
            CLOCK.armed = True
            trio_thread = cProfile.Profile() if cprofile else None
            if trio_thread is not None:
                trio_thread.enable()  # this thread only: the Trio thread
            began = time.monotonic()
            abandoned = await sup.drain()
            if trio_thread is not None:
                trio_thread.disable()
                trio_thread.dump_stats(cprofile)
            CLOCK.mark("drain")
        CLOCK.mark("exit")
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            await trio.to_thread.run_sync(spy.wait)
    finally:
        CLOCK.armed = False
        store.remove_listener(said)
    active = store.list_active_runs()
    store.close()
    return summarize(size, began, abandoned, len(active))


async def threads_only(size: int) -> float:
    """``size`` threads asleep on stop bells in ``to_thread`` (nothing else: no store, no
    runs); their scopes cancelled at once, their bells rung through a
    :class:`~app.stop_bell.BellRinger`. Returns the seconds until every thread returned."""
    bells = [StopBell() for _ in range(size)]
    scopes = [trio.CancelScope() for _ in range(size)]
    returned = 0
    all_returned = trio.Event()

    def sleeper(bell: StopBell) -> None:
        bell.wait(60)
        trio.from_thread.check_cancelled()

    async def host(bell: StopBell, scope: trio.CancelScope) -> None:
        nonlocal returned
        with scope:
            await trio.to_thread.run_sync(sleeper, bell, limiter=limiter)
        returned += 1
        if returned == size:
            all_returned.set()

    limiter = trio.CapacityLimiter(size)
    async with trio.open_nursery() as nursery:
        for bell, scope in zip(bells, scopes, strict=True):
            nursery.start_soon(host, bell, scope)
        while not all(bell.sleeping for bell in bells):  # noqa: ASYNC110 (bells have no event)
            await trio.sleep(0.05)
        began = time.monotonic()
        for scope in scopes:
            scope.cancel()
        BellRinger().ring_all(bells)
        await all_returned.wait()
        return time.monotonic() - began


def summarize(size: int, began: float, abandoned: int, active: int) -> dict[str, Any]:
    out: dict[str, Any] = {"size": size, "abandoned": abandoned, "left_active": active}
    for phase, marks in CLOCK.marks.items():
        if marks:
            rel = sorted(m - began for m in marks)
            out[phase] = {
                "count": len(rel),
                "first": rel[0],
                "median": statistics.median(rel),
                "last": rel[-1],
            }
    out["transactions"] = [
        {"runs": n, "start": round(b - began, 4), "seconds": round(e - b, 4)}
        for n, b, e in CLOCK.transactions
    ]
    return out


def line(result: dict[str, Any]) -> str:
    parts = [f"N={result['size']:>5}"]
    for phase in PHASES:
        if phase in result:
            marks = result[phase]
            if marks["count"] == 1:
                parts.append(f"{phase} {marks['last']:.3f}")
            else:
                parts.append(
                    f"{phase} {marks['first']:.2f}/{marks['median']:.2f}/{marks['last']:.2f}"
                )
    txs = ", ".join(
        f"{t['runs']}@{t['start']:.2f}+{t['seconds']:.2f}" for t in result["transactions"]
    )
    parts.append(f"stop_runs [{txs}]")
    if result["abandoned"] or result["left_active"]:
        parts.append(f"ABANDONED {result['abandoned']} ACTIVE {result['left_active']}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,2000,3000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-gc-freeze", action="store_true")
    parser.add_argument("--py-spy", type=Path, help="record each drain to PATH.N.txt")
    parser.add_argument("--cprofile", type=Path, help="profile the Trio thread's drain")
    parser.add_argument("--log", type=Path, help="log at INFO to PATH, as the server does")
    parser.add_argument("--window", type=int, help="stop_bell.WAKE_WINDOW for these runs")
    parser.add_argument(
        "--threads-only", action="store_true", help="sleeping to_thread threads, no runs"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > 3000:
        parser.error("keep N at 3,000 or less on a shared machine")
    apply_thread_settings(Settings())
    if args.window is not None:
        stop_bell.WAKE_WINDOW = args.window
    if args.threads_only:
        for size in sizes:
            seconds = [trio.run(threads_only, size) for _ in range(args.repeat)]
            print(f"N={size:>5} window {stop_bell.WAKE_WINDOW}: threads returned after {seconds}")
        return 0
    if args.log:  # the server logs every run's start and end at INFO (to a file in bench/)
        configure_logging("info", "text", stream=args.log.open("w"))
    install_instruments()
    if not args.no_gc_freeze:  # as app/cli/serving.py does once it serves
        gc.freeze()
        gc.set_threshold(700, 10, 1000)
    results: list[dict[str, Any]] = []
    for size in sizes:
        runs = []
        for index in range(args.repeat):
            spy = args.py_spy and args.py_spy.with_suffix(f".{size}.{index}.txt")
            cpr = args.cprofile and args.cprofile.with_suffix(f".{size}.{index}.pstats")
            with tempfile.TemporaryDirectory() as tmp:
                result = trio.run(measure, size, Path(tmp) / "data", spy, cpr)
            print(line(result), flush=True)
            runs.append(result)
        exits = [r["exit"]["last"] for r in runs]
        print(f"N={size:>5}: drain→exit median {statistics.median(exits):.3f} s of {exits}")
        results.extend(runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
