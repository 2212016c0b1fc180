"""One admitted run: wait for its turn, hold a run slot while its thread runs, record its end.

Ownership: admission (``RunSupervisor.admit_run``) registers the run's handle and starts
:func:`run_admitted` in the supervisor's nursery. From then on the task owns the handle: it
unregisters it when it ends — normally, by error or by cancellation — which sets
``handle.done`` for whoever waits (the next run of the conversation, ``drain``, ``wait_run``).

Cancellation:
    ``handle.cancel_scope`` covers the waiting and the thread. Cancelled while waiting, the
    run never starts a thread and the task records it ``paused`` itself (shielded). Cancelled
    while its thread runs, the thread stops at its next cancellation point and records its
    own end; the run slot is released only after the thread has returned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from app.agents.registry import AgentRegistry
from app.conversation import RunContext, run_conversation
from app.errors import IllegalTransition, NotFound
from app.handles import ActiveRuns, RunHandle
from app.lifecycle import Trigger
from app.records import ConversationRecord
from app.settings import Settings
from app.slot_line import SlotLine
from app.store.base import EventStore
from app.tools.base import ToolEnvironment
from app.tools.calls import ToolRegistry

T = TypeVar("T")
log = logging.getLogger("trellis.supervisor")


@dataclass(frozen=True, slots=True)
class RunShared:
    """What every run task shares; created and owned by the supervisor."""

    settings: Settings
    registry: AgentRegistry
    tools: ToolRegistry
    tool_limiter: trio.CapacityLimiter
    store: EventStore
    io_limiter: trio.CapacityLimiter
    run_limiter: trio.CapacityLimiter
    #: Admission is decided by ``run_limiter``, whose token the run task holds. to_thread
    #: still needs *a* limiter and must not use Trio's default one: this unbounded one only
    #: counts the run threads that are alive.
    run_threads: trio.CapacityLimiter
    line: SlotLine
    runs: ActiveRuns

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a short blocking call (a store call) in a thread on the I/O limiter."""
        if kwargs:
            return await trio.to_thread.run_sync(
                lambda: fn(*args, **kwargs), limiter=self.io_limiter
            )
        return await trio.to_thread.run_sync(fn, *args, limiter=self.io_limiter)


async def run_admitted(
    handle: RunHandle, conversation: ConversationRecord, shared: RunShared
) -> None:
    """Wait for the conversation, then for a slot, then run the thread; always record.

    Catches ``Exception`` (logged and recorded on the run) so that one failing run never
    cancels its siblings; ``trio.Cancelled`` from outside propagates after the final status
    is written.
    """
    ctx = run_context(handle, conversation, shared)
    try:
        with handle.cancel_scope:
            await _wait_for_turn(handle, shared)
            await _run_in_slot(handle, ctx, shared)
    except Exception:
        log.exception("run %s failed outside its agent", handle.run_id)
        await record_end(handle, Trigger.FAIL, "internal_error", shared)
    finally:
        if not handle.control.thread_started:
            reason = handle.control.stop_reason or "shutdown"
            await record_end(handle, Trigger.STOP, reason, shared)
        unregister(handle, shared)


def run_context(
    handle: RunHandle, conversation: ConversationRecord, shared: RunShared
) -> RunContext:
    """What the run thread gets: the store, the agent spec, the tools and their workspace."""
    settings = shared.settings
    tool_env = ToolEnvironment(
        workspace=settings.workspaces_path / conversation.workspace,
        tool_limiter=shared.tool_limiter,
        command_timeout_seconds=settings.command_timeout_seconds,
        max_command_timeout_seconds=settings.max_command_timeout_seconds,
        max_output_bytes=settings.max_tool_output_bytes,
        command_env={
            name: os.environ[name]
            for name in settings.command_env_passthrough
            if name in os.environ
        },
    )
    return RunContext(
        store=shared.store,
        conversation_id=handle.conversation_id,
        run_id=handle.run_id,
        agent_spec=conversation.agent,
        registry=shared.registry,
        max_iterations=conversation.max_iterations,
        control=handle.control,
        tools=shared.tools,
        tool_env=tool_env,
    )


def unregister(handle: RunHandle, shared: RunShared) -> None:
    """Forget the handle everywhere and wake whoever waits for the run to end."""
    shared.line.leave(handle.run_id)
    shared.runs.remove(handle)
    handle.done.set()


async def record_end(handle: RunHandle, trigger: Trigger, reason: str, shared: RunShared) -> None:
    """Record the run's end from the Trio side (shielded: also during cancellation).

    Never raises ``Exception``: a store failure here is logged, so that it cannot take the
    supervisor's nursery, and every sibling run, down with it.
    """
    with trio.CancelScope(shield=True):
        try:
            await shared.io(shared.store.transition_run, handle.run_id, trigger, reason=reason)
        except (IllegalTransition, NotFound):
            pass  # already ended (its thread recorded it), or deleted meanwhile
        except Exception:
            log.exception("could not record the end of run %s", handle.run_id)


async def _wait_for_turn(handle: RunHandle, shared: RunShared) -> None:
    if handle.previous is not None:
        await handle.previous.done.wait()
        await shared.io(shared.store.activate_run, handle.run_id, reason="enqueued_run")
        shared.line.join(handle.run_id)
    await shared.line.wait_for_slot(handle.run_id, borrower=handle)


async def _run_in_slot(handle: RunHandle, ctx: RunContext, shared: RunShared) -> None:
    shared.runs.set_holds_slot(handle, True)
    try:
        await trio.to_thread.run_sync(
            run_conversation, ctx, limiter=shared.run_threads, abandon_on_cancel=False
        )
    finally:
        shared.runs.set_holds_slot(handle, False)
        shared.run_limiter.release_on_behalf_of(handle)
