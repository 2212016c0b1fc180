"""One admitted run: wait for its turn, run its thread, record its end — always.

Ownership: admission (``RunSupervisor``) registers the run's handle, gives it a run slot or
a place in the line, and starts :func:`run_admitted` in the supervisor's nursery. From then
on the run task owns the handle: whatever happens, it records the run's end (unless the
thread already did) and unregisters the handle, which sets ``handle.done`` for whoever
waits (the next run of the conversation, ``drain``, ``wait_run``, delete).

The run's thread is *hosted* by a small system task (:func:`_host_thread`), not by the run
task itself. Normally nothing changes: the run task waits for the host, the host waits for
the thread. The indirection exists for the last resort: a thread that ignores cancellation
(a custom agent blocking without a cancellation point) cannot be killed, and a task
waiting for it with ``abandon_on_cancel=False`` could never finish — nor could the nursery
around it. Here the supervisor can *abandon* such a run after its grace period: the run
task records the end and returns, the supervisor closes on time, and the host keeps the run
slot until the thread really returns.

Cancellation:
    ``handle.cancel_scope`` covers the waiting; ``handle.thread_scope`` the thread (what its
    ``check_cancelled`` and its calls into Trio see). ``handle.stop()`` cancels the first
    while the run waits, the second (and rings the run's stop bell) once its thread is
    hosted. A run cancelled while waiting never starts a thread. If the run task itself is
    cancelled from outside (its nursery), it passes the stop on to the thread and waits for
    it, shielded, until the thread returns or the run is abandoned.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from app.agents.registry import AgentRegistry
from app.conversation import RunContext, StepListener, is_cancellation, run_conversation
from app.end_ledger import EndLedger
from app.handles import ActiveRuns, RunHandle
from app.lifecycle import Trigger
from app.live.feed import EventFeed
from app.logs import log_fields
from app.metrics import Metrics
from app.records import ConversationRecord
from app.settings import Settings
from app.slot_line import SlotLine
from app.stop_bell import BellRinger
from app.store.base import EventStore
from app.tools.base import ToolEnvironment
from app.tools.calls import ToolRegistry

T = TypeVar("T")
log = logging.getLogger("trellis.runs")


@dataclass(frozen=True, slots=True)
class RunShared:
    """What every run task shares; created and owned by the supervisor."""

    settings: Settings
    registry: AgentRegistry
    tools: ToolRegistry
    tool_limiter: trio.CapacityLimiter
    store: EventStore
    io_limiter: trio.CapacityLimiter
    #: Admission is decided by the slot line, which holds run-limiter tokens on behalf of
    #: runs. to_thread still needs *a* limiter and must not use Trio's default one: this
    #: unbounded one only counts the run threads that are alive.
    run_threads: trio.CapacityLimiter
    line: SlotLine
    runs: ActiveRuns
    ends: EndLedger
    metrics: Metrics
    #: Called from the run thread after each completed step (must not block).
    on_step: StepListener | None = None
    #: Where runs publish their live text fragments (``StepContext.delta``); None: nowhere.
    feed: EventFeed | None = None
    #: Wakes the sleeping threads of runs stopped together, a few chains at a time.
    bells: BellRinger = field(default_factory=BellRinger)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short blocking call (a store call) in a thread on the I/O limiter."""
        if kwargs:
            return await trio.to_thread.run_sync(
                lambda: fn(*args, **kwargs), limiter=self.io_limiter
            )
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)


@dataclass(frozen=True, slots=True)
class RunPlan:
    """What a run needs of its conversation's record: the agent and its step budget.

    A run keeps this for its whole life, not the record itself (the record with its
    current run, usage and webhook is several KiB, and a node may hold 10,000 runs).
    """

    agent_spec: dict[str, Any]
    max_iterations: int

    @classmethod
    def of(cls, conversation: ConversationRecord) -> RunPlan:
        return cls(conversation.agent, conversation.max_iterations)


