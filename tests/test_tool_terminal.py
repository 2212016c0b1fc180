"""The terminal tool, with real subprocesses in a temporary workspace."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trio
import trio.testing

from app.tools import sandbox
from app.tools.base import ToolEnvironment
from app.tools.calls import ToolCall, default_tools, execute_one
from app.tools.terminal import KILL_GRACE_SECONDS, TerminalArguments, TerminalTool, run_command

# Records the shell ($$), a background grandchild ($!) and a foreground child ($BASHPID of
# the subshell, which then becomes `sleep`), one per line, then blocks for 300 s.
RECORD_PIDS_AND_BLOCK = (
    "echo $$ > pids.tmp; sleep 300 & echo $! >> pids.tmp; "
    "(echo $BASHPID >> pids.tmp; mv pids.tmp pids; exec sleep 300)"
)


def make_env(tmp_path: Path, **limits: Any) -> ToolEnvironment:
    """Unconfined (``sandbox="none"``): these tests follow the command's pids from outside,
    which a PID namespace would renumber; tests/security/test_sandbox_*.py cover bwrap."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    limits.setdefault("sandbox", "none")
    return ToolEnvironment(workspace=workspace, tool_limiter=trio.CapacityLimiter(2), **limits)


def args(command: str, timeout: float | None = None) -> TerminalArguments:
    return TerminalArguments(command=command, timeout=timeout)


def process_state(pid: int) -> tuple[str, int] | None:
    """``(state, pgrp)`` from ``/proc/<pid>/stat``, or ``None`` once the process is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    state, _, pgrp = stat[stat.rfind(")") + 2 :].split()[:3]
    return state, int(pgrp)


def is_dead(pid: int) -> bool:
    """Gone, or a zombie: an orphan is reaped by init, not by us, and maybe not at once."""
    state = process_state(pid)
    return state is None or state[0] == "Z"


def read_pids(path: Path) -> list[int]:
    """The pids in the file, or none while the command has not renamed it into place."""
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def wait_for_pids(path: Path) -> list[int]:
    """Poll until the command has written its complete pid file."""
    while not (pids := read_pids(path)):
        await trio.sleep(0.01)
    return pids


async def test_terminal_echo_output_and_exit_code_zero(tmp_path: Path) -> None:
    """A successful command returns its output, a final exit-code line and is_error False."""
    with trio.fail_after(10):
        result = await TerminalTool().run(args("echo hello"), make_env(tmp_path))
    assert result.content == "hello\n[exit code 0]"
    assert not result.is_error
    assert result.data["exit_code"] == 0
    assert (result.data["timed_out"], result.data["truncated"]) == (False, False)
    assert 0 <= result.data["duration_seconds"] < 10


async def test_terminal_nonzero_exit_code_is_error(tmp_path: Path) -> None:
    """A failing command is a normal result flagged is_error, with its exit code."""
    with trio.fail_after(10):
        result = await run_command(args("echo no; exit 3"), make_env(tmp_path))
    assert result.content == "no\n[exit code 3]"
    assert result.is_error
    assert (result.data["exit_code"], result.data["timed_out"]) == (3, False)


async def test_terminal_runs_in_workspace(tmp_path: Path) -> None:
    """The command's working directory is the workspace, so files it creates land there."""
    env = make_env(tmp_path)
    with trio.fail_after(10):
        result = await run_command(args("pwd; echo data > made.txt"), env)
    assert result.content == f"{env.workspace}\n[exit code 0]"
    assert (env.workspace / "made.txt").read_text() == "data\n"


async def test_terminal_environment_is_command_env_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands see env.command_env and nothing else of the server's environment."""
    monkeypatch.setenv("TRELLIS_TEST_SECRET", "s3cret")
    env = make_env(tmp_path, command_env={"GREETING": "hi"})
    with trio.fail_after(10):
        result = await run_command(args('echo "$GREETING ${TRELLIS_TEST_SECRET:-unset}"'), env)
    assert result.content == "hi unset\n[exit code 0]"


