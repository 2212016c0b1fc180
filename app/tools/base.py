"""The tool protocol: what a tool is, what it gets, what it returns.

A tool is described to the model by its name, a description and the JSON schema of its
``Arguments`` model (pydantic), and executed by :meth:`Tool.run` — an ``async`` function
that runs on the Trio side, in the run's task, so it is cancelled together with the run.

Ownership and limits: a tool holds one token of the server-wide tool limiter while it runs
(``env.tool_limiter``), never a run slot. Blocking work (file I/O) goes to a worker thread
*on that limiter*; a subprocess needs no thread at all (Trio waits for it).

Cancellation:
    When the run is interrupted or the server shuts down, ``run`` is cancelled: a tool must
    leave nothing behind (the terminal tool kills its whole process group).

Errors:
    A tool reports failure *to the model* by returning ``ToolResult(is_error=True, ...)``
    with a message that says what was wrong; it raises only for bugs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import trio
from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class ToolEnvironment:
    """What a tool may use: the conversation's workspace and the server's tool limits."""

    workspace: Path
    tool_limiter: trio.CapacityLimiter
    #: Terminal commands: default and largest allowed timeout; output kept per command.
    command_timeout_seconds: float = 120.0
    max_command_timeout_seconds: float = 600.0
    max_output_bytes: int = 32_768
    #: The environment commands run with: only what the server lets through, so that
    #: secrets of the server's own environment (the model API key) never reach a command,
    #: its output, or the events that record it.
    command_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What the model sees (``content``) and what the event records (``data``)."""

    content: str
    is_error: bool = False
    data: dict[str, Any] = field(default_factory=dict)


class Tool(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]
    Arguments: ClassVar[type[BaseModel]]

    async def run(self, arguments: Any, env: ToolEnvironment) -> ToolResult: ...
