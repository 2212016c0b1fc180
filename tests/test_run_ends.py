"""Every run ends, and is recorded as ending, however it ends; one bad run never hurts
another; shutdown and delete are bounded even when a thread ignores cancellation."""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

import pytest
import trio
import trio.testing
from pydantic import BaseModel

from app.agents.base import StepContext, StepResult, finish
from app.end_ledger import EndLedger
from app.handles import IfBusy
from app.lifecycle import Status, Trigger
from app.settings import Settings
from app.store import SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from tests.conftest import assert_all_returned, gated, new_conversation

pytestmark = pytest.mark.timeout(30)


class RaiseSpec(BaseModel):
    kind: Literal["raise"]
    exception: Literal["SystemExit", "KeyboardInterrupt", "GeneratorExit"]


class RaiseAgent:
    """Raises a ``BaseException`` (not an ``Exception``) in its run thread."""

    def __init__(self, spec: RaiseSpec) -> None:
        self.exception = spec.exception

    def step(self, ctx: StepContext) -> StepResult:
        raise {
            "SystemExit": SystemExit(3),
            "KeyboardInterrupt": KeyboardInterrupt(),
            "GeneratorExit": GeneratorExit(),
        }[self.exception]


class StubbornSpec(BaseModel):
    kind: Literal["stubborn"]


class Stubborn:
    """Blocks its run thread on an event, with no cancellation point at all."""

    entered = threading.Event()
    release = threading.Event()

    def __init__(self, spec: StubbornSpec) -> None:
        pass

    def step(self, ctx: StepContext) -> StepResult:
        Stubborn.entered.set()
        Stubborn.release.wait(20)
        return finish()


@pytest.fixture
def registry(gates: Gates) -> Any:
    registry = gated_registry(gates)
    registry.register("raise", RaiseSpec, RaiseAgent)
    registry.register("stubborn", StubbornSpec, Stubborn)
    Stubborn.entered.clear()
    Stubborn.release.clear()
    yield registry
    Stubborn.release.set()


async def start(sup: RunSupervisor, agent: dict[str, Any], **kwargs: Any) -> tuple[str, str]:
    conversation = await new_conversation(sup, agent)
    run = await sup.start_run(conversation.id, **kwargs)
    return conversation.id, run.id


async def wait_entered_stubborn() -> None:
    await trio.to_thread.run_sync(Stubborn.entered.wait, limiter=trio.CapacityLimiter(1))


