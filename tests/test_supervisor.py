"""The run supervisor: admission, the FIFO line, limits, pause/interrupt, isolation, drain.

Runs are held mid-step with gates (``app.testing``), so every assertion about "running" or
"queued" is made at a known point, never after a sleep.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any, Literal

import pytest
import trio
import trio.testing
from pydantic import BaseModel, ConfigDict

from app.agents.base import StepContext, StepResult, finish
from app.errors import ConversationBusy, IllegalTransition, NotFound, RunQueueFull, ShuttingDown
from app.events import MessagePayload
from app.handles import IfBusy
from app.lifecycle import Status
from app.settings import Settings
from app.store import EventQuery, SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from tests.conftest import assert_all_returned, gated, new_conversation, script

pytestmark = pytest.mark.timeout(30)


async def start(sup: RunSupervisor, agent: dict[str, Any], **kwargs: Any) -> tuple[str, str]:
    conversation = await new_conversation(sup, agent)
    run = await sup.start_run(conversation.id, **kwargs)
    return conversation.id, run.id


async def run_of(sup: RunSupervisor, conversation_id: str, run_id: str) -> Any:
    return await sup.get_run(conversation_id, run_id)


async def messages(sup: RunSupervisor, conversation_id: str) -> list[str]:
    page = await sup.io(sup.store.search_events, conversation_id, EventQuery(kind="message"))
    return [event.payload.text for event in page.items]  # type: ignore[union-attr]


async def test_supervisor_queue_positions_are_start_order(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Runs past the slots wait in FIFO order, and start in exactly that order."""
    with trio.fail_after(10):
        ids = [await start(supervisor, gated(f"g{i}")) for i in range(5)]
        await gates["g0"].wait_entered()
        await gates["g1"].wait_entered()
        positions = [supervisor.queue_position(run_id) for _, run_id in ids]
        assert positions == [None, None, 1, 2, 3]
        stats = supervisor.statistics()
        assert (stats.running, stats.queued, stats.waiting_for_slot) == (2, 3, 3)
        assert supervisor.run_limiter.borrowed_tokens == 2

        gates["g1"].release()
        await gates["g2"].wait_entered()
        assert [supervisor.queue_position(run_id) for _, run_id in ids[3:]] == [1, 2]
        assert gates["g3"].entries == 0 and gates["g4"].entries == 0


