"""Executing the tool calls of one step: validated, in parallel, results in call order.

A model's output is not trusted: an unknown tool name, arguments that are not JSON or do
not fit the tool's schema become an *error observation* telling the model what was wrong —
the run goes on. Only cancellation (and bugs) propagate.

Rule: the runner (:func:`execute_one`), not the tool, takes the call's token of
``env.tool_limiter``, for exactly as long as ``tool.run`` runs. So no tool — a third-party
one included — can run outside ``tool_threads``, and a tool must never take that limiter
again (at ``tool_threads = 1`` a second token would never come): blocking work goes to
:func:`~app.tools.base.run_in_worker_thread`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from pydantic import ValidationError

from app.redact import redact
from app.tools.base import Tool, ToolEnvironment, ToolResult

log = logging.getLogger("trellis.tools")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call as the agent asked for it; ``arguments`` may still be raw JSON text."""

    call_id: str
    tool: str
    arguments: dict[str, Any] | str


class ToolRegistry:
    """Tools by name; what a run may call and what the model is told about."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def __repr__(self) -> str:
        return f"<ToolRegistry {sorted(self._tools)}>"

    @property
    def names(self) -> list[str]:
        return sorted(self._tools)

    def register(self, tool: Tool) -> None:
        """Errors: ``ValueError`` if the name is taken."""
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def schema(self, name: str) -> dict[str, Any]:
        """The OpenAI-style function description of one tool."""
        tool = self._tools[name]
        return {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.Arguments.model_json_schema(),
            },
        }


def default_tools() -> ToolRegistry:
    """The built-in tools: ``terminal``, ``file_editor`` and ``finish``."""
    from app.tools.file_editor import FileEditorTool
    from app.tools.finish import FinishTool
    from app.tools.terminal import TerminalTool

    return ToolRegistry([TerminalTool(), FileEditorTool(), FinishTool()])


async def execute_calls(
    calls: Sequence[ToolCall],
    registry: ToolRegistry,
    env: ToolEnvironment,
    max_parallel: int,
    allowed: Collection[str] | None = None,
    results: list[ToolResult | None] | None = None,
) -> list[ToolResult]:
    """Run ``calls`` concurrently, at most ``max_parallel`` at once; results in call order.

    Each call also holds a token of ``env.tool_limiter`` (server-wide) while its tool runs.
    ``results``, if given (one ``None`` per call), receives each result as soon as its call
    returns, so a caller that was cancelled can still tell which calls completed.

    Cancellation:
        Cancelling the caller cancels every call; calls not yet started never start. Calls
        that had returned keep their entry in ``results``.
    """
    if results is None:
        results = [None] * len(calls)
    per_step = trio.CapacityLimiter(max_parallel)

    async def run_one(index: int, call: ToolCall, results: list[ToolResult | None]) -> None:
        async with per_step:
            results[index] = await execute_one(call, registry, env, allowed)

    async with trio.open_nursery() as nursery:
        for index, call in enumerate(calls):
            nursery.start_soon(run_one, index, call, results)
    return [result for result in results if result is not None]


async def execute_one(
    call: ToolCall,
    registry: ToolRegistry,
    env: ToolEnvironment,
    allowed: Collection[str] | None = None,
) -> ToolResult:
    """One call, holding a token of ``env.tool_limiter`` while the tool runs; whatever the
    model got wrong comes back as an error result (at once: no token needed for that)."""
    names = [name for name in registry.names if allowed is None or name in allowed]
    tool = registry.get(call.tool) if call.tool in names else None
    if tool is None:
        return ToolResult(
            f"unknown tool {call.tool!r}; the tools are: {', '.join(names)}", is_error=True
        )
    try:
        raw = json.loads(call.arguments) if isinstance(call.arguments, str) else call.arguments
        arguments = tool.Arguments.model_validate(raw)
    except json.JSONDecodeError as exc:
        return ToolResult(f"the arguments of {call.tool} are not valid JSON: {exc}", is_error=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'arguments'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        return ToolResult(f"invalid arguments for {call.tool}: {problems}", is_error=True)
    try:
        async with env.tool_limiter:
            return await tool.run(arguments, env)
    except Exception as exc:  # a bug in the tool: tell the model, keep the run alive
        log.exception("tool %s failed", call.tool)
        message = redact(f"the tool {call.tool} failed: {exc}", workspace=env.workspace)
        return ToolResult(message, is_error=True)  # no server paths, no secrets
