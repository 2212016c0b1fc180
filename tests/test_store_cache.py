"""The store's write-through cache of conversation records (app/store/cache.py), on each
engine (``tests/store_kinds.py``)."""

from __future__ import annotations

import threading
from typing import Any

from app.events import MessagePayload, Source
from app.lifecycle import Status, Trigger
from app.records import ConversationRecord
from app.store import NewConversation
from app.store.cache import RecordCache
from app.store.queries import conversation_from_row, conversation_row
from app.store.sql_store import SqlStore
from tests.store_kinds import any_store_fixture

store = any_store_fixture()


def create(store: SqlStore) -> ConversationRecord:
    new = NewConversation(agent={"kind": "script", "steps": [{"say": "x"}]}, title=None,
                          max_iterations=5)  # fmt: skip
    return store.create_conversation(new)[0]


def fresh(store: SqlStore, conversation_id: str) -> ConversationRecord:
    """What the database says, through a read connection (no cache involved)."""
    with store._read() as connection:
        row = conversation_row(connection, conversation_id)
    assert row is not None
    return conversation_from_row(row)


def test_cache_fills_on_first_read_only(store: SqlStore) -> None:
    """A conversation enters the cache when it is first read, not when it is created."""
    conversation = create(store)
    assert store.cached_conversation(conversation.id) is None
    assert store.get_conversation(conversation.id) == conversation
    assert store.cached_conversation(conversation.id) == conversation


def test_cache_follows_every_kind_of_write(store: SqlStore) -> None:
    """Events, run transitions, progress and deletion all show in the cached record."""
    conversation_id = create(store).id
    store.get_conversation(conversation_id)
    store.append_event(conversation_id, None, Source.USER, MessagePayload(text="hi"))
    assert store.cached_conversation(conversation_id) == fresh(store, conversation_id)
    store.create_run(conversation_id, run_id="r1", activate=True, reason="user")
    store.transition_run("r1", Trigger.START, reason="started")
    store.save_progress("r1", steps=3, agent_state={"next_step": 1})
    cached = store.cached_conversation(conversation_id)
    assert cached == fresh(store, conversation_id)
    assert cached is not None and cached.run is not None
    assert (cached.status, cached.run.steps, cached.event_count) == (Status.RUNNING, 3, 3)
    store.delete_conversation(conversation_id)
    assert store.cached_conversation(conversation_id) is None


class PausingRead:
    """Wraps a store's ``_conversation`` to pause one chosen thread right after it has read
    a conversation (a gate)."""

    def __init__(self, store: SqlStore) -> None:
        self.paused_thread: threading.Thread | None = None
        self.has_read = threading.Event()
        self.resume = threading.Event()
        self._read = store._conversation
        store._conversation = self  # type: ignore[method-assign]

    def __call__(self, conn: Any, conversation_id: str) -> ConversationRecord:
        record = self._read(conn, conversation_id)
        if threading.current_thread() is self.paused_thread:
            self.has_read.set()
            self.resume.wait(timeout=10)
        return record


def test_cache_miss_fill_cannot_overwrite_a_newer_write(store: SqlStore) -> None:
    """A reader that read before a write committed cannot put its older record in the cache.

    The reader is held between its read and its cache fill while a writer appends; a correct
    store makes the writer wait for the fill (both hold the write lock), so the writer's
    refresh comes last.
    """
    pausing = PausingRead(store)
    conversation_id = create(store).id
    reader = threading.Thread(target=store.get_conversation, args=(conversation_id,))
    writer_done = threading.Event()

    def write() -> None:
        store.append_event(conversation_id, None, Source.USER, MessagePayload(text="new"))
        writer_done.set()

    writer = threading.Thread(target=write)
    pausing.paused_thread = reader
    reader.start()
    assert pausing.has_read.wait(timeout=10)
    writer.start()
    # A correct store blocks the writer here; a broken one lets it finish at once.
    writer_done.wait(timeout=0.5)
    pausing.resume.set()
    reader.join()
    writer.join()
    assert store.cached_conversation(conversation_id) == fresh(store, conversation_id)


def test_record_cache_evicts_the_oldest_entry() -> None:
    """Past its capacity the cache forgets the record filled first."""
    cache = RecordCache(capacity=2)
    records = [
        ConversationRecord(
            id=str(i),
            title=None,
            status=Status.IDLE,
            agent={},
            max_iterations=1,
            workspace=str(i),
            created_at="2026-01-01T00:00:00Z",
            updated_at="2026-01-01T00:00:00Z",
            event_count=0,
            run=None,
        )
        for i in range(3)
    ]
    for record in records:
        cache.put(record)
    assert (cache.get("0"), cache.get("1"), cache.get("2")) == (None, records[1], records[2])
    assert len(cache) == 2


def test_a_big_transaction_drops_what_it_touched_instead_of_refreshing(
    store: SqlStore,
) -> None:
    """A commit that touches more cached conversations than it re-reads (a drain's
    stop_runs) leaves none of them stale: dropped, then read fresh; a small one refreshes."""
    conversations = [create(store).id for _ in range(70)]
    for n, conversation_id in enumerate(conversations):
        store.create_run(conversation_id, run_id=f"r{n}", activate=True, reason="user")
        store.get_conversation(conversation_id)  # cached
    store.stop_runs([f"r{n}" for n in range(70)], reason="shutdown")
    assert all(store.cached_conversation(c) is None for c in conversations)
    for conversation_id in conversations:
        assert store.get_conversation(conversation_id) == fresh(store, conversation_id)
        assert store.cached_conversation(conversation_id) == fresh(store, conversation_id)
    assert fresh(store, conversations[0]).status is Status.PAUSED
    store.create_run(conversations[0], run_id="again", activate=True, reason="user")
    store.stop_runs(["again"], reason="shutdown")  # one conversation: refreshed in place
    assert store.cached_conversation(conversations[0]) == fresh(store, conversations[0])
