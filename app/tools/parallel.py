"""Parallel tool calls on the tool limiter — never on the run limiter.

Why a separate limiter: a run holds a run slot for as long as its thread lives. If its tool
calls also needed run slots, then with every slot held by a run waiting for its tools, no
tool could ever start: a deadlock (seen with 2/2 slots borrowed and 6 tools waiting,
forever). Tool threads draw from ``tool_threads`` instead, so a run never waits on a slot
for work it spawned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def run_in_tool_threads(
    calls: Sequence[Callable[[], T]], limiter: trio.CapacityLimiter
) -> list[T]:
    """Run each blocking call in its own worker thread on ``limiter``; results in call order.

    Called from a run thread through ``trio.from_thread.run``, so it runs in the run's host
    task and is cancelled together with the run.

    Cancellation:
        Waiting calls never start. Running calls are waited for (``abandon_on_cancel=False``):
        a blocking tool must itself stop promptly when cancelled (e.g. kill its subprocess,
        or call ``trio.from_thread.check_cancelled()``). No tool thread outlives the run.

    Errors:
        The first exception (in time) raised by a call cancels the others and is re-raised
        as it is, not wrapped in an exception group.
    """
    results: list[Any] = [None] * len(calls)
    failures: list[Exception] = []

    async def run_one(index: int, call: Callable[[], T], cancel_scope: trio.CancelScope) -> None:
        try:
            results[index] = await trio.to_thread.run_sync(call, limiter=limiter)
        except Exception as exc:
            failures.append(exc)
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(run_one, index, call, nursery.cancel_scope)
    if failures:
        raise failures[0]
    return results
