"""The tool protocol: what a tool is, what it gets, what it returns.

A tool is described to the model by its name, a description and the JSON schema of its
``Arguments`` model (pydantic), and executed by :meth:`Tool.run` — an ``async`` function
that runs on the Trio side, in the run's task, so it is cancelled together with the run.

Ownership and limits: every call holds one token of the server-wide tool limiter
(``env.tool_limiter``, ``tool_threads`` tokens) while its tool runs, never a run slot — and
the *runner* takes it (:func:`app.tools.calls.execute_one`), so a tool cannot forget to, and
must not take it again: with one token left, a second request would wait forever. Blocking
work (file I/O) goes to :func:`run_in_worker_thread`; a subprocess needs no thread at all
(Trio waits for it).

Cancellation:
    When the run is interrupted or the server shuts down, ``run`` is cancelled: a tool must
    leave nothing behind (the terminal tool kills its whole process group).

Errors:
    A tool reports failure *to the model* by returning ``ToolResult(is_error=True, ...)``
    with a message that says what was wrong; it raises only for bugs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import trio
from pydantic import BaseModel

from app.settings import SandboxSetting

T = TypeVar("T")

#: The worker threads of tool calls. Unbounded on purpose: the call already holds its
#: ``tool_limiter`` token, which is what bounds tool threads; asking ``tool_limiter`` again
#: would count the call twice (deadlock at ``tool_threads = 1``), and Trio's default
#: limiter is shared with everything else. This one only keeps the threads apart and
#: counts them (``statistics().borrowed_tokens``).
TOOL_WORKER_THREADS = trio.CapacityLimiter(math.inf)


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
    #: Where commands run (see :mod:`app.tools.sandbox`): the ``sandbox`` setting, resolved
    #: by the terminal tool when it runs a command; and whether a bwrap sandbox has network.
    sandbox: SandboxSetting = "auto"
    sandbox_network: bool = True


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


async def run_in_worker_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn(*args)`` for a tool, in a worker thread on
    :data:`TOOL_WORKER_THREADS`, within the call's ``tool_limiter`` token.

    Cancellation:
        Not abandoned: a cancelled call waits for ``fn`` to return (keep it short, or have
        it call ``trio.from_thread.check_cancelled()``), so no thread outlives its run.
    """
    return await trio.to_thread.run_sync(fn, *args, limiter=TOOL_WORKER_THREADS)