async def test_supervisor_refuses_run_past_max_queued_runs(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """One run more than max_queued_runs is refused with 429 and leaves nothing behind."""
    with trio.fail_after(10):
        for i in range(5):  # 2 running + 3 queued
            await start(supervisor, gated(f"g{i}"))
        conversation = await new_conversation(supervisor, gated("late"))
        with pytest.raises(RunQueueFull) as caught:
            await supervisor.start_run(conversation.id)
    assert caught.value.status == 429
    assert "max_queued_runs = 3" in caught.value.message
    assert caught.value.headers() == {"Retry-After": "5"}
    runs, _ = await supervisor.io(supervisor.store.list_runs, conversation.id, limit=10, after=None)
    assert runs == []
    assert supervisor.statistics().queued == 3


async def test_supervisor_raising_limit_starts_waiters_at_once(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Raising max_concurrent_runs at runtime starts queued runs without another trigger."""
    with trio.fail_after(10):
        for i in range(5):
            await start(supervisor, gated(f"g{i}"))
        supervisor.set_limits(max_concurrent_runs=4)
        await gates["g2"].wait_entered()
        await gates["g3"].wait_entered()
    stats = supervisor.statistics()
    assert (stats.running, stats.queued, stats.max_concurrent_runs) == (4, 1, 4)


async def test_supervisor_zero_slots_pause_admission_and_lowering_preempts_nobody(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Lowering the limit to 0 leaves running runs alone and holds new runs in the line."""
    with trio.fail_after(10):
        await start(supervisor, gated("g0"))
        await gates["g0"].wait_entered()
        supervisor.set_limits(max_concurrent_runs=0)
        _, waiting = await start(supervisor, gated("g1"))
        await trio.testing.wait_all_tasks_blocked()
        assert supervisor.statistics().running == 1
        assert supervisor.queue_position(waiting) == 1
        assert gates["g1"].entries == 0

        gates["g0"].release()  # a slot frees up, but the limit is 0: still nobody starts
        while supervisor.statistics().running:
            await trio.sleep(0.01)
        assert supervisor.queue_position(waiting) == 1
        supervisor.set_limits(max_concurrent_runs=1)
        await gates["g1"].wait_entered()


async def test_supervisor_cancelled_while_queued_never_starts_a_thread(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Interrupting a queued run ends it paused without ever running its step."""
    with trio.fail_after(10):
        await start(supervisor, gated("g0"))
        await start(supervisor, gated("g1"))
        conversation_id, _ = await start(supervisor, gated("g2"))
        await gates["g1"].wait_entered()
        threads_before = supervisor.statistics().run_threads_alive
        run = await supervisor.interrupt(conversation_id)
    assert (run.status, run.reason, run.started_at) == (Status.PAUSED, "interrupt", None)
    assert gates["g2"].entries == 0
    assert supervisor.statistics().run_threads_alive == threads_before == 2
    conversation = await supervisor.io(supervisor.store.get_conversation, conversation_id)
    assert conversation.status is Status.PAUSED


async def test_supervisor_pause_waits_for_step_boundary_then_resumes(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Pause is ``pausing`` until the step ends; the next run resumes at the next step."""
    with trio.fail_after(10):
        conversation_id, run_id = await start(supervisor, gated("a", "b"))
        await gates["a"].wait_entered()
        run = await supervisor.pause(conversation_id)
        assert run.status is Status.PAUSING
        gates["a"].release()
        run = await supervisor.wait_run(conversation_id, run_id, timeout_seconds=5)
        assert run is not None
        assert (run.status, run.reason, run.steps) == (Status.PAUSED, "pause", 1)
        assert gates["b"].entries == 0

        second = await supervisor.start_run(conversation_id)
        await gates["b"].wait_entered()
        gates["b"].release()
        run = await supervisor.wait_run(conversation_id, second.id, timeout_seconds=5)
    assert run is not None and run.status is Status.FINISHED
    assert await messages(supervisor, conversation_id) == ["gate a", "gate b"]


async def test_supervisor_interrupt_stops_mid_step_and_the_step_runs_again(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Interrupt ends a blocked step at once; the interrupted step is not done."""
    with trio.fail_after(10):
        conversation_id, _ = await start(supervisor, gated("a", "b"))
        await gates["a"].wait_entered()
        run = await supervisor.interrupt(conversation_id)
        assert (run.status, run.reason, run.steps) == (Status.PAUSED, "interrupt", 0)
        await supervisor.start_run(conversation_id)
        await gates["a"].wait_entered(2)


async def test_supervisor_interrupt_ends_a_long_script_sleep(supervisor: RunSupervisor) -> None:
    """A 60 s script sleep is interrupted well within the test's 5 s budget."""
    with trio.fail_after(5):
        conversation_id, run_id = await start(supervisor, script({"sleep": 60}))
        while (await run_of(supervisor, conversation_id, run_id)).status is not Status.RUNNING:
            await trio.sleep(0.005)
        run = await supervisor.interrupt(conversation_id)
    assert (run.status, run.reason) == (Status.PAUSED, "interrupt")


async def test_supervisor_failing_run_is_isolated(supervisor: RunSupervisor, gates: Gates) -> None:
    """A step that raises ends its own run in error; a sibling run carries on."""
    with trio.fail_after(10):
        sibling_id, sibling_run = await start(supervisor, gated("g"))
        failing_id, failing_run = await start(supervisor, script({"say": "x"}, {"fail": "boom"}))
        run = await supervisor.wait_run(failing_id, failing_run, timeout_seconds=5)
        assert run is not None
        assert (run.status, run.reason, run.error) == (Status.ERROR, "agent_error", "boom")
        errors = await supervisor.io(
            supervisor.store.search_events, failing_id, EventQuery(kind="error")
        )
        assert [e.payload.message for e in errors.items] == ["boom"]  # type: ignore[union-attr]
        assert (await run_of(supervisor, sibling_id, sibling_run)).status is Status.RUNNING
        gates["g"].release()
        run = await supervisor.wait_run(sibling_id, sibling_run, timeout_seconds=5)
    assert run is not None and run.status is Status.FINISHED


async def test_script_agent_resumes_after_failure_and_restarts_after_finish(
    supervisor: RunSupervisor,
) -> None:
    """A failed step runs again on the next run; a finished script starts from step one."""
    with trio.fail_after(10):
        failing_id, run_id = await start(supervisor, script({"say": "a"}, {"fail": "boom"}))
        await supervisor.wait_run(failing_id, run_id, 5)
        again = await supervisor.start_run(failing_id)
        run = await supervisor.wait_run(failing_id, again.id, 5)
        assert run is not None and (run.status, run.steps) == (Status.ERROR, 0)
        assert await messages(supervisor, failing_id) == ["a"]

        done_id, run_id = await start(supervisor, script({"say": "a"}, {"finish": "done"}))
        await supervisor.wait_run(done_id, run_id, 5)
        again = await supervisor.start_run(done_id)
        run = await supervisor.wait_run(done_id, again.id, 5)
    assert run is not None and (run.status, run.steps) == (Status.FINISHED, 2)
    assert await messages(supervisor, done_id) == ["a", "done", "a", "done"]


async def test_supervisor_max_iterations_ends_run_in_error(supervisor: RunSupervisor) -> None:
    """A run that reaches its conversation's max_iterations ends error/max_iterations."""
    conversation = await new_conversation(
        supervisor, script(*[{"say": str(i)} for i in range(5)]), max_iterations=2
    )
    with trio.fail_after(10):
        run = await supervisor.start_run(conversation.id)
        ended = await supervisor.wait_run(conversation.id, run.id, 5)
    assert ended is not None
    assert (ended.status, ended.reason, ended.steps) == (Status.ERROR, "max_iterations", 2)
    assert await messages(supervisor, conversation.id) == ["0", "1"]


@pytest.mark.parametrize("if_busy", [IfBusy.ENQUEUE, IfBusy.INTERRUPT], ids=str)
async def test_supervisor_runs_of_one_conversation_never_overlap(
    supervisor: RunSupervisor, gates: Gates, if_busy: IfBusy
) -> None:
    """enqueue waits for the active run; interrupt stops it first; reject refuses."""
    with trio.fail_after(10):
        conversation_id, first = await start(supervisor, gated("a"))
        await gates["a"].wait_entered()
        with pytest.raises(ConversationBusy):
            await supervisor.start_run(conversation_id)
        second = await supervisor.start_run(conversation_id, if_busy=if_busy)
        assert second.status is Status.QUEUED and second.queue_position is None
        await trio.testing.wait_all_tasks_blocked()
        assert gates["a"].entries == 1  # the second run has not started alongside
        if if_busy is IfBusy.ENQUEUE:
            gates["a"].release()
        ended = await supervisor.wait_run(conversation_id, first, 5)
        assert ended is not None
        expected = (
            (Status.FINISHED, "agent_finished")
            if if_busy is IfBusy.ENQUEUE
            else (
                Status.PAUSED,
                "interrupt",
            )
        )
        assert (ended.status, ended.reason) == expected
        gates["a"].release()
        run = await supervisor.wait_run(conversation_id, second.id, 5)
    assert run is not None and run.status is Status.FINISHED
    assert gates["a"].entries == 2


async def test_supervisor_delete_stops_runs_and_removes_everything(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """Deleting a conversation stops its runs, joins their threads, then deletes its data."""
    with trio.fail_after(10):
        conversation_id, _ = await start(supervisor, gated("a"))
        await start(supervisor, gated("other"))
        await gates["a"].wait_entered()
        await supervisor.delete_conversation(conversation_id)
    with pytest.raises(NotFound):
        await supervisor.io(supervisor.store.get_conversation, conversation_id)
    assert supervisor.statistics().run_threads_alive == 1
    with pytest.raises(IllegalTransition):
        await supervisor.pause(conversation_id)


async def test_supervisor_drain_stops_all_and_refuses_new_runs(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """drain() pauses every queued and running run with its reason and refuses new ones."""
    with trio.fail_after(10):
        started = [await start(supervisor, gated(f"g{i}")) for i in range(4)]
        await gates["g1"].wait_entered()
        await supervisor.drain("shutdown")
    assert_all_returned(supervisor)
    for conversation_id, run_id in started:
        run = await run_of(supervisor, conversation_id, run_id)
        assert (run.status, run.reason) == (Status.PAUSED, "shutdown")
    with pytest.raises(ShuttingDown):
        await supervisor.start_run(started[0][0])


async def test_supervisor_wait_run_times_out_then_returns_the_ended_run(
    supervisor: RunSupervisor, gates: Gates
) -> None:
    """wait_run returns None on timeout and the terminal record once the run has ended."""
    with trio.fail_after(10):
        conversation_id, run_id = await start(supervisor, gated("a"))
        assert await supervisor.wait_run(conversation_id, run_id, 0.05) is None
        gates["a"].release()
        run = await supervisor.wait_run(conversation_id, run_id, 5)
    assert run is not None and run.status is Status.FINISHED


async def test_supervisor_repr_shows_live_numbers(supervisor: RunSupervisor, gates: Gates) -> None:
    """The repr shows running/queued runs and limiter use as they are right now."""
    with trio.fail_after(10):
        for name in ("a", "b", "c"):
            await start(supervisor, gated(name))
        await gates["a"].wait_entered()
        assert repr(supervisor) == (
            "<RunSupervisor runs 2/2 running, 1 queued | io 0/8 | tools 0/16>"
        )
        await supervisor.drain("test")
        assert repr(supervisor) == (
            "<RunSupervisor runs 0/2 running, 0 queued | io 0/8 | tools 0/16 | draining>"
        )


class FanOutSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["fanout"]
    calls: int


class FanOutAgent:
    """One step: ``calls`` parallel tool calls that must all be in flight at once."""

    def __init__(self, spec: FanOutSpec, barrier: threading.Barrier) -> None:
        self.calls, self.barrier = spec.calls, barrier

    def step(self, ctx: StepContext) -> StepResult:
        results = ctx.run_tools([lambda i=i: self._tool(i) for i in range(self.calls)])
        ctx.emit(MessagePayload(text=",".join(results)))
        return finish()

    def _tool(self, index: int) -> str:
        self.barrier.wait(timeout=10)  # proves the calls of one step run concurrently
        return f"t{index}"


@pytest.mark.parametrize(
    ("slots", "runs"), [pytest.param(1, 3, id="one-slot"), pytest.param(2, 4, id="all-slots-busy")]
)
async def test_supervisor_parallel_tools_never_deadlock(
    tmp_path: Any, gates: Gates, slots: int, runs: int
) -> None:
    """Tools use the tool limiter: runs holding every slot still get their tools run."""
    settings = Settings(data_dir=tmp_path, max_concurrent_runs=slots, tool_threads=2)
    registry = gated_registry(gates)
    barrier = threading.Barrier(2)
    registry.register("fanout", FanOutSpec, lambda spec: FanOutAgent(spec, barrier))
    store = SqliteStore(settings.database_path)
    try:
        async with open_run_supervisor(settings, store, registry=registry) as sup:
            with trio.fail_after(20):
                started = [await start(sup, {"kind": "fanout", "calls": 2}) for _ in range(runs)]
                for conversation_id, run_id in started:
                    run = await sup.wait_run(conversation_id, run_id, 15)
                    assert run is not None and run.status is Status.FINISHED
                    assert await messages(sup, conversation_id) == ["t0,t1"]
        assert_all_returned(sup)
    finally:
        store.close()


async def test_supervisor_recovers_runs_left_by_a_crash(
    settings: Settings, store: SqliteStore
) -> None:
    """Runs a dead process left running become paused/crash_recovery at start-up."""
    conversation_id = await _leave_a_running_run(store)
    async with open_run_supervisor(settings, store) as sup:
        conversation = await sup.io(store.get_conversation, conversation_id)
    assert conversation.status is Status.PAUSED
    assert conversation.run is not None and conversation.run.reason == "crash_recovery"
    assert_all_returned(sup)


async def test_supervisor_resume_on_start_requeues_recovered_conversations(
    settings: Settings, store: SqliteStore
) -> None:
    """With resume_on_start the recovered conversation gets a new run that finishes."""
    conversation_id = await _leave_a_running_run(store)
    resuming = settings.model_copy(update={"resume_on_start": True})
    async with open_run_supervisor(resuming, store) as sup:
        with trio.fail_after(10):
            conversation = await sup.io(store.get_conversation, conversation_id)
            assert conversation.run is not None
            run = await sup.wait_run(conversation_id, conversation.run.id, 5)
    assert run is not None and (run.status, run.steps) == (Status.FINISHED, 1)
    runs, _ = await trio.to_thread.run_sync(
        lambda: store.list_runs(conversation_id, limit=9, after=None)
    )
    assert [(r.status, r.reason) for r in runs] == [
        (Status.PAUSED, "crash_recovery"),
        (Status.FINISHED, "agent_finished"),
    ]


async def _leave_a_running_run(store: SqliteStore) -> str:
    """Write what a process killed mid-run leaves behind: a run recorded as running."""
    from app.lifecycle import Trigger
    from app.store import NewConversation

    conversation, _ = store.create_conversation(
        NewConversation(agent=script({"say": "hello"}), title=None, max_iterations=10)
    )
    store.create_run(conversation.id, run_id="crashed-run", activate=True, reason="user")
    store.transition_run("crashed-run", Trigger.START, reason="started")
    return conversation.id


class StoreThatFailsToStop(SqliteStore):
    """A store whose disk 'fails' when recording a stop: supervisors must survive that."""

    def transition_run(self, run_id: str, trigger: Any, **kwargs: Any) -> Any:
        from app.lifecycle import Trigger

        if trigger is Trigger.STOP:
            raise sqlite3.OperationalError("disk I/O error")
        return super().transition_run(run_id, trigger, **kwargs)

    def stop_runs(self, run_ids: list[str], *, reason: str) -> Any:
        raise sqlite3.OperationalError("disk I/O error")


async def test_supervisor_survives_a_store_failure_while_recording_a_run_end(
    settings: Settings, gates: Gates, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing final-status write is logged; sibling runs and admission carry on."""
    store = StoreThatFailsToStop(settings.database_path)
    try:
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            with trio.fail_after(10):
                sibling_id, sibling_run = await start(sup, gated("sibling"))
                await gates["sibling"].wait_entered()
                sup.set_limits(max_concurrent_runs=1)
                queued_id, _ = await start(sup, gated("never"))
                await sup.interrupt(queued_id)  # recorded from the Trio side: fails
                assert "could not record its end" in caplog.text
                gates["sibling"].release()
                run = await sup.wait_run(sibling_id, sibling_run, 5)
                assert run is not None and run.status is Status.FINISHED
                again_id, again_run = await start(sup, gated("sibling"))
                assert await sup.wait_run(again_id, again_run, 5) is not None
            gates.release_all()
    finally:
        store.close()


class HeldStops(SqliteStore):
    """A real store whose ``stop_runs`` waits on ``release`` (a run's end being written)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def stop_runs(self, run_ids: list[str], *, reason: str) -> Any:
        self.entered.set()
        self.release.wait(10)
        return super().stop_runs(run_ids, reason=reason)


async def test_a_run_whose_end_is_being_recorded_is_not_counted_queued(
    settings: Settings, gates: Gates
) -> None:
    """While an interrupted run's end is written (after its thread returned), the counts
    say what is true: the next run holds the slot, and only the rest are queued."""
    store = HeldStops(settings.database_path)
    try:
        async with open_run_supervisor(
            settings.model_copy(update={"max_concurrent_runs": 1}),
            store,
            registry=gated_registry(gates),
        ) as sup:
            with trio.fail_after(10):
                first, _ = await start(sup, gated("a"))
                await start(sup, gated("b"))
                await start(sup, gated("c"))
                await gates["a"].wait_entered()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sup.interrupt, first)
                    await trio.to_thread.run_sync(store.entered.wait)
                    await gates["b"].wait_entered()
                    stats = sup.statistics()
                    assert (stats.running, stats.queued, stats.waiting_for_slot) == (1, 1, 1)
                    store.release.set()
                gates.release_all()
    finally:
        store.release.set()
        store.close()
