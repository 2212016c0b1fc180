"""The ``terminal`` tool: one shell command, run in the conversation's workspace.

The command runs as ``/bin/bash -c COMMAND`` with ``env.command_env`` as its whole
environment (bash supplies a default ``PATH`` if that lacks one), confined as the ``sandbox``
setting says (:mod:`app.tools.sandbox`: under bubblewrap, or not at all), in a session of its
own. stdin is ``/dev/null``; stdout and stderr share one pipe, read as the output arrives
into a buffer that keeps only the first and last halves of ``env.max_output_bytes`` (a long
build log costs the same memory as a short one, and the model still sees how it began and
ended).

Ownership: the run's task owns the command from start to finish; Trio waits for the process
(a pidfd) and the pipe; ``/proc`` scans happen in worker threads (the call's
``tool_limiter`` token is held by the runner). The command ends when its output does
(end-of-file, as for ``$(...)`` in a shell), so a background job holding the pipe lasts until
the timeout — except under bwrap, where the sandbox ends with the shell. When the call
returns, for any reason, every process the command started has been killed: its process
group, everything carrying its id (``setsid``, ``nohup``, double forks), and under bwrap its
whole PID namespace (:class:`~app.tools.sandbox.CommandProcesses` says what tracking without
bwrap cannot catch).

Where the command is forked: in the one long-lived thread of :mod:`app.tools.spawner` —
not in a Trio worker thread (bwrap's ``--die-with-parent`` fires when the forking *thread*
exits, and idle worker threads exit after 10 s), and not on the Trio thread (a fork blocks).
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import ClassVar

import trio
from pydantic import BaseModel, ConfigDict, Field

from app.tools import sandbox
from app.tools.base import ToolEnvironment, ToolResult
from app.tools.spawner import SPAWNER

#: After SIGTERM, how long the command's processes get to exit before SIGKILL. Flushing
#: files and removing temporary ones takes milliseconds; a second is plenty and still bounds
#: how long an interrupted run takes to stop. (Trio's ``run_process`` gives one process 5 s.)
KILL_GRACE_SECONDS = 1.0
#: After SIGKILL, how long we wait for them to be dead: only a process stuck in the kernel
#: (``D`` state, say on a hung network mount) takes longer, and waiting won't help.
_KILLED_WAIT_SECONDS = 5.0
#: After a timeout, how long we read what the dead command wrote. The pipe is at end-of-file
#: once every process is dead, unless one we could not find still holds it.
_DRAIN_SECONDS = 0.5
_READ_CHUNK_BYTES = 65_536


class TerminalArguments(BaseModel):
    """What the model passes to the ``terminal`` tool."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(
        min_length=1,
        description="The shell command to run with /bin/bash -c in the workspace directory. "
        "stdin is empty, so interactive programs get end-of-file.",
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        description="Seconds before the command and everything it started are killed. "
        "Omit for the server's default; values above the server's maximum are lowered to it.",
    )


class _HeadTailBuffer:
    """The first and last ``max_bytes // 2`` bytes of a stream, and how much was in between."""

    def __init__(self, max_bytes: int) -> None:
        self._head_limit = max_bytes // 2
        self._tail_limit = max_bytes - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.total_bytes = 0

    def feed(self, chunk: bytes | bytearray) -> None:
        self.total_bytes += len(chunk)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        self._tail += chunk
        if len(self._tail) > self._tail_limit:
            del self._tail[: len(self._tail) - self._tail_limit]

    @property
    def omitted_bytes(self) -> int:
        return self.total_bytes - len(self._head) - len(self._tail)

    def text(self) -> str:
        if not self.omitted_bytes:
            return (self._head + self._tail).decode(errors="replace")
        head = self._head.decode(errors="replace")
        tail = self._tail.decode(errors="replace")
        return f"{head}\n[... {self.omitted_bytes} bytes omitted ...]\n{tail}"