async def run_admitted(handle: RunHandle, plan: RunPlan, shared: RunShared) -> None:
    """Wait for the conversation, then for a slot, then run the thread; always record.

    Never raises ``Exception``: a failure outside the agent is logged and recorded on the
    run (``error``, reason ``internal_error``), so one failing run never cancels its
    siblings. ``trio.Cancelled`` propagates once the end is recorded.
    """
    admitted = time.monotonic()
    seated = admitted
    failure: BaseException | None = None
    hosted = False
    try:
        with handle.cancel_scope:
            await _wait_for_turn(handle, shared)
            seated = time.monotonic()
            shared.metrics.run_seated(seated - admitted)
            ctx = run_context(handle, plan, shared)
            _log_start(handle, admitted)
            hosted = True
            failure = await _run_thread(handle, ctx, shared)
    except Exception as exc:
        failure = exc
    finally:
        with trio.CancelScope(shield=True):
            if not hosted:
                shared.line.release(handle)  # seated, cancelled before its thread started
                shared.metrics.forget_stop(handle.run_id)
            shared.runs.mark_ending(handle)  # not queued while its end is being recorded
            await _record_end_if_missing(handle, failure, shared)
            unregister(handle, shared)
            if hosted:
                shared.metrics.run_ended(handle.control.ended_as, time.monotonic() - seated)
            _log_end(handle, admitted)


def run_context(handle: RunHandle, plan: RunPlan, shared: RunShared) -> RunContext:
    """What the run thread gets: the store, the agent spec, the tools and their workspace
    (``handle.workspace``, set at admission)."""
    settings = shared.settings
    assert handle.workspace is not None, "admission sets the workspace before the run starts"
    tool_env = ToolEnvironment(
        workspace=settings.workspaces_path / handle.workspace,
        tool_limiter=shared.tool_limiter,
        command_timeout_seconds=settings.command_timeout_seconds,
        max_command_timeout_seconds=settings.max_command_timeout_seconds,
        max_output_bytes=settings.max_tool_output_bytes,
        command_env={
            name: os.environ[name]
            for name in settings.command_env_passthrough
            if name in os.environ
        },
        sandbox=settings.sandbox,
        sandbox_network=settings.sandbox_network,
    )
    return RunContext(
        store=shared.store,
        conversation_id=handle.conversation_id,
        run_id=handle.run_id,
        agent_spec=plan.agent_spec,
        registry=shared.registry,
        max_iterations=plan.max_iterations,
        control=handle.control,
        tools=shared.tools,
        tool_env=tool_env,
        on_step=shared.on_step,
        publish_delta=shared.feed.publish_delta if shared.feed is not None else None,
    )


def unregister(handle: RunHandle, shared: RunShared) -> None:
    """Forget the handle everywhere and wake whoever waits for the run to end."""
    shared.line.leave(handle.run_id)
    shared.runs.remove(handle)
    handle.done.set()


async def record_end(
    handle: RunHandle, trigger: Trigger, reason: str, shared: RunShared, error: str | None = None
) -> None:
    """Record the run's end from the Trio side (shielded: also during cancellation).

    A stop (``Trigger.STOP``) is written together with the stops of the runs that end at
    the same moment — a drain, a delete, an interrupt of several — in one transaction
    (see :mod:`app.end_ledger`); this returns once it is committed.

    Never raises ``Exception``: when the store refuses the write (disk full, I/O error),
    the end goes to the supervisor's :class:`~app.end_ledger.EndLedger`, which retries it
    until the store takes it — a run never stays ``running`` with no thread behind it.
    """
    with trio.CancelScope(shield=True):
        await shared.ends.record(handle.run_id, trigger, reason, error)


