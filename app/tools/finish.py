"""The ``finish`` tool: the agent declares the task done, with a final message."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from app.tools.base import ToolEnvironment, ToolResult


class FinishArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(description="The final answer or summary for the user.")


class FinishTool:
    """Ends the run ``finished``; the agent turns ``data["finish"]`` into its last message."""

    name: ClassVar[str] = "finish"
    description: ClassVar[str] = (
        "Call this when the task is complete, with a final message for the user."
    )
    Arguments: ClassVar[type[BaseModel]] = FinishArguments

    async def run(self, arguments: FinishArguments, env: ToolEnvironment) -> ToolResult:
        return ToolResult("finished", data={"finish": True, "message": arguments.message})
