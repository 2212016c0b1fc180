"""The ``terminal`` tool: one shell command, run in the conversation's workspace.

The command runs as ``/bin/bash -c COMMAND`` with ``env.command_env`` as its whole
environment (bash supplies a default ``PATH`` if that lacks one), in a session of its own,
so the shell and everything it starts share one process group we can signal. stdin is
``/dev/null``; stdout and stderr share one pipe, read as the output arrives into a buffer
that keeps only the first and last halves of ``env.max_output_bytes`` (a long build log
costs the same memory as a short one, and the model still sees how it began and ended).

Ownership: the run's task owns the command from start to finish; Trio waits for the process
and the pipe (it borrows a worker thread only to spawn the shell, and to scan ``/proc`` while
killing; the call's ``tool_limiter`` token is held by the runner). The command ends when its
output does (end-of-file, as for ``$(...)`` in a shell), so a background job holding the pipe
lasts until the timeout; when the call returns, for any reason, the whole process group has
been killed, background jobs included. Processes that leave the group on purpose
(``setsid``, ``set -m`` jobs) are out of reach: confining them is a container's job.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

import trio
from pydantic import BaseModel, ConfigDict, Field

from app.tools.base import ToolEnvironment, ToolResult

#: After SIGTERM, how long the process group gets to exit before SIGKILL. Flushing files
#: and removing temporary ones takes milliseconds; a second is plenty and still bounds how
#: long an interrupted run takes to stop. (Trio's ``run_process`` gives one process 5 s.)
KILL_GRACE_SECONDS = 1.0
#: After SIGKILL, how long we wait for the group to be dead: only a process stuck in the
#: kernel (``D`` state, say on a hung network mount) takes longer, and waiting won't help.
_KILLED_WAIT_SECONDS = 5.0
#: Poll interval while waiting for the group to die. No kernel event says "this process
#: group is empty" (a pidfd only covers our own child, the shell), so we poll.
_POLL_SECONDS = 0.01
#: After a timeout, how long we read what the dead group wrote. The pipe is at end-of-file
#: once the group is dead, unless a process that left the group still holds it.
_DRAIN_SECONDS = 0.5
_READ_CHUNK_BYTES = 65_536
#: Threads scanning ``/proc`` for a dying group's members; never Trio's default limiter,
#: never the tool limiter (the call already holds its token). A full scan reads every
#: process's stat file (a few ms on a busy host: too long for the Trio thread); four
#: threads serve many groups dying at once — a mass interrupt — without a thread each.
_PROC_SCAN_THREADS = trio.CapacityLimiter(4)


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
        stopping), the whole process group gets SIGTERM, then SIGKILL after
        ``KILL_GRACE_SECONDS``; only once the shell is reaped and no process of the group is
        alive (zombies count as dead) does ``trio.Cancelled`` propagate, unwrapped. The
        wait is shielded and bounded: at most about ``KILL_GRACE_SECONDS`` + 5 s. A timeout
        kills the group the same way.

    Errors:
        A shell that cannot start (say, the workspace is missing) is reported to the model
        as ``is_error=True``, like a failing command; nothing is raised.
    """
    requested = env.command_timeout_seconds if arguments.timeout is None else arguments.timeout
    timeout = min(requested, env.max_command_timeout_seconds)
    output = _HeadTailBuffer(env.max_output_bytes)
    exit_code: int | None = None
    started = trio.current_time()
    try:
        process = await trio.lowlevel.open_process(
            ["/bin/bash", "-c", arguments.command],
            cwd=env.workspace,
            env=env.command_env,  # only what the server passes through: no secrets
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        message = f"Could not start /bin/bash in the workspace {env.workspace}: {exc}"
        data = dict(exit_code=None, timed_out=False, truncated=False, duration_seconds=0.0)
        return ToolResult(message, is_error=True, data=data)
    stdout = process.stdout
    assert stdout is not None  # stdout=PIPE
    try:
        with trio.move_on_after(timeout) as deadline:
            await _read_until_eof(stdout, output)
            exit_code = await process.wait()
        if deadline.cancelled_caught:
            await _kill_group(process)
            with trio.move_on_after(_DRAIN_SECONDS):
                await _read_until_eof(stdout, output)
    finally:
        with trio.CancelScope(shield=True):
            await _kill_group(process)  # background jobs left behind, or a cancel
            await stdout.aclose()
    duration = trio.current_time() - started
    return _result(output, exit_code, timeout, requested > timeout, duration)


async def _read_until_eof(stream: trio.abc.ReceiveStream, output: _HeadTailBuffer) -> None:
    while chunk := await stream.receive_some(_READ_CHUNK_BYTES):
        output.feed(chunk)


async def _kill_group(process: trio.Process) -> None:
    """SIGTERM the shell's process group, SIGKILL it after a grace, wait until it is dead.

    With ``start_new_session=True`` the shell leads its own group: its pid is the group id,
    and it stays reserved while any member, even a zombie, is left.
    """
    pgid = process.pid
    # SIGKILL follows even when every member we saw died of SIGTERM: one of them may have
    # forked a process we did not see. A group with no process left at all ends the loop.
    for sig, wait_seconds in (
        (signal.SIGTERM, KILL_GRACE_SECONDS),
        (signal.SIGKILL, _KILLED_WAIT_SECONDS),
    ):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        with trio.move_on_after(wait_seconds):
            await _wait_group_dead(process, pgid)
    process.poll()  # reap the shell if it is not reaped yet


async def _wait_group_dead(process: trio.Process, pgid: int) -> None:
    """Return once the shell is reaped and no process of group ``pgid`` is alive.

    Linux: members are found in ``/proc``. Elsewhere only the shell is waited for.
    """
    # One full scan of /proc (a few ms); later polls only re-read the members it found.
    # Both read files: in a worker thread, so the Trio thread never blocks on /proc.
    members = await trio.to_thread.run_sync(_live_members, pgid, None, limiter=_PROC_SCAN_THREADS)
    while True:
        exited = process.poll() is not None  # the shell is our child: reaping it is our job
        members = await trio.to_thread.run_sync(
            _live_members, pgid, members, limiter=_PROC_SCAN_THREADS
        )
        if exited and not members:
            return
        await trio.sleep(_POLL_SECONDS)


def _live_members(pgid: int, pids: list[int] | None) -> list[int]:
    """The pids among ``pids`` (all, if None) in group ``pgid`` not dead (zombies are dead).

    ``os.killpg(pgid, 0)`` cannot tell: it succeeds while unreaped zombies are in the
    group, and orphans are reaped by init only when init gets to it (some never do).
    """
    if pids is None:
        names = os.listdir("/proc") if os.path.isdir("/proc") else []  # no procfs: not Linux
        pids = [int(name) for name in names if name.isdigit()]
    live = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue  # gone
        # Fields after the command name, which is in parentheses and may contain spaces:
        # state, ppid, pgrp, ...
        state, _, pgrp = stat[stat.rfind(b")") + 2 :].split(maxsplit=3)[:3]
        if int(pgrp) == pgid and state != b"Z":
            live.append(pid)
    return live


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
        "background job must redirect its output (cmd > log 2>&1 &) or the command waits "
        "for it until the timeout."
    )
    Arguments: ClassVar[type[BaseModel]] = TerminalArguments

    async def run(self, arguments: TerminalArguments, env: ToolEnvironment) -> ToolResult:
        return await run_command(arguments, env)
