"""The tool runner: it, not the tool, holds the call's token of the tool limiter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing
from pydantic import BaseModel

from app.tools.base import ToolEnvironment, ToolResult
from app.tools.calls import ToolCall, ToolRegistry, default_tools, execute_calls

pytestmark = pytest.mark.timeout(30)


class NoArguments(BaseModel):
    pass


class PoliteTool:
    """A third-party tool that never touches ``env.tool_limiter``: it waits to be released."""

    name: ClassVar[str] = "polite"
    description: ClassVar[str] = "Waits until the test releases it."
    Arguments: ClassVar[type[BaseModel]] = NoArguments

    def __init__(self) -> None:
        self.running = 0
        self.release = trio.Event()

    async def run(self, arguments: Any, env: ToolEnvironment) -> ToolResult:
        self.running += 1
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return ToolResult("released")


def one_token_env(tmp_path: Path) -> ToolEnvironment:
    return ToolEnvironment(workspace=tmp_path, tool_limiter=trio.CapacityLimiter(1))


async def test_third_party_tool_cannot_bypass_tool_threads(tmp_path: Path) -> None:
    """With tool_threads = 1, two calls of a tool that ignores the limiter run one at a
    time: the runner holds the token around each call."""
    tool, env = PoliteTool(), one_token_env(tmp_path)
    calls = [ToolCall(f"c{n}", "polite", {}) for n in range(2)]
    results: list[ToolResult] = []

    async def run_batch() -> None:
        results.extend(await execute_calls(calls, ToolRegistry([tool]), env, max_parallel=2))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_batch)
            await trio.testing.wait_all_tasks_blocked()
            stats = env.tool_limiter.statistics()
            assert (tool.running, stats.borrowed_tokens, stats.tasks_waiting) == (1, 1, 1)
            tool.release.set()
    assert [result.content for result in results] == ["released", "released"]
    assert env.tool_limiter.statistics().borrowed_tokens == 0


async def test_built_in_tools_finish_on_a_single_tool_token(tmp_path: Path) -> None:
    """At tool_threads = 1, file_editor and terminal calls of one batch all finish: no tool
    asks the limiter for a second token while the runner holds the first."""
    env = one_token_env(tmp_path)
    calls = [
        ToolCall("w", "file_editor", {"command": "create", "path": "a.txt", "file_text": "hi"}),
        ToolCall("r", "file_editor", {"command": "view", "path": "."}),
        ToolCall("t", "terminal", {"command": "echo ran"}),
    ]
    with trio.fail_after(10):
        results = await execute_calls(calls, default_tools(), env, max_parallel=3)
    assert [result.is_error for result in results] == [False, False, False]
    assert results[2].content == "ran\n[exit code 0]"
    assert env.tool_limiter.statistics().borrowed_tokens == 0
