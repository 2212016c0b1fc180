"""What a run start costs the Trio thread: no thread creation there, no idle hops.

These are behaviour tests, not timings (timings live in ``bench/``): they check *what*
happens on the Trio thread while runs start — which threads it creates, which callbacks
another thread queues for it — on a real store and a real supervisor.
"""

from __future__ import annotations

import contextvars
import gc
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from app.events import Event, MessagePayload, Source
from app.lifecycle import Status, Trigger
from app.live.feed import LocalFeed
from app.records import ConversationRecord, RunRecord
from app.settings import Settings
from app.store import EventQuery, NewConversation, SqliteStore
from app.supervisor import open_run_supervisor
from app.testing import Gates, gated_registry
from tests.conftest import assert_all_returned, gated, new_conversation

pytestmark = pytest.mark.timeout(30)


def _in_plain_thread(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a thread Trio does not know, and wait for it *blocking* this thread:
    whatever ``fn`` queues for the Trio thread is still queued when this returns."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()


async def test_a_commit_nobody_follows_queues_nothing_for_the_trio_thread(tmp_path: Path) -> None:
    """The feed hands a commit's events to the Trio thread only when someone follows the
    conversation; once someone does, they arrive."""
    store = SqliteStore(tmp_path / "store.db")
    feed = LocalFeed(buffer_events=10)
    feed.open()
    store.add_listener(feed.publish)
    try:
        with trio.fail_after(10):
            created = []

            def create() -> None:
                new = NewConversation(agent=gated(), title=None, max_iterations=1)
                created.append(store.create_conversation(new)[0])

            _in_plain_thread(create)
            conversation_id = created[0].id

            def say(text: str) -> Callable[[], None]:
                return lambda: store.append_event(
                    conversation_id, None, Source.USER, MessagePayload(text=text)
                )

            _in_plain_thread(say("nobody follows"))
            assert trio.lowlevel.current_statistics().run_sync_soon_queue_size == 0

            with feed.subscribe(conversation_id) as subscription:
                _in_plain_thread(say("followed"))
                assert trio.lowlevel.current_statistics().run_sync_soon_queue_size == 1
                event = await subscription.receive()
            assert isinstance(event, Event) and isinstance(event.payload, MessagePayload)
            assert event.payload.text == "followed"
    finally:
        store.close()


async def test_starting_runs_creates_no_thread_on_the_trio_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run thread leaves a spare worker behind for the next run: once runs are
    going, admitting and starting one more creates no thread on the Trio thread (where
    ``Thread.start`` blocks until the new thread runs)."""
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_runs=8, max_queued_runs=8)
    store = SqliteStore(settings.database_path)
    gates = Gates()
    trio_thread = threading.get_ident()
    started_here: list[str] = []
    original_start = threading.Thread.start

    def spying_start(thread: threading.Thread) -> None:
        if threading.get_ident() == trio_thread:
            started_here.append(thread.name)
        original_start(thread)

    try:
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            with trio.fail_after(20):
                for index in range(6):
                    if index == 2:  # the first runs may find no spare yet
                        monkeypatch.setattr(threading.Thread, "start", spying_start)
                    conversation = await new_conversation(sup, gated(f"g{index}"))
                    await sup.start_run(conversation.id)
                    await gates[f"g{index}"].wait_entered()
                monkeypatch.undo()
                assert started_here == []
                gates.release_all()
        assert_all_returned(sup)
    finally:
        monkeypatch.undo()
        gates.release_all()
        store.close()


class _RequestLike:
    """Stands for what a request's context holds (Quart's request object and its body)."""


#: Set by the test around an admission, as Quart sets its request context around a handler.
ADMITTING_CONTEXT: contextvars.ContextVar[_RequestLike | None] = contextvars.ContextVar(
    "admitting", default=None
)


async def test_a_run_does_not_keep_the_admitting_requests_context_alive(tmp_path: Path) -> None:
    """The run task starts in a context of its own: what the admitting request had in its
    context is freed when the request ends, not kept for as long as the run lasts."""
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_runs=2, max_queued_runs=2)
    gates = Gates()
    store = SqliteStore(settings.database_path)
    try:
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            with trio.fail_after(10):
                conversation = await new_conversation(sup, gated("hold"))
                request = _RequestLike()
                freed = weakref.ref(request)
                token = ADMITTING_CONTEXT.set(request)
                try:
                    await sup.start_run(conversation.id)
                finally:
                    ADMITTING_CONTEXT.reset(token)
                del request
                await gates["hold"].wait_entered()  # the run is going
                gc.collect()
                assert freed() is None
                gates.release_all()
    finally:
        gates.release_all()
        store.close()


class StartCountingStore(SqliteStore):
    """Counts the run starts written by run threads (``transition_run(START)``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.thread_starts: list[str] = []

    def transition_run(self, run_id: str, trigger: Trigger, **kwargs: Any) -> RunRecord:
        if trigger is Trigger.START:
            self.thread_starts.append(run_id)
        return super().transition_run(run_id, trigger, **kwargs)


async def test_a_run_given_a_slot_at_once_is_recorded_running_by_its_admission(
    settings: Settings, gates: Gates
) -> None:
    """Admission records a run that got a slot ``running`` in its own transaction (both
    status events, queued then running), so its thread writes no start; a run that waited
    in the line is started by its thread, as before."""
    store = StartCountingStore(settings.database_path)
    try:
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            with trio.fail_after(10):
                ids = []
                for name in ("g0", "g1", "g2"):  # two slots: g2 waits in the line
                    conversation = await new_conversation(sup, gated(name))
                    run = await sup.start_run(conversation.id)
                    ids.append((conversation.id, run.id))
                assert [run.status for run in [await sup.get_run(*i) for i in ids[:2]]] == [
                    Status.RUNNING,
                    Status.RUNNING,
                ]
                await gates["g0"].wait_entered()
                await gates["g1"].wait_entered()
                assert store.thread_starts == []
                statuses = await sup.io(store.search_events, ids[0][0], EventQuery(kind="status"))
                assert [(e.payload.status, e.seq) for e in statuses.items] == [  # type: ignore[union-attr]
                    (Status.QUEUED, 1),
                    (Status.RUNNING, 2),
                ]
                gates["g0"].release()
                await gates["g2"].wait_entered()
                assert store.thread_starts == [ids[2][1]]
            gates.release_all()
        assert_all_returned(sup)
    finally:
        store.close()


class LookupCountingStore(SqliteStore):
    """Counts the conversation lookups that go to the database (not the cache)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lookups = 0

    def get_conversation(self, conversation_id: str) -> ConversationRecord:
        if self.cached_conversation(conversation_id) is None:
            self.lookups += 1
        return super().get_conversation(conversation_id)


@pytest.mark.parametrize(("quota", "lookups"), [(0, 0), (5, 1)])
async def test_starting_a_run_of_an_uncached_conversation_reads_it_only_for_a_quota(
    settings: Settings, gates: Gates, quota: int, lookups: int
) -> None:
    """Without a tenant quota, admission learns the run's tenant from its own write: the
    start of a conversation that is not cached costs no extra read (and thread hop)."""
    settings = settings.model_copy(update={"tenant_max_active_runs": quota})
    store = LookupCountingStore(settings.database_path)
    try:
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            with trio.fail_after(10):
                new = NewConversation(agent=gated("g"), title=None, max_iterations=5, tenant="acme")
                conversation, _ = await sup.io(store.create_conversation, new)
                assert store.cached_conversation(conversation.id) is None
                run = await sup.start_run(conversation.id)
                assert store.lookups == lookups
                assert sup.run_tenant(run.id) == "acme"
                await gates["g"].wait_entered()
            gates.release_all()
        assert_all_returned(sup)
    finally:
        store.close()