async def test_terminal_merges_stderr_and_reads_empty_stdin(tmp_path: Path) -> None:
    """stderr is interleaved with stdout in one stream, and stdin is empty (/dev/null)."""
    with trio.fail_after(10):
        result = await run_command(
            args("echo out; echo err >&2; cat; echo end"), make_env(tmp_path)
        )
    assert result.content == "out\nerr\nend\n[exit code 0]"


async def test_terminal_output_cap_keeps_head_and_tail(tmp_path: Path) -> None:
    """Output over max_output_bytes keeps its first and last halves and says what was cut."""
    full = "".join(f"{i}\n" for i in range(1, 100_001))
    with trio.fail_after(10):
        result = await run_command(args("seq 1 100000"), make_env(tmp_path, max_output_bytes=1000))
    omitted = len(full) - 1000
    expected = f"{full[:500]}\n[... {omitted} bytes omitted ...]\n{full[-500:]}[exit code 0]"
    assert result.content == expected
    assert result.data["truncated"]
    assert not result.is_error


async def test_terminal_timeout_kills_command(tmp_path: Path) -> None:
    """A command past its timeout is killed promptly and reported with its output so far."""
    with trio.fail_after(10):
        result = await run_command(args("echo started; sleep 300", timeout=0.5), make_env(tmp_path))
    expected = "started\n[timed out after 0.5 s: the command and its processes were killed]"
    assert result.content == expected
    assert result.is_error
    assert (result.data["exit_code"], result.data["timed_out"]) == (None, True)
    assert 0.5 <= result.data["duration_seconds"] < 0.5 + KILL_GRACE_SECONDS


@pytest.mark.parametrize(
    ("limits", "requested", "first_line"),
    [
        pytest.param({"command_timeout_seconds": 0.3}, None, "[stopped]", id="default"),
        pytest.param(
            {"max_command_timeout_seconds": 0.3},
            300,
            "[timeout lowered to the maximum of 0.3 s]",
            id="clamped",
        ),
    ],
)
async def test_terminal_timeout_default_and_clamp(
    tmp_path: Path, limits: dict[str, float], requested: float | None, first_line: str
) -> None:
    """No timeout means the server default; one above the maximum is lowered and says so."""
    with trio.fail_after(10):
        result = await run_command(
            args("echo '[stopped]'; sleep 300", requested), make_env(tmp_path, **limits)
        )
    assert result.content.splitlines()[0] == first_line
    assert result.content.endswith(
        "[timed out after 0.3 s: the command and its processes were killed]"
    )
    assert result.data["timed_out"]


async def test_terminal_background_job_killed_when_command_ends(tmp_path: Path) -> None:
    """A background job that does not hold the output is killed once the shell exits."""
    env = make_env(tmp_path)
    with trio.fail_after(10):
        result = await run_command(args("sleep 300 > /dev/null 2>&1 & echo $!"), env)
    assert result.data["exit_code"] == 0
    assert is_dead(int(result.content.splitlines()[0]))


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("", id="sigterm"),
        pytest.param("trap '' TERM; ", id="ignores-sigterm"),
    ],
)
async def test_terminal_cancel_kills_process_group(tmp_path: Path, prefix: str) -> None:
    """Cancelling kills the shell, its children and grandchildren before Cancelled propagates."""
    env = make_env(tmp_path)
    raised: list[type[BaseException]] = []

    async def run_then_record(cancel_scope: trio.CancelScope) -> None:
        with cancel_scope:
            try:
                await run_command(args(prefix + RECORD_PIDS_AND_BLOCK), env)
            except BaseException as exc:
                raised.append(type(exc))
                raise

    with trio.fail_after(10):
        cancel_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_then_record, cancel_scope)
            shell, *descendants = await wait_for_pids(env.workspace / "pids")
            states = [process_state(pid) for pid in (shell, *descendants)]
            assert [state and state[1] for state in states] == [shell] * 3, "one process group"
            assert not any(is_dead(pid) for pid in (shell, *descendants))
            cancelled_at = trio.current_time()
            cancel_scope.cancel()
        elapsed = trio.current_time() - cancelled_at
    assert raised == [trio.Cancelled]
    with pytest.raises(ProcessLookupError):
        os.kill(shell, 0)  # our child, reaped by the tool
    assert [is_dead(pid) for pid in descendants] == [True, True]
    assert env.tool_limiter.borrowed_tokens == 0
    if prefix:
        assert KILL_GRACE_SECONDS <= elapsed < KILL_GRACE_SECONDS + 2
    else:
        assert elapsed < KILL_GRACE_SECONDS


