"""A tool that fails tells the model what happened, never where the server keeps its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import trio
from pydantic import BaseModel

from app.tools.base import ToolEnvironment, ToolResult
from app.tools.calls import ToolCall, ToolRegistry, execute_one


class NoArguments(BaseModel):
    pass


class BrokenTool:
    """A third-party tool with a bug that puts the workspace's absolute path in its error."""

    name: ClassVar[str] = "broken"
    description: ClassVar[str] = "Fails."
    Arguments: ClassVar[type[BaseModel]] = NoArguments

    async def run(self, arguments: Any, env: ToolEnvironment) -> ToolResult:
        raise OSError(f"cannot open {env.workspace / 'notes' / 'a.txt'}")


async def test_a_failing_tool_reports_workspace_relative_paths(tmp_path: Path) -> None:
    """The error result of a tool that raised names ``notes/a.txt``, not the server path."""
    workspace = tmp_path / "data" / "workspaces" / "by-id" / "c1"
    workspace.mkdir(parents=True)
    env = ToolEnvironment(workspace=workspace, tool_limiter=trio.CapacityLimiter(1))
    call = ToolCall(call_id="1", tool="broken", arguments={})
    result = await execute_one(call, ToolRegistry([BrokenTool()]), env)
    assert result.is_error
    assert "notes/a.txt" in result.content
    assert str(tmp_path) not in result.content