async def run_command(arguments: TerminalArguments, env: ToolEnvironment) -> ToolResult:
    """Run ``arguments.command`` in ``env.workspace`` (the runner holds the tool token).

    The result's content is the output, then a line with the exit code. ``is_error`` is true
    when the command failed (exit code not 0) or timed out, so the model sees the failure
    flagged; either is still a normal result. ``data`` holds ``exit_code`` (``None`` after a
    timeout), ``timed_out``, ``truncated`` and ``duration_seconds``.

    Cancellation:
        If the surrounding scope is cancelled (the run was interrupted, the server is
        stopping), every process of the command gets SIGTERM, then SIGKILL after
        ``KILL_GRACE_SECONDS``; only once our child is reaped and none of them is alive
        (zombies count as dead) does ``trio.Cancelled`` propagate, unwrapped. The wait is
        shielded and bounded: at most about ``KILL_GRACE_SECONDS`` + 5 s. A timeout kills
        them the same way.

    Errors:
        A command that cannot start (say, the workspace is missing) is reported to the model
        as ``is_error=True``, like a failing command; nothing is raised.
        :class:`~app.tools.sandbox.SandboxUnavailable` (a bug of the set-up, not the
        model's) when ``sandbox = "bwrap"`` and bubblewrap does not work here.
    """
    requested = env.command_timeout_seconds if arguments.timeout is None else arguments.timeout
    timeout = min(requested, env.max_command_timeout_seconds)
    output = _HeadTailBuffer(env.max_output_bytes)
    exit_code: int | None = None
    started = trio.current_time()
    mode = await sandbox.active(env.sandbox, network=env.sandbox_network)
    launch = sandbox.prepare(
        arguments.command, env.workspace, env.command_env, sandbox=mode, network=env.sandbox_network
    )
    try:
        process, output_fd = await SPAWNER.call(lambda: _spawn(launch, env))
    except OSError as exc:  # no absolute server path in what the model sees
        message = f"Could not start /bin/bash in the workspace: {exc.strerror or exc}"
        data = dict(exit_code=None, timed_out=False, truncated=False, duration_seconds=0.0)
        return ToolResult(message, is_error=True, data=data)
    finally:
        launch.close()
    processes = sandbox.CommandProcesses(process, launch.marker, confined=mode == "bwrap")
    stdout = trio.lowlevel.FdStream(output_fd)
    try:
        with trio.move_on_after(timeout) as deadline:
            await _read_until_eof(stdout, output)
            exit_code = await _wait(process)
        if deadline.cancelled_caught:
            await processes.stop(KILL_GRACE_SECONDS, _KILLED_WAIT_SECONDS)
            with trio.move_on_after(_DRAIN_SECONDS):
                await _read_until_eof(stdout, output)
    finally:
        with trio.CancelScope(shield=True):
            # background jobs left behind, or a cancel
            await processes.stop(KILL_GRACE_SECONDS, _KILLED_WAIT_SECONDS)
            await stdout.aclose()
    duration = trio.current_time() - started
    return _result(output, exit_code, timeout, requested > timeout, duration)


def _spawn(launch: sandbox.Launch, env: ToolEnvironment) -> tuple[subprocess.Popen[bytes], int]:
    """Start the command (in the spawner thread); return it and its output pipe's read end.
    See the module docstring for why that thread."""
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            launch.argv,
            cwd=env.workspace,
            env=launch.env,  # only what the server passes through: no secrets
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            pass_fds=launch.pass_fds,
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return process, read_fd


async def _wait(process: subprocess.Popen[bytes]) -> int:
    """The exit code, once our child has exited (its pidfd turns readable). Not reaped:
    :meth:`~app.tools.sandbox.CommandProcesses.stop` does that last."""
    pidfd = os.pidfd_open(process.pid)  # works on a zombie: we are the only reaper
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    code = sandbox.exit_code(process)  # readable: it has exited, this does not block
    assert code is not None
    return code


async def _read_until_eof(stream: trio.abc.ReceiveStream, output: _HeadTailBuffer) -> None:
    while chunk := await stream.receive_some(_READ_CHUNK_BYTES):
        output.feed(chunk)


def _result(
    output: _HeadTailBuffer, exit_code: int | None, timeout: float, clamped: bool, duration: float
) -> ToolResult:
    lines = []
    if clamped:
        lines.append(f"[timeout lowered to the maximum of {timeout:g} s]")
    lines.append(output.text().rstrip("\n") or "(no output)")
    if exit_code is None:
        lines.append(f"[timed out after {timeout:g} s: the command and its processes were killed]")
    elif exit_code < 0:  # the shell itself died of a signal (not ours: we kill only on timeout)
        lines.append(f"[exit code {exit_code}: killed by {signal.strsignal(-exit_code)}]")
    else:
        lines.append(f"[exit code {exit_code}]")
    data = {
        "exit_code": exit_code,
        "timed_out": exit_code is None,
        "truncated": output.omitted_bytes > 0,
        "duration_seconds": round(duration, 3),
    }
    # is_error: the command failed, or timed out (exit_code None).
    return ToolResult("\n".join(lines), is_error=exit_code != 0, data=data)


class TerminalTool:
    """The ``terminal`` tool; see :func:`run_command`."""

    name: ClassVar[str] = "terminal"
    description: ClassVar[str] = (
        "Run one shell command with /bin/bash in the conversation's workspace directory and "
        "return its combined stdout and stderr, then its exit code. Long output keeps its "
        "beginning and end; the middle is omitted. stdin is empty. When the command ends or "
        "times out, every process it started is killed, background jobs included; a "
        "background job must redirect its output (cmd > log 2>&1 &) or the command may wait "
        "for it until the timeout."
    )
    Arguments: ClassVar[type[BaseModel]] = TerminalArguments

    async def run(self, arguments: TerminalArguments, env: ToolEnvironment) -> ToolResult:
        return await run_command(arguments, env)
