"""Supervise runs from your own Trio program: start them, watch them live, interrupt one,
shut down.

    .venv/bin/python examples/supervise.py

No HTTP: the program opens the run supervisor the server uses, registers its own agent kind
(``countdown``), and plays a short story with five conversations on two run slots, printing
every status change and message as the conversations' live streams deliver them.

Who owns what::

    trio.run(main)
    └── main task
        ├── "watchers" nursery: Watch.follow, one task per conversation, reading
        │   follow_conversation() — the live feed the SSE and WebSocket routes use
        └── open_run_supervisor(...), inside the watchers' block: the supervisor's nursery
            └── one task per run: waits for a run slot, then hosts the run's worker
                thread, which calls CountdownAgent.step() once per step

The watchers' nursery is *outside* the supervisor block on purpose: a stream ends only when
the supervisor drains (its last item is ``End("shutdown")``, after every final status), so
the watchers outlive the supervisor by that much and are joined last.

Cancellation:
    A countdown step waits for the program's tick on the Trio side, through
    ``ctx.call_async``. An interrupt cancels that wait at once: ``trio.Cancelled`` comes out
    of ``call_async`` in the run thread, the step is abandoned (not saved: the next run of
    the conversation repeats it), the thread returns, and only then does the run give its
    slot back and get recorded ``paused`` with reason ``interrupt``. Leaving the
    ``open_run_supervisor`` block does the same to every run still active, with reason
    ``shutdown``: running ones are cancelled and their threads joined, queued ones leave the
    line without ever starting a thread.

Deterministic output: the program waits for each stream to show the outcome of one action
before it takes the next, so the live lines come in the same order every time. Only the
shutdown stops several runs at once; their streams then speak in an order that depends on
timing, so those last lines are collected and printed per conversation after the block.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from contextlib import aclosing
from typing import Literal

import trio
from pydantic import BaseModel, Field

from app import (
    CONTINUE,
    MessagePayload,
    NewConversation,
    RunSupervisor,
    Settings,
    SqliteStore,
    StepContext,
    StepResult,
    default_registry,
    finish,
    open_run_supervisor,
)
from app.events import Event, StatusPayload
from app.live.follow import End, follow_conversation
from app.threads import apply_thread_settings

#: How long the program waits for a stream to show what it expects. Each wait takes a few
#: milliseconds; this bound only turns a bug into an error instead of a hang.
WAIT_SECONDS = 20.0


class Metronome:
    """The program's hand on the countdowns: each :meth:`tick` lets one conversation's
    agent take one step. Trio side only; run threads wait through ``ctx.call_async``."""

    def __init__(self) -> None:
        self._ticks: defaultdict[str, trio.Semaphore] = defaultdict(lambda: trio.Semaphore(0))
        self._waiting: defaultdict[str, trio.Event] = defaultdict(trio.Event)

    def tick(self, conversation_id: str) -> None:
        self._ticks[conversation_id].release()

    async def wait_for_tick(self, conversation_id: str) -> None:
        """Called by a step (through ``ctx.call_async``): wait for the conversation's tick.

        Cancellation: cancelled with the run (an interrupt, the shutdown)."""
        self._waiting[conversation_id].set()
        try:
            await self._ticks[conversation_id].acquire()
        finally:
            del self._waiting[conversation_id]

    async def until_waiting(self, conversation_id: str) -> None:
        """Wait until the conversation's agent waits for a tick (at most WAIT_SECONDS)."""
        with trio.fail_after(WAIT_SECONDS):
            await self._waiting[conversation_id].wait()


class CountdownSpec(BaseModel):
    """What a request says about a countdown agent: ``{"kind": "countdown", "start": 3}``."""

    kind: Literal["countdown"]
    start: int = Field(3, ge=1)


class CountdownAgent:
    """Counts down from ``start`` to "liftoff", one number per step, each on the
    program's tick. Its position is ``ctx.state``: saved after every completed step."""

    def __init__(self, spec: CountdownSpec, metronome: Metronome) -> None:
        self.start = spec.start
        self.metronome = metronome

    def step(self, ctx: StepContext) -> StepResult:  # runs in the run's worker thread
        ctx.call_async(self.metronome.wait_for_tick, ctx.conversation_id)  # an interrupt ends it
        said = int(ctx.state.get("said", 0))
        left = self.start - said
        ctx.emit(MessagePayload(text=str(left) if left else "liftoff"))
        ctx.state["said"] = said + 1
        return finish() if left == 0 else CONTINUE


class Printer:
    """Prints the watchers' lines as they come, until :meth:`hold`; from then on each
    :class:`Watch` keeps its lines for :meth:`Watch.print_held`."""

    def __init__(self) -> None:
        self.holding = False

    def hold(self) -> None:
        self.holding = True


