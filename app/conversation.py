"""The run loop: what one run thread executes, from ``running`` to its final status.

Ownership: :func:`run_conversation` runs in a worker thread started by the supervisor's run
task with ``trio.to_thread.run_sync(..., abandon_on_cancel=False)``; the run task holds the
run slot until this function has returned, so a slot is never free while its thread lives.
The thread writes its own status changes and events to the store (blocking calls are fine
here: this *is* the worker thread).

Cancellation (cooperative — Python threads cannot be killed):

* between steps the loop calls ``trio.from_thread.check_cancelled()``, which raises
  :class:`trio.Cancelled` once the run task was cancelled (interrupt, shutdown, delete);
* inside a step, blocking waits go through the Trio side (:meth:`RunContext.call_async`,
  :meth:`RunContext.run_tools`) and are cancelled with the run task at once — that is how
  interrupt takes effect mid-step; :meth:`RunContext.sleep` sleeps in the thread itself,
  and the stop wakes it directly (``app/stop_bell.py``);
* pause is not a cancellation: a flag read at the next step boundary.

The final status of a run that ends by itself (``finished``, ``error``, or ``paused`` at a
pause's step boundary) is committed *by this thread before it returns*. A cancelled run's
``paused`` is committed by its run task right after the thread returned (see
:func:`run_conversation`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from app.agents.base import Agent
from app.agents.registry import AgentRegistry
from app.events import (
    ActionPayload,
    ErrorPayload,
    Event,
    ObservationPayload,
    Payload,
    Source,
)
from app.lifecycle import Trigger
from app.live.feed import Delta
from app.redact import redact
from app.stop_bell import StopBell
from app.store.base import EventQuery, EventStore
from app.tools.base import ToolEnvironment, ToolResult
from app.tools.calls import ToolCall, ToolRegistry, execute_calls
from app.tools.parallel import run_in_tool_threads

T = TypeVar("T")

#: ``listener(conversation_id, run_id, steps)``, called by the run thread after each
#: completed step (recorded first); it must not block (hand the news to the Trio thread).
StepListener = Callable[[str, str, int], None]


#: The observation recorded for each call of a batch the run was stopped in.
STOPPED_BEFORE_RESULT = ToolResult(
    "the run was stopped before this call returned; whatever it did so far was not reported",
    is_error=True,
    data={"stopped": True},
)


@dataclass(eq=False)
class RunControl:
    """What the Trio side tells a running loop: pause at the boundary, or stop why.

    Written by the supervisor (Trio thread), read by the run thread. Plain attribute reads
    and writes of these values are atomic under the GIL; the cancel itself travels through
    the run task's cancel scope, not through this object.
    """

    pause_requested: bool = False
    stop_reason: str | None = None
    thread_started: bool = False  # set by the run thread; read after it returned
    #: Set at admission: the admitting transaction recorded the run ``running`` already.
    recorded_started: bool = False
    end_recorded: bool = False  # set by the run thread once its final status is committed
    ended_as: str | None = None  # "status/reason" of the end, for the run's log line
    steps: int = 0  # completed steps, for the log line
    #: Rung by the stop (``RunHandle.stop``): ends the thread's :meth:`RunContext.sleep`.
    bell: StopBell = field(default_factory=StopBell)


@dataclass(eq=False)
class RunContext:
    """Implements :class:`~app.agents.base.StepContext` for one run."""

    store: EventStore
    conversation_id: str
    run_id: str
    agent_spec: dict[str, Any]
    registry: AgentRegistry
    max_iterations: int
    control: RunControl
    tools: ToolRegistry
    tool_env: ToolEnvironment
    state: dict[str, Any] = field(default_factory=dict)
    on_step: StepListener | None = None
    #: Where :meth:`delta` sends fragments (the supervisor's feed; None: nowhere).
    publish_delta: Callable[[Delta], None] | None = None
    #: The seq of the last event this run committed or read (0: none yet).
    last_seq: int = 0

    def history(self, after_seq: int = 0) -> list[Event]:
        events: list[Event] = []
        after = after_seq
        while True:
            page = self.store.search_events(
                self.conversation_id, EventQuery(after_seq=after, limit=1000)
            )
            events.extend(page.items)
            if page.next_seq is None:
                self.last_seq = max(self.last_seq, events[-1].seq if events else 0)
                return events
            after = page.next_seq

    def emit(self, payload: Payload, source: Source = Source.AGENT) -> Event:
        event = self.store.append_event(self.conversation_id, self.run_id, source, payload)
        self.last_seq = max(self.last_seq, event.seq)
        return event

    def delta(self, text: str) -> None:
        if self.publish_delta is not None and text:
            self.publish_delta(Delta(self.conversation_id, self.run_id, text, self.last_seq))

    def sleep(self, seconds: float) -> None:
        """Sleep in this thread; a stop rings the run's :class:`~app.stop_bell.StopBell`
        and ``trio.Cancelled`` comes out at once (see ``app/stop_bell.py`` for why not on
        the Trio side). Should the bell ring while Trio does not report the cancel (yet),
        the rest of the sleep is slept on the Trio side, where the cancel cannot be missed.
        """
        self.check_cancelled()
        began = time.monotonic()
        if self.control.bell.wait(seconds):
            self.check_cancelled()
            rest = seconds - (time.monotonic() - began)
            if rest > 0:
                trio.from_thread.run(trio.sleep, rest)

    def call_async(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args)

    def run_tools(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        return trio.from_thread.run(run_in_tool_threads, calls, self.tool_env.tool_limiter)

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        return self.tools.schema(name) if self.tools.get(name) is not None else None

    def call_tools(
        self,
        calls: Sequence[ToolCall],
        max_parallel: int = 4,
        allowed: Collection[str] | None = None,
    ) -> list[ToolResult]:
        for call in calls:
            arguments = _as_object(call.arguments)
            self.emit(ActionPayload(call_id=call.call_id, tool=call.tool, arguments=arguments))
        # Filled in on the Trio side as each call returns; read here once it is all over.
        returned: list[ToolResult | None] = [None] * len(calls)
        try:
            results = trio.from_thread.run(
                execute_calls,
                calls,
                self.tools,
                self.tool_env,
                max(1, max_parallel),
                allowed,
                returned,
            )
        except BaseException as exc:
            if is_cancellation(exc):
                # Every action gets its observation, so the log (and a model reading it on
                # the next run) never shows a call without an answer: the real result of a
                # call that returned before the stop, "stopped" for the others.
                for call, result in zip(calls, returned, strict=True):
                    self._observe(call, result or STOPPED_BEFORE_RESULT)
            raise
        for call, result in zip(calls, results, strict=True):
            self._observe(call, result)
        return results

    def _observe(self, call: ToolCall, result: ToolResult) -> None:
        observation = ObservationPayload(
            call_id=call.call_id,
            tool=call.tool,
            content=result.content,
            is_error=result.is_error,
            data=result.data,
        )
        self.emit(observation, Source.TOOL)

    def check_cancelled(self) -> None:
        trio.from_thread.check_cancelled()


def _as_object(arguments: dict[str, Any] | str) -> dict[str, Any]:
    """Tool arguments as a JSON object for the ``action`` event: text that is not a JSON
    object (a model's malformed output) is kept verbatim as ``{"raw": text}``."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return {"raw": arguments}
    return parsed if isinstance(parsed, dict) else {"raw": arguments}


def run_conversation(ctx: RunContext) -> None:
    """Drive the agent until it finishes, fails, pauses or is cancelled (run thread only).

    Cancellation:
        ``trio.Cancelled`` (or a group of them, from a nursery on the Trio side) is
        re-raised to the run task, which records the run ``paused`` with
        ``control.stop_reason`` once this thread has returned (after all of its events), in
        one transaction with the other runs stopped at the same time (see
        ``app/end_ledger.py``): a drain of 10,000 runs is not 10,000 transactions.

    Errors:
        Anything else the agent raises — an ``Exception``, but also ``SystemExit``,
        ``KeyboardInterrupt`` or any other ``BaseException`` raised *in this thread* — is
        recorded (``error`` event naming the exception, status ``error``, reason
        ``agent_error``) and not re-raised: one failing run never affects another. Only a
        failure to record (the store refused the write) propagates; the run task then
        records the end itself.
    """
    store, run_id = ctx.store, ctx.run_id
    ctx.control.thread_started = True
    leave_a_spare_thread()
    try:
        ctx.check_cancelled()
        if not ctx.control.recorded_started:  # it waited for its slot: record the start
            store.transition_run(run_id, Trigger.START, reason="started")
        ctx.tool_env.workspace.mkdir(parents=True, exist_ok=True)
        ctx.state = store.get_agent_state(ctx.conversation_id)
        _loop(ctx, ctx.registry.create(ctx.agent_spec))
    except BaseException as exc:
        if is_cancellation(exc):
            raise  # the run task records the stop, batched with the runs stopped with it
        if ctx.control.end_recorded:
            raise  # the end is on record; what failed came after it
        # A BaseException's text alone rarely says what happened (SystemExit(3) is "3").
        message = str(exc) if isinstance(exc, Exception) else f"{type(exc).__name__}: {exc}"
        _fail(ctx, message, type(exc).__name__, reason="agent_error")


def leave_a_spare_thread() -> None:
    """Start an idle worker thread in Trio's thread cache, for the next run to take.

    Every run keeps its thread for its whole life, so the cache never has one to spare for
    the next run: without this, each run start would create a thread *on the Trio thread*,
    which then blocks until the new thread has started — ~1 to 3 ms with the GIL contended,
    during which no request is served. Creating it here moves that wait to this run thread
    (which has nothing better to do yet). An idle worker nobody takes exits after Trio's
    idle timeout (10 s), so a burst leaves at most one spare per run behind, briefly.

    Errors: none. When no thread can be started now (the process is at its thread limit),
    there is simply no spare: the next run's start creates its thread itself, as it would.
    """
    with contextlib.suppress(RuntimeError):  # "can't start new thread"
        trio.lowlevel.start_thread_soon(_nothing, _nothing)


def _nothing(*_: object) -> None:
    return None


def _loop(ctx: RunContext, agent: Agent) -> None:
    steps = 0
    while True:
        ctx.check_cancelled()
        if ctx.control.pause_requested:
            _end(ctx, Trigger.STOP, "pause")
            return
        if steps >= ctx.max_iterations:
            message = f"the run reached max_iterations ({ctx.max_iterations} steps)"
            _fail(ctx, message, "MaxIterationsReached", reason="max_iterations")
            return
        result = agent.step(ctx)
        steps += 1
        ctx.control.steps = steps
        ctx.store.save_progress(ctx.run_id, steps=steps, agent_state=ctx.state)
        if ctx.on_step is not None:
            ctx.on_step(ctx.conversation_id, ctx.run_id, steps)
        if result.done:
            _end(ctx, Trigger.FINISH, "agent_finished")
            return


def _fail(ctx: RunContext, message: str, error_type: str, *, reason: str) -> None:
    message = redact(message, workspace=ctx.tool_env.workspace)  # no secrets, no server paths
    ctx.emit(ErrorPayload(message=message, error_type=error_type), Source.SYSTEM)
    _end(ctx, Trigger.FAIL, reason, error=message)


def _end(ctx: RunContext, trigger: Trigger, reason: str, error: str | None = None) -> None:
    """Commit the run's final status, and say so to the run task."""
    run = ctx.store.transition_run(ctx.run_id, trigger, reason=reason, error=error)
    ctx.control.end_recorded = True
    ctx.control.ended_as = f"{run.status.value}/{reason}"


def is_cancellation(exc: BaseException) -> bool:
    """True for ``trio.Cancelled`` and for exception groups made only of them."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return rest is None
    return False