async def test_terminal_cancel_grace_covers_whole_group(tmp_path: Path) -> None:
    """SIGKILL waits for the whole group, not just the shell: a child may finish its cleanup."""
    env = make_env(tmp_path)
    # The shell dies of SIGTERM at once; its subshell takes 0.2 s to clean up, then exits.
    command = "(trap 'sleep 0.2; echo clean > cleaned; exit' TERM; touch started; sleep 300 & wait)"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_command, args(command), env)
            while not (env.workspace / "started").exists():
                await trio.sleep(0.01)
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - cancelled_at
    assert (env.workspace / "cleaned").read_text() == "clean\n"
    assert elapsed < KILL_GRACE_SECONDS


async def test_terminal_call_holds_one_tool_token(tmp_path: Path) -> None:
    """A terminal call holds exactly one tool-limiter token (the runner's) while running,
    and none afterwards."""
    env = make_env(tmp_path)
    call = ToolCall("c", "terminal", {"command": "sleep 300"})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(execute_one, call, default_tools(), env)
            await trio.testing.wait_all_tasks_blocked()
            stats = env.tool_limiter.statistics()
            assert (stats.borrowed_tokens, stats.tasks_waiting) == (1, 0)
            nursery.cancel_scope.cancel()
    assert env.tool_limiter.statistics().borrowed_tokens == 0


async def test_terminal_scans_proc_in_worker_threads_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killing a command's processes reads /proc in worker threads — never on the Trio
    thread (a full scan takes milliseconds), never on Trio's default limiter."""
    scans: list[tuple[int, int]] = []  # (thread, tokens borrowed from the default limiter)
    default = trio.to_thread.current_default_thread_limiter()
    real = sandbox.CommandProcesses._scan

    def spy(self: sandbox.CommandProcesses) -> list[tuple[int, bool]]:
        scans.append((threading.get_ident(), default.borrowed_tokens))
        return real(self)

    monkeypatch.setattr(sandbox.CommandProcesses, "_scan", spy)
    with trio.fail_after(10):
        result = await run_command(args("sleep 300", timeout=0.2), make_env(tmp_path))
    assert result.data["timed_out"]
    assert scans, "the kill scanned /proc"
    assert all(thread != threading.get_ident() and tokens == 0 for thread, tokens in scans)


async def test_terminal_missing_workspace_is_error(tmp_path: Path) -> None:
    """A workspace that does not exist is reported to the model, not raised."""
    env = ToolEnvironment(workspace=tmp_path / "missing", tool_limiter=trio.CapacityLimiter(1))
    with trio.fail_after(10):
        result = await run_command(args("true"), env)
    assert result.is_error
    assert result.content.startswith("Could not start /bin/bash in the workspace")
    assert env.tool_limiter.borrowed_tokens == 0


def test_terminal_arguments_schema_is_strict_and_described() -> None:
    """The model sees a described schema; extra keys, an empty command or timeout 0 fail."""
    schema = TerminalArguments.model_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["command"]
    assert all(prop["description"] for prop in schema["properties"].values())
    assert (TerminalTool.name, TerminalTool.Arguments) == ("terminal", TerminalArguments)
    for bad in ({"command": "ls", "cwd": "/"}, {"command": ""}, {"command": "ls", "timeout": 0}):
        with pytest.raises(pydantic.ValidationError):
            TerminalArguments.model_validate(bad)
