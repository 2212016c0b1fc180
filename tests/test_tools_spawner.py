"""Commands are forked by one long-lived thread: never the Trio thread, never a worker
thread that may exit (and take a ``--die-with-parent`` sandbox with it)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import trio

from app.tools.base import ToolEnvironment
from app.tools.spawner import SPAWNER, Spawner
from app.tools.terminal import TerminalArguments, run_command

pytestmark = pytest.mark.timeout(60)


async def test_spawner_runs_every_call_in_one_thread_apart_from_trio() -> None:
    """Calls run in the same dedicated thread, not the Trio thread; errors come back."""
    spawner = Spawner("test-spawner")
    first = await spawner.call(threading.current_thread)
    second = await spawner.call(threading.current_thread)
    assert first is second
    assert first is not threading.current_thread()
    assert first.name == "test-spawner" and first.daemon

    def fail() -> None:
        raise OSError("no such program")

    with pytest.raises(OSError, match="no such program"):
        await spawner.call(fail)


async def test_spawner_call_is_not_cancelled_half_way() -> None:
    """A cancel arriving while the job runs waits for it: whatever it started is returned
    to the caller's scope, never dropped."""
    started, finish = threading.Event(), threading.Event()

    def job() -> str:
        started.set()
        finish.wait(5)
        return "spawned"

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            result: list[str] = []

            async def call() -> None:
                result.append(await SPAWNER.call(job))

            nursery.start_soon(call)
            await trio.to_thread.run_sync(started.wait)
            scope.cancel()
            finish.set()
    assert result == ["spawned"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
async def test_sandboxed_command_outlives_trio_idle_worker_threads(tmp_path: Path) -> None:
    """Under bwrap (--die-with-parent), a command runs past the 10 s after which Trio's
    idle worker threads exit: it was forked by a thread that does not exit."""
    env = ToolEnvironment(workspace=tmp_path, tool_limiter=trio.CapacityLimiter(1), sandbox="bwrap")
    arguments = TerminalArguments(command="sleep 11 && echo survived", timeout=30)
    with trio.fail_after(30):
        result = await run_command(arguments, env)
    assert "survived" in result.content, result.content
    assert result.data["exit_code"] == 0
