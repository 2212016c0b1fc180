"""Tools inside runs (script tool steps): events, workspaces, parallelism, no deadlock,
and interrupting a batch of running commands."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from app.events import Event
from app.lifecycle import Status
from app.settings import Settings
from app.store import EventQuery, SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.workspaces import workspace_path
from tests.conftest import assert_all_returned, new_conversation, script

pytestmark = pytest.mark.timeout(60)


def terminal(command: str) -> dict[str, Any]:
    return {"tool": "terminal", "args": {"command": command}}


@asynccontextmanager
async def supervised(
    settings: Settings, store: SqliteStore, **limits: Any
) -> AsyncIterator[RunSupervisor]:
    """A supervisor with the given limits, checked clean when it closes."""
    async with open_run_supervisor(settings.model_copy(update=limits), store) as sup:
        yield sup
    assert_all_returned(sup)


async def run(sup: RunSupervisor, *steps: Any, **fields: Any) -> tuple[str, Any]:
    conversation = await new_conversation(sup, script(*steps), **fields)
    started = await sup.start_run(conversation.id)
    ended = await sup.wait_run(conversation.id, started.id, 30)
    assert ended is not None
    return conversation.id, ended


async def events(sup: RunSupervisor, conversation_id: str, kind: str) -> list[Event]:
    page = await sup.io(sup.store.search_events, conversation_id, EventQuery(kind=kind))
    return page.items


def workspace(sup: RunSupervisor, conversation_id: str) -> Path:
    return workspace_path(sup.settings.workspaces_path, sup.store.get_conversation(conversation_id))


async def test_script_tool_step_records_action_and_observation(
    settings: Settings, store: SqliteStore
) -> None:
    """A tool step runs in the conversation's workspace and is recorded as two events."""
    async with supervised(settings, store) as sup:
        with trio.fail_after(20):
            conversation_id, ended = await run(sup, terminal("echo hi > f.txt && cat f.txt"))
        assert ended.status is Status.FINISHED
        action = (await events(sup, conversation_id, "action"))[0].payload
        observation = (await events(sup, conversation_id, "observation"))[0].payload
        assert (action.tool, action.arguments) == (
            "terminal",
            {"command": "echo hi > f.txt && cat f.txt"},
        )  # type: ignore[union-attr]
        assert "hi" in observation.content and not observation.is_error  # type: ignore[union-attr]
        assert (workspace(sup, conversation_id) / "f.txt").read_text() == "hi\n"


async def test_script_list_step_runs_its_calls_concurrently(
    settings: Settings, store: SqliteStore
) -> None:
    """The calls of a list step are in flight together (each waits for all three)."""
    async with supervised(settings, store, tool_threads=3) as sup:
        meet = "touch ready.$N; until [ $(ls ready.* | wc -l) -ge 3 ]; do sleep 0.01; done; echo $N"
        calls = [terminal(meet.replace("$N", str(n))) for n in range(3)]
        with trio.fail_after(20):
            conversation_id, ended = await run(sup, calls)
        assert ended.status is Status.FINISHED
        outputs = [e.payload.content for e in await events(sup, conversation_id, "observation")]  # type: ignore[union-attr]
        assert [text.splitlines()[0] for text in outputs] == ["0", "1", "2"]  # call order


@pytest.mark.parametrize(
    ("slots", "runs"), [pytest.param(1, 3, id="one-slot"), pytest.param(2, 4, id="all-slots-busy")]
)
async def test_parallel_tool_calls_never_deadlock(
    settings: Settings, store: SqliteStore, slots: int, runs: int
) -> None:
    """Runs holding every run slot, each with 3 parallel calls on 2 tool tokens, all finish."""
    limits = {"max_concurrent_runs": slots, "tool_threads": 2, "max_queued_runs": 10}
    async with supervised(settings, store, **limits) as sup:
        await _start_and_finish_all(sup, runs)


