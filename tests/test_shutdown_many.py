"""Many runs stopped together: their ends are written in a few ``stop_runs`` transactions,
not one per run, and nothing is lost (in process; the real server: test_shutdown_process.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any

import pytest
import trio

from app.events import Event, MessagePayload, Source
from app.lifecycle import Status, Trigger
from app.settings import Settings
from app.store import SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from tests.conftest import assert_all_returned, new_conversation, script

pytestmark = pytest.mark.timeout(60)

RUNS = 300
#: A drain's ends are group-committed: the first batch holds what ended at once, the next
#: what ended during that write, and so on. A handful, never one per run.
MAX_STOP_TRANSACTIONS = 10
SLEEPER = script({"say": "started"}, {"sleep": 60}, {"finish": "never"})


class CountingStore(SqliteStore):
    """A real store that counts how run ends reach it (calls made, ids per call)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_calls: list[int] = []
        self.single_stops = 0

    def stop_runs(self, run_ids: list[str], *, reason: str) -> Any:
        self.stop_calls.append(len(run_ids))
        return super().stop_runs(run_ids, reason=reason)

    def transition_run(self, run_id: str, trigger: Any, **kwargs: Any) -> Any:
        if trigger is Trigger.STOP:
            self.single_stops += 1
        return super().transition_run(run_id, trigger, **kwargs)


class Said:
    """A store listener that counts the runs' ``say`` messages; ``all`` is set at ``count``."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.all = threading.Event()

    def __call__(self, events: list[Event]) -> None:
        self.seen += sum(
            1 for e in events if isinstance(e.payload, MessagePayload) and e.source is Source.AGENT
        )
        if self.seen >= self.count:
            self.all.set()


async def start_sleepers(sup: RunSupervisor, count: int) -> list[str]:
    """``count`` conversations, each with a run of :data:`SLEEPER` started; their ids."""
    ids = []
    for _ in range(count):
        conversation = await new_conversation(sup, SLEEPER)
        await sup.start_run(conversation.id)
        ids.append(conversation.id)
    return ids


@pytest.fixture
def many(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"max_concurrent_runs": RUNS, "max_queued_runs": RUNS, "io_threads": 4}
    )


async def test_a_drain_records_hundreds_of_ends_in_a_few_transactions(many: Settings) -> None:
    """300 runs mid-step at a drain: every run ``paused/shutdown``, each run's message
    kept and followed by its status event, in at most MAX_STOP_TRANSACTIONS ``stop_runs``
    calls and no per-run stop write."""
    store = CountingStore(many.database_path)
    said = Said(RUNS)
    store.add_listener(said)
    try:
        with trio.fail_after(45):
            async with open_run_supervisor(many, store) as sup:
                ids = await start_sleepers(sup, RUNS)
                await trio.to_thread.run_sync(said.all.wait, abandon_on_cancel=True)
                assert sup.statistics().running == RUNS
            assert_all_returned(sup)
    finally:
        store.remove_listener(said)
    assert store.single_stops == 0
    assert sum(store.stop_calls) == RUNS
    assert 1 <= len(store.stop_calls) <= MAX_STOP_TRANSACTIONS, store.stop_calls
    for conversation_id in ids:
        record = store.get_conversation(conversation_id)
        assert record.status is Status.PAUSED
        assert record.run is not None and record.run.reason == "shutdown"
        kinds = [e.payload.kind for e in _events(store, conversation_id)]
        assert kinds[-2:] == ["message", "status"], kinds  # the say, then the pause
    store.close()


class FullOnceStore(SqliteStore):
    """A real store whose first ``stop_runs`` fails as a full disk does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused = 0

    def stop_runs(self, run_ids: list[str], *, reason: str) -> Any:
        if not self.refused:
            self.refused = len(run_ids)
            raise sqlite3.OperationalError("database or disk is full")
        return super().stop_runs(run_ids, reason=reason)


async def test_a_refused_batch_of_ends_is_retried_and_recorded(
    many: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses the first batch of a drain's ends: those runs are not left
    ``running`` — the ledger retries them (in a batch) before the supervisor closes — and
    every run's log line still says ``paused/shutdown``."""
    caplog.set_level(logging.INFO, logger="trellis.runs")
    runs = 50
    store = FullOnceStore(many.database_path)
    said = Said(runs)
    store.add_listener(said)
    try:
        with trio.fail_after(45):
            async with open_run_supervisor(many, store) as sup:
                ids = await start_sleepers(sup, runs)
                await trio.to_thread.run_sync(said.all.wait, abandon_on_cancel=True)
        assert store.refused >= 1
        assert store.list_active_runs() == []
        for conversation_id in ids:
            record = store.get_conversation(conversation_id)
            assert record.run is not None
            assert (record.status, record.run.reason) == (Status.PAUSED, "shutdown")
        ended = [r.getMessage() for r in caplog.records if "run ended" in r.getMessage()]
        assert len(ended) == runs
        assert all("as=paused/shutdown" in line for line in ended)
        assert "could not record its end" in caplog.text
    finally:
        store.remove_listener(said)
        store.close()


async def test_stop_runs_skips_ended_and_missing_runs_in_one_transaction(
    settings: Settings,
) -> None:
    """``stop_runs`` pauses the active runs listed (queued, running, pausing), appends the
    current run's status event, and skips ended and unknown runs without failing."""
    store = SqliteStore(settings.database_path)
    try:
        from app.store import NewConversation

        ids = []
        for index, steps in enumerate([[], [Trigger.START], [Trigger.START, Trigger.FINISH]]):
            new = NewConversation(agent=SLEEPER, title=None, max_iterations=5)
            conversation_id = store.create_conversation(new)[0].id
            store.create_run(conversation_id, run_id=f"r{index}", activate=True, reason="user")
            for trigger in steps:
                store.transition_run(f"r{index}", trigger, reason="setup")
            ids.append(conversation_id)
        stopped = store.stop_runs(["r1", "gone", "r2", "r0"], reason="shutdown")
        assert [(run.id, run.status, run.reason) for run in stopped] == [
            ("r1", Status.PAUSED, "shutdown"),
            ("r0", Status.PAUSED, "shutdown"),
        ]
        statuses = [store.get_conversation(cid).status for cid in ids]
        assert statuses == [Status.PAUSED, Status.PAUSED, Status.FINISHED]
        last = _events(store, ids[1])[-1].payload
        assert (last.kind, last.previous, last.reason) == ("status", Status.RUNNING, "shutdown")  # type: ignore[union-attr]
        assert store.stop_runs(["r1"], reason="again") == []
    finally:
        store.close()


def _events(store: SqliteStore, conversation_id: str) -> list[Event]:
    from app.store.base import EventQuery

    return store.search_events(conversation_id, EventQuery(limit=1000)).items