@pytest.mark.parametrize("exception", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
async def test_base_exception_in_an_agent_ends_only_its_run(
    settings: Settings, store: SqliteStore, gates: Gates, registry: Any, exception: str
) -> None:
    """An agent raising ``SystemExit``/``KeyboardInterrupt`` in its thread ends its own run
    ``error`` with the exception named; a sibling run carries on and admission goes on."""
    with trio.fail_after(10):
        async with open_run_supervisor(settings, store, registry=registry) as sup:
            sibling, sibling_run = await start(sup, gated("sibling"))
            await gates["sibling"].wait_entered()
            bad, bad_run = await start(sup, {"kind": "raise", "exception": exception})
            ended = await sup.wait_run(bad, bad_run, 5)
            assert ended is not None
            assert (ended.status, ended.reason) == (Status.ERROR, "agent_error")
            assert ended.error is not None and exception in ended.error
            assert (await sup.get_run(sibling, sibling_run)).status is Status.RUNNING
            gates["sibling"].release()
            done = await sup.wait_run(sibling, sibling_run, 5)
            assert done is not None and done.status is Status.FINISHED
        assert_all_returned(sup)


async def test_pause_of_a_queued_run_stops_it_without_a_thread(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Pausing a run that waits in the line records it paused at once; it never starts."""
    with trio.fail_after(10):
        for name in ("a", "b"):
            await start(supervisor, gated(name))
        queued, queued_run = await start(supervisor, gated("never"))
        assert supervisor.queue_position(queued_run) == 1
        paused = await supervisor.pause(queued)
        assert (paused.status, paused.reason, paused.started_at) == (Status.PAUSED, "pause", None)
        assert gates["never"].entries == 0
        assert supervisor.statistics().queued == 0
        gates.release_all()


async def test_pause_before_running_is_recorded_is_honoured(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """A pause that arrives after the run got its slot but before its thread recorded
    ``running`` stops the run at its first boundary, having run no step."""
    with trio.fail_after(10):
        conversation = await new_conversation(supervisor, gated("p"))
        run = await supervisor.start_run(conversation.id)  # seated, thread not yet started
        assert supervisor.statistics().running == 1
        await supervisor.pause(conversation.id)
        ended = await supervisor.wait_run(conversation.id, run.id, 5)
        assert ended is not None
        assert (ended.status, ended.reason, ended.steps) == (Status.PAUSED, "pause", 0)
        assert gates["p"].entries == 0


async def test_cancelling_the_head_of_the_line_moves_the_next_run_up(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Interrupting the run at the head of the line: the next one takes position 1 and is
    the one that starts when a slot frees up."""
    with trio.fail_after(10):
        for name in ("a", "b"):
            await start(supervisor, gated(name))
        head, head_run = await start(supervisor, gated("head"))
        _, second_run = await start(supervisor, gated("second"))
        _, third_run = await start(supervisor, gated("third"))
        await supervisor.interrupt(head)
        assert supervisor.queue_position(head_run) is None
        assert [supervisor.queue_position(r) for r in (second_run, third_run)] == [1, 2]
        gates["a"].release()
        await gates["second"].wait_entered()
        assert gates["third"].entries == 0 and gates["head"].entries == 0
        gates.release_all()


async def test_cancelling_open_run_supervisor_from_outside_records_every_run(
    settings: Settings, store: SqliteStore, gates: Gates
) -> None:
    """Cancelling the block from outside stops running and queued runs, records them
    ``paused/shutdown`` and leaves no thread or token behind."""
    with trio.fail_after(10):
        with trio.CancelScope() as outside:
            async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
                ids = [await start(sup, gated(f"g{i}")) for i in range(3)]
                await gates["g0"].wait_entered()
                await gates["g1"].wait_entered()
                outside.cancel()
                await trio.sleep_forever()
        assert outside.cancelled_caught
    assert_all_returned(sup)
    for conversation_id, run_id in ids:
        run = store.get_run(conversation_id, run_id)
        assert (run.status, run.reason) == (Status.PAUSED, "shutdown")


async def test_open_run_supervisor_shutdown_is_bounded_by_the_grace(
    settings: Settings, store: SqliteStore, registry: Any
) -> None:
    """A thread that ignores cancellation does not hold the block open past
    ``shutdown_grace_seconds``: its run is recorded paused and the block ends."""
    settings = settings.model_copy(update={"shutdown_grace_seconds": 0.3})
    with trio.fail_after(10):
        async with open_run_supervisor(settings, store, registry=registry) as sup:
            conversation_id, run_id = await start(sup, {"kind": "stubborn"})
            await wait_entered_stubborn()
            closed_at = trio.current_time()
        assert trio.current_time() - closed_at < 2
        assert not Stubborn.release.is_set()  # the thread is still blocked
        run = store.get_run(conversation_id, run_id)
        assert (run.status, run.reason) == (Status.PAUSED, "shutdown")
        assert sup.statistics().run_threads_alive == 1  # honest: it is still there
        Stubborn.release.set()
        while sup.statistics().run_threads_alive:
            await trio.sleep(0.01)
    assert sup.run_limiter.borrowed_tokens == 0  # its slot came back with the thread


async def test_delete_of_a_conversation_with_a_stubborn_run_is_bounded(
    settings: Settings, store: SqliteStore, registry: Any
) -> None:
    """Deleting a conversation whose run ignores cancellation returns after the grace,
    with the conversation deleted."""
    settings = settings.model_copy(update={"shutdown_grace_seconds": 0.3})
    with trio.fail_after(10):
        async with open_run_supervisor(settings, store, registry=registry) as sup:
            conversation_id, _ = await start(sup, {"kind": "stubborn"})
            await wait_entered_stubborn()
            await sup.delete_conversation(conversation_id)
            assert store.cached_conversation(conversation_id) is None
            assert sup.statistics().queued == 0
            Stubborn.release.set()


async def test_resume_on_start_beyond_the_queue_leaves_the_rest_paused(
    settings: Settings, store: SqliteStore, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    """``resume_on_start`` with more recovered conversations than places: what fits is
    queued, the rest stays paused, start-up does not crash, and the log says so."""
    ids = _left_running(store, ["default"] * 5)  # five runs left "running" by a crash
    settings = settings.model_copy(
        update={"resume_on_start": True, "max_concurrent_runs": 0, "max_queued_runs": 2}
    )
    with trio.fail_after(10):
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            statuses = [store.get_conversation(cid).status for cid in ids]
            assert statuses.count(Status.QUEUED) == 2
            assert statuses.count(Status.PAUSED) == 3
            assert sup.statistics().queued == 2
    assert "3 conversation(s) left paused" in caplog.text


async def test_resume_on_start_skips_a_tenant_at_its_quota_not_the_others(
    settings: Settings, store: SqliteStore, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    """Three recovered conversations of tenant ``alice`` (quota 1), then one of ``bob``:
    one of alice's and bob's are queued; alice's other two stay paused, and the log says
    why."""
    ids = _left_running(store, ["alice", "alice", "alice", "bob"])
    settings = settings.model_copy(
        update={"resume_on_start": True, "max_concurrent_runs": 0, "tenant_max_active_runs": 1}
    )
    with trio.fail_after(10):
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)):
            statuses = [store.get_conversation(cid).status for cid in ids]
    assert statuses == [Status.QUEUED, Status.PAUSED, Status.PAUSED, Status.QUEUED]
    assert "2 conversation(s) left paused: their tenant is at" in caplog.text


def _left_running(store: SqliteStore, tenants: list[str]) -> list[str]:
    """One conversation per tenant given, each with a run left ``running`` (as a crash
    leaves it); their ids, in that order."""
    ids = []
    for tenant in tenants:
        conversation_id = store.create_conversation(_new(gated("r"), tenant=tenant))[0].id
        run_id = f"run-{conversation_id}"
        store.create_run(conversation_id, run_id=run_id, activate=True, reason="user")
        store.transition_run(run_id, Trigger.START, reason="started")
        ids.append(conversation_id)
    return ids


def _new(agent: dict[str, Any], tenant: str = "default") -> Any:
    from app.store import NewConversation

    return NewConversation(agent=agent, title=None, max_iterations=10, tenant=tenant)


class FlakyStopStore(SqliteStore):
    """A store whose writes of a stop fail ``failures`` times (a full disk, then freed)."""

    failures = 2

    def transition_run(self, run_id: str, trigger: Any, **kwargs: Any) -> Any:
        import sqlite3

        if trigger is Trigger.STOP and self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().transition_run(run_id, trigger, **kwargs)

    def stop_runs(self, run_ids: list[str], *, reason: str) -> Any:
        import sqlite3

        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().stop_runs(run_ids, reason=reason)


async def test_an_end_the_store_refused_is_recorded_once_it_accepts_writes(
    settings: Settings, gates: Gates
) -> None:
    """A run whose end could not be written is not left ``running``: the end is retried
    and recorded as soon as the store takes writes again — no restart."""
    store = FlakyStopStore(settings.database_path)
    try:
        with trio.fail_after(10):
            async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
                for name in ("a", "b"):
                    await start(sup, gated(name))
                queued, queued_run = await start(sup, gated("q"))
                await sup.interrupt(queued)  # recorded from the Trio side: fails twice
                while store.get_run(queued, queued_run).status is not Status.PAUSED:
                    await trio.sleep(0.05)
                again = await sup.start_run(queued, if_busy=IfBusy.ENQUEUE)
                assert again.status is Status.QUEUED  # no illegal_transition
                gates.release_all()
    finally:
        store.close()


async def test_run_start_and_end_are_logged(
    supervisor: RunSupervisor, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    """One line when a run starts and one when it ends, with conversation, run, how it
    ended, steps and duration."""
    caplog.set_level(logging.INFO, logger="trellis.runs")
    with trio.fail_after(10):
        conversation_id, run_id = await start(supervisor, gated("log"))
        gates["log"].release()
        await supervisor.wait_run(conversation_id, run_id, 5)
    lines = [r.getMessage() for r in caplog.records if r.name == "trellis.runs"]
    assert any(line.startswith("run started") and run_id in line for line in lines)
    (end,) = [line for line in lines if line.startswith("run ended") and run_id in line]
    assert f"conversation={conversation_id}" in end
    assert "as=finished/agent_finished" in end and "steps=1" in end and "duration_ms=" in end


async def test_a_failed_admission_write_gives_its_slot_to_the_next_run(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """When the write that records a run fails, the run was never admitted: the slot it
    was given goes to the next run, and nothing is left registered."""
    with trio.fail_after(10):

        def failing_write(admission: Any) -> Any:
            raise OSError("disk full")

        conversation = await new_conversation(supervisor, gated("x"))
        with pytest.raises(OSError, match="disk full"):
            await supervisor.admit(conversation.id, failing_write, lambda result: result)
        stats = supervisor.statistics()
        assert (stats.running, stats.queued) == (0, 0)
        assert supervisor.run_limiter.borrowed_tokens == 0
        run = await supervisor.start_run(conversation.id)
        assert run.queue_position is None  # it got the free slot at once
        gates.release_all()


async def test_an_admission_whose_supervisor_stopped_meanwhile_is_recorded(
    settings: Settings, store: SqliteStore, gates: Gates
) -> None:
    """If the supervisor's nursery is cancelled from outside while an admission's write is
    in flight, the run is recorded ``paused/shutdown`` and the shutdown does not hang."""
    write_started, write_may_finish = threading.Event(), threading.Event()
    conversation_id = store.create_conversation(_new(gated("y")))[0].id
    recorded: list[Any] = []

    def slow_write(admission: Any) -> Any:
        write_started.set()
        write_may_finish.wait(10)
        result = store.create_run(
            conversation_id, run_id=admission.run_id, activate=True, reason="user"
        )
        recorded.append(admission.run_id)
        return result

    async def admit(sup: RunSupervisor) -> None:
        await sup.admit(conversation_id, slow_write, lambda result: result[1])

    with trio.fail_after(10):
        with trio.CancelScope() as outside:
            async with (
                open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(admit, sup)
                await trio.to_thread.run_sync(write_started.wait)
                outside.cancel()
                write_may_finish.set()
    assert_all_returned(sup)
    run = store.get_run(conversation_id, recorded[0])
    assert (run.status, run.reason) == (Status.PAUSED, "shutdown")
    assert gates["y"].entries == 0


async def test_delete_keeps_a_workspace_another_active_run_uses(
    supervisor: RunSupervisor, gates: Gates, settings: Settings
) -> None:
    """``delete_workspace`` refuses (409 workspace_in_use, nothing deleted) while another
    conversation's active run works in the same named workspace."""
    from app.errors import Conflict

    with trio.fail_after(10):
        owner = await new_conversation(supervisor, gated("w"), workspace="shared")
        other = await new_conversation(supervisor, gated("w"), workspace="shared")
        await supervisor.start_run(other.id)
        await gates["w"].wait_entered()
        marker = settings.workspaces_path / "named" / "shared" / "keep.txt"
        marker.write_text("still here")
        with pytest.raises(Conflict) as refused:
            await supervisor.delete_conversation(owner.id, delete_workspace=True)
        assert refused.value.code == "workspace_in_use"
        assert marker.read_text() == "still here"
        assert (await supervisor.io(supervisor.store.get_conversation, owner.id)).id == owner.id
        gates.release_all()


class StopCountingStore:
    """A fake store that only records its ``stop_runs`` calls (the ledger's only write
    for stops)."""

    def __init__(self) -> None:
        self.stop_calls: list[list[str]] = []

    def stop_runs(self, run_ids: list[str], *, reason: str) -> list[Any]:
        self.stop_calls.append(sorted(run_ids))
        return []


async def test_end_ledger_held_gathers_stops_into_one_transaction() -> None:
    """While a drain holds the ledger (twice: holds nest), stops that arrive wait and
    nothing is written; once every hold is released they are written in one
    ``stop_runs`` call, and each ``record`` returns recorded."""
    store = StopCountingStore()

    async def write(call: Any) -> Any:
        return call(store)

    ledger = EndLedger(write)
    ledger.hold()
    ledger.hold()
    recorded: list[bool] = []

    async def record(run_id: str) -> None:
        recorded.append(await ledger.record(run_id, Trigger.STOP, "shutdown"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(record, f"r{n}")
            await trio.testing.wait_all_tasks_blocked()
            ledger.release()
            await trio.testing.wait_all_tasks_blocked()
            assert (store.stop_calls, ledger.stop_writes, recorded) == ([], 0, [])
            ledger.release()
    assert store.stop_calls == [[f"r{n}" for n in range(5)]]
    assert recorded == [True] * 5
    assert len(ledger) == 0