async def _start_and_finish_all(sup: RunSupervisor, runs: int) -> None:
    batch = [terminal(f"echo {n}") for n in range(3)]
    with trio.fail_after(30):
        started = []
        for _ in range(runs):
            conversation = await new_conversation(sup, script(batch))
            started.append((conversation.id, (await sup.start_run(conversation.id)).id))
        for conversation_id, run_id in started:
            ended = await sup.wait_run(conversation_id, run_id, 25)
            assert ended is not None and ended.status is Status.FINISHED


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_interrupt_mid_batch_kills_commands_and_skips_pending(
    settings: Settings, store: SqliteStore
) -> None:
    """Interrupt during a batch of 3 calls on 2 tool tokens: the 2 running commands die, the
    pending call never starts (which 2 start first is up to the scheduler), and every call
    is answered by a "stopped" observation."""
    # sandbox none: the shells' $$ must be host pids (bwrap: tests/security/test_sandbox_*).
    async with supervised(settings, store, tool_threads=2, sandbox="none") as sup:
        calls = [terminal(f"echo $$ > tmp.{n} && mv tmp.{n} pid.{n}; sleep 300") for n in range(3)]
        conversation = await new_conversation(sup, script(calls))
        await sup.start_run(conversation.id)
        directory = workspace(sup, conversation.id)
        with trio.fail_after(20):
            while len(pid_files := sorted(directory.glob("pid.*"))) < 2:
                await trio.sleep(0.01)  # poll interval: the shells write their pid files
            assert sup.statistics().tool_borrowed == 2
            pids = [int(path.read_text()) for path in pid_files]
            ended = await sup.interrupt(conversation.id)
        assert (ended.status, ended.reason) == (Status.PAUSED, "interrupt")
        assert not any(alive(pid) for pid in pids)
        assert len(list(directory.glob("pid.*"))) == 2
        observed = [e.payload for e in await events(sup, conversation.id, "observation")]
        assert [o.data for o in observed] == [{"stopped": True}] * 3  # type: ignore[union-attr]


async def test_script_finish_and_unknown_tools(settings: Settings, store: SqliteStore) -> None:
    """A finish call ends the run with its message; an unknown tool is an error observation."""
    async with supervised(settings, store) as sup:
        steps = [{"tool": "teleport"}, {"tool": "finish", "args": {"message": "bye"}}, {"say": "x"}]
        with trio.fail_after(20):
            conversation_id, ended = await run(sup, *steps)
        assert (ended.status, ended.steps) == (Status.FINISHED, 2)
        first = (await events(sup, conversation_id, "observation"))[0].payload
        assert first.is_error and "unknown tool 'teleport'" in first.content  # type: ignore[union-attr]
        messages = [e.payload.text for e in await events(sup, conversation_id, "message")]  # type: ignore[union-attr]
        assert messages == ["bye"]


async def test_named_workspace_is_shared_and_deleted_on_request(
    settings: Settings, store: SqliteStore
) -> None:
    """Conversations naming one workspace share it; deleting with the option removes it."""
    async with supervised(settings, store) as sup:
        with trio.fail_after(20):
            first, _ = await run(sup, terminal("echo shared > s.txt"), workspace="proj")
            second, _ = await run(sup, terminal("cat s.txt"), workspace="proj")
            observation = (await events(sup, second, "observation"))[0].payload
            assert "shared" in observation.content  # type: ignore[union-attr]
            path = workspace(sup, first)
            assert path == sup.settings.workspaces_path / "named" / "proj"
            await sup.delete_conversation(first)
            assert path.exists()
            await sup.delete_conversation(second, delete_workspace=True)
        assert not path.exists()


async def test_interrupt_mid_batch_keeps_the_results_of_calls_that_returned(
    settings: Settings, store: SqliteStore
) -> None:
    """A call that returned before the interrupt is recorded with its real result; only the
    call still running is recorded "stopped"."""
    async with supervised(settings, store, tool_threads=2) as sup:
        calls = [terminal("echo quick"), terminal("touch started; sleep 300")]
        conversation = await new_conversation(sup, script(calls))
        await sup.start_run(conversation.id)
        started = workspace(sup, conversation.id) / "started"
        with trio.fail_after(20):
            while not started.exists() or sup.statistics().tool_borrowed != 1:
                await trio.sleep(0.01)  # poll interval: the sleeper runs, "quick" returned
            ended = await sup.interrupt(conversation.id)
        assert (ended.status, ended.reason) == (Status.PAUSED, "interrupt")
        quick, sleeper = [e.payload for e in await events(sup, conversation.id, "observation")]
        assert (quick.content, quick.is_error) == ("quick\n[exit code 0]", False)  # type: ignore[union-attr]
        assert quick.data["exit_code"] == 0  # type: ignore[union-attr]
        assert sleeper.data == {"stopped": True}  # type: ignore[union-attr]