class Watch:
    """Follows one conversation's live stream and prints what happens in it."""

    def __init__(self, name: str, printer: Printer) -> None:
        self.name = name
        self.printer = printer
        self.seen: list[str] = []
        self.held: list[str] = []
        self._news = trio.Event()

    async def follow(self, supervisor: RunSupervisor, conversation_id: str) -> None:
        """Print the conversation's status changes and messages until its stream ends.

        ``follow_conversation`` replays what is stored, then delivers each new event once it
        is committed, with no gap and no duplicate; it ends with an :class:`End` saying why
        (here: ``shutdown``, once the supervisor has drained). ``aclosing`` closes the
        generator, and so its subscription, if this task is cancelled.
        """
        kinds = frozenset({"status", "message"})
        stream = follow_conversation(supervisor, conversation_id, after_seq=0, kinds=kinds)
        async with aclosing(stream) as batches:
            async for batch in batches:
                for item in batch:
                    if isinstance(item, Event):
                        self._show(self._describe(item))
                    elif isinstance(item, End):
                        self._show(f"{self.name}: stream ended ({item.reason})")
                    # Heartbeats (idle streams) and deltas (text being typed) are skipped.

    def _describe(self, event: Event) -> str:
        payload = event.payload
        if isinstance(payload, StatusPayload):
            return f"{self.name}: {payload.status} ({payload.reason})"
        assert isinstance(payload, MessagePayload)
        return f"{self.name} says {payload.text}"

    def _show(self, line: str) -> None:
        self.seen.append(line)
        if self.printer.holding:
            self.held.append(line)
        else:
            print(line)
        self._news.set()
        self._news = trio.Event()

    async def until(self, line: str) -> None:
        """Wait until this conversation's stream has shown ``line``.

        Errors: ``trio.TooSlowError`` after :data:`WAIT_SECONDS`: something is broken.
        """
        with trio.fail_after(WAIT_SECONDS):
            while line not in self.seen:
                await self._news.wait()

    def print_held(self) -> None:
        for line in self.held:
            print(line)


class Story:
    """The program's side: creates conversations, starts their runs, ticks their agents,
    and after each action waits for the streams to show its outcome."""

    def __init__(
        self, supervisor: RunSupervisor, watchers: trio.Nursery, metronome: Metronome
    ) -> None:
        self.supervisor = supervisor
        self.watchers = watchers
        self.metronome = metronome
        self.printer = Printer()
        self.watches: dict[str, Watch] = {}
        self.ids: dict[str, str] = {}

    async def start(self, name: str, count_from: int) -> None:
        """Create a conversation, follow it, start its run; wait until its stream shows
        the run running, or waiting in line for a slot."""
        new = NewConversation(
            agent={"kind": "countdown", "start": count_from}, title=name, max_iterations=10
        )
        store = self.supervisor.store
        conversation, _ = await self.supervisor.io(store.create_conversation, new)
        self.ids[name] = conversation.id
        watch = self.watches[name] = Watch(name, self.printer)
        self.watchers.start_soon(watch.follow, self.supervisor, conversation.id)
        run = await self.supervisor.start_run(conversation.id)
        if run.queue_position is None:
            await watch.until(f"{name}: running (started)")
        else:
            await watch.until(f"{name}: queued (user)")
            print(f"{name} waits for a run slot, at position {run.queue_position}")

    async def tick(self, name: str, then: str) -> None:
        """Let ``name``'s agent take one step; wait until its stream shows ``then``."""
        self.metronome.tick(self.ids[name])
        await self.watches[name].until(then)

    async def interrupt(self, name: str) -> None:
        await self.metronome.until_waiting(self.ids[name])
        print(f"interrupting {name} while its step waits for a tick")
        await self.supervisor.interrupt(self.ids[name])
        await self.watches[name].until(f"{name}: paused (interrupt)")


async def main() -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(max_concurrent_runs=2, data_dir=data_dir)
        apply_thread_settings(settings)  # before the first worker thread starts
        store = SqliteStore(settings.database_path)  # the program's: it closes it, at the end
        try:
            await tell_the_story(settings, store)
        finally:
            store.close()


async def tell_the_story(settings: Settings, store: SqliteStore) -> None:
    """Five conversations, two run slots: two count down side by side, one finishes, one
    is interrupted mid-step; three more start, one of them waits in line; then the
    supervisor block ends with two runs running and one queued."""
    metronome = Metronome()
    registry = default_registry()
    registry.register("countdown", CountdownSpec, lambda spec: CountdownAgent(spec, metronome))
    # Leaving this block closes the supervisor first (the drain: see the module docstring),
    # then the watchers' nursery, which waits for the streams to end.
    async with (
        trio.open_nursery() as watchers,
        open_run_supervisor(settings, store, registry=registry) as supervisor,
    ):
        story = Story(supervisor, watchers, metronome)
        print(supervisor)
        await story.start("alpha", 2)
        await story.start("beta", 3)
        await story.tick("alpha", "alpha says 2")
        await story.tick("beta", "beta says 3")
        await story.tick("alpha", "alpha says 1")
        await story.tick("beta", "beta says 2")
        await story.tick("alpha", "alpha: finished (agent_finished)")
        await story.interrupt("beta")
        await story.start("gamma", 3)
        await story.start("delta", 3)
        await story.start("epsilon", 3)
        print(supervisor)
        print("leaving the supervisor block: every active run is stopped")
        story.printer.hold()
    # The drain is over: every run has ended, every run thread has returned, and each
    # stream got its conversation's final status, then its end; the watchers returned.
    print(supervisor)
    print(f"run threads alive: {supervisor.statistics().run_threads_alive}")
    for watch in story.watches.values():
        watch.print_held()


if __name__ == "__main__":
    trio.run(main)