async def _record_end_if_missing(
    handle: RunHandle, failure: BaseException | None, shared: RunShared
) -> None:
    """:func:`record_end` unless the thread recorded the end. The caller shields it (no
    second cancel scope per run: at a drain of thousands, each costs)."""
    control, ends = handle.control, shared.ends
    if control.end_recorded:
        if failure is not None and not is_cancellation(failure):
            log.error("run %s failed after its end was recorded", handle.run_id, exc_info=failure)
        return
    if failure is None or is_cancellation(failure):
        reason = control.stop_reason or "shutdown"
        control.ended_as = f"paused/{reason}"
        await ends.record(handle.run_id, Trigger.STOP, reason)
        return
    log.error("run %s failed outside its agent", handle.run_id, exc_info=failure)
    error = f"{type(failure).__name__}: {failure}"
    control.ended_as = "error/internal_error"
    await ends.record(handle.run_id, Trigger.FAIL, "internal_error", error)


async def _wait_for_turn(handle: RunHandle, shared: RunShared) -> None:
    if handle.previous is not None:
        await handle.previous.done.wait()
        # Its place in the line first, so that the status event the activation commits is
        # seen with the run's queue position (the server-wide stream reports it).
        shared.line.admit(handle)
        await shared.io(shared.store.activate_run, handle.run_id, reason="enqueued_run")
    await shared.line.wait_until_seated(handle)


async def _run_thread(
    handle: RunHandle, ctx: RunContext, shared: RunShared
) -> BaseException | None:
    """Start the run's thread (hosted by a system task) and wait for it to return.

    Returns what the thread raised, if anything (``None`` when it returned normally, or
    when the run was stopped: a stopped run is recorded ``paused`` with the stop's reason).

    Cancellation:
        A stop (``handle.stop``) goes to the thread alone once it is hosted: this task
        waits on, undisturbed (a drain stops thousands of runs: one wake-up each, when the
        thread has returned). If this task is cancelled from outside, the stop is passed on
        to the thread and the wait continues, shielded, until the thread returns — or until
        the supervisor abandons the run (``handle.abandon()``), which is the only way this
        function returns while the thread still runs.
    """
    returned = trio.Event()
    raised: list[BaseException] = []
    handle.thread_hosted = True  # from now on, stops go to the thread
    trio.lowlevel.spawn_system_task(
        _host_thread, handle, ctx, shared, returned, raised, name=f"run-thread {handle.run_id}"
    )
    try:
        await returned.wait()
    except trio.Cancelled:
        handle.stop(handle.control.stop_reason or "shutdown")
        with trio.CancelScope(shield=True), handle.abandon_scope:
            await returned.wait()
        raise
    failure = raised[0] if raised else None
    if failure is not None and handle.control.stop_reason is not None:
        if not is_cancellation(failure):
            log.warning("run %s: its thread failed after the stop", handle.run_id, exc_info=failure)
        return None
    return failure


async def _host_thread(
    handle: RunHandle,
    ctx: RunContext,
    shared: RunShared,
    returned: trio.Event,
    raised: list[BaseException],
) -> None:
    """The run thread's host (a system task: it must never raise). It alone releases the
    run slot, and only once the thread has returned."""
    try:
        with handle.thread_scope:
            await trio.to_thread.run_sync(
                run_conversation, ctx, limiter=shared.run_threads, abandon_on_cancel=False
            )
    except BaseException as exc:  # reported to the run task, never out of a system task
        raised.append(exc)
    finally:
        shared.line.release(handle)
        shared.metrics.thread_returned(handle.run_id)
        returned.set()


def _log_start(handle: RunHandle, admitted: float) -> None:
    log_fields(
        log,
        "run started: conversation={conversation} run={run} waited_ms={waited_ms}",
        conversation=handle.conversation_id,
        run=handle.run_id,
        waited_ms=round((time.monotonic() - admitted) * 1000),
    )


def _log_end(handle: RunHandle, admitted: float) -> None:
    control = handle.control
    status, _, reason = (control.ended_as or "unknown/unknown").partition("/")
    log_fields(
        log,
        "run ended: conversation={conversation} run={run} as={status}/{reason}"
        " steps={steps} duration_ms={duration_ms}",
        conversation=handle.conversation_id,
        run=handle.run_id,
        status=status,
        reason=reason,
        steps=control.steps,
        duration_ms=round((time.monotonic() - admitted) * 1000),
    )
