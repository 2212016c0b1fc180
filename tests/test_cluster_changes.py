"""Other nodes' changes (app/cluster/changes.py, app/store/change_notes.py), on a real
PostgreSQL: change notes sent at COMMIT, cached records forgotten, streams fed in order.

Two nodes are two ``PostgresStore``s on one ``postgres_url``, each with its own supervisor,
in one Trio test (as tests/test_cluster_nodes.py). A subscriber is read directly from the
feed (``feed.subscribe``: every event must arrive there, once, in seq order) or through
``follow_conversation``, which the SSE and WebSocket streams render.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from app.cluster import notifications
from app.events import Event, MessagePayload, Source, StatusPayload
from app.lifecycle import Status
from app.live.feed import LocalFeed, StreamEnd, Subscription
from app.live.follow import follow_conversation
from app.settings import Settings
from app.store.base import EventPage, EventQuery, NewConversation, NewRun
from app.store.change_notes import ChangeNote, change_notes
from app.store.postgres import PostgresStore
from app.supervisor import RunSupervisor, open_run_supervisor
from tests import pg
from tests.conftest import new_conversation, script

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def node(tmp_path: Path, name: str, url: str) -> AsyncIterator[RunSupervisor]:
    """A node: its own store on ``url`` and its own supervisor (closed after)."""
    settings = Settings(data_dir=tmp_path / name, max_concurrent_runs=2, max_queued_runs=3)
    store = PostgresStore(url)
    try:
        async with open_run_supervisor(settings, store) as sup:
            yield sup
    finally:
        store.close()


@asynccontextmanager
async def two_nodes(tmp_path: Path, url: str) -> AsyncIterator[tuple[RunSupervisor, RunSupervisor]]:
    """Nodes A and B on the same database."""
    async with node(tmp_path, "a", url) as a, node(tmp_path, "b", url) as b:
        yield a, b


def say(text: str) -> MessagePayload:
    return MessagePayload(text=text)


async def append(sup: RunSupervisor, conversation_id: str, *texts: str) -> list[int]:
    """Append messages through the node's own store; their seqs."""
    seqs = []
    for text in texts:
        event = await sup.io(sup.store.append_event, conversation_id, None, Source.USER, say(text))
        seqs.append(event.seq)
    return seqs


async def received(subscription: Subscription, until: Callable[[Event], bool]) -> list[Event]:
    """Events from the subscription up to the first one ``until`` accepts."""
    events: list[Event] = []
    while True:
        item = await subscription.receive()
        assert not isinstance(item, StreamEnd), item
        if isinstance(item, Event):
            events.append(item)
            if until(item):
                return events


def seq_at_least(seq: int) -> Callable[[Event], bool]:
    return lambda event: event.seq >= seq


def is_finished(event: Event) -> bool:
    return isinstance(event.payload, StatusPayload) and event.payload.status is Status.FINISHED


def listener_backend(node_id: str) -> str:
    """The ``application_name`` of a node's changes listener (pg_stat_activity)."""
    return f"trellis-changes-{node_id}"


# -- the notes ------------------------------------------------------------------------------


def test_change_notes_one_per_conversation_with_its_last_seq_and_count() -> None:
    """A transaction's notes: one per touched conversation, with the last seq of its events
    and how many there were (0, 0 for a record change without events); they parse back."""
    events = [
        Event.model_construct(conversation_id=cid, seq=seq)
        for cid, seq in [("a", 4), ("b", 9), ("a", 5), ("a", 6)]
    ]
    notes = change_notes("n1", {"a", "b", "c"}, events)
    parsed = sorted((ChangeNote.parse(note) for note in notes), key=str)
    assert parsed == sorted(
        [ChangeNote("n1", "a", 6, 3), ChangeNote("n1", "b", 9, 1), ChangeNote("n1", "c", 0, 0)],
        key=str,
    )
    assert parsed[0] is not None and parsed[0].seq_before == 3
    assert [ChangeNote.parse(bad) for bad in ["", "n1", "n1 a 1", "n1 a x 1"]] == [None] * 4


async def test_a_rolled_back_transaction_announces_nothing(
    postgres_url: str,
) -> None:
    """Notes are sent inside the transaction: a committed one announces its conversations
    at COMMIT, one rolled back (here: a duplicate run id after the conversation and its
    message were inserted) announces nothing."""
    store = PostgresStore(postgres_url)
    assert store.changes_channel is not None
    with closing(store), psycopg.connect(postgres_url, autocommit=True) as listening:
        listening.execute(f'LISTEN "{store.changes_channel}"')
        first, _ = store.create_conversation(
            NewConversation(script(), "a", 5, initial_message="hi", run=NewRun("r1"))
        )
        with pytest.raises(psycopg.errors.UniqueViolation):
            store.create_conversation(
                NewConversation(script(), "b", 5, id="gone", initial_message="hi", run=NewRun("r1"))
            )
        marker = store.append_event(first.id, None, Source.USER, say("marker"))
        notes = []
        for notification in listening.notifies(timeout=10):
            note = ChangeNote.parse(notification.payload)
            assert note is not None
            notes.append((note.conversation_id, note.last_seq, note.count))
            if note.last_seq == marker.seq:
                break
    # created with its message (seq 1) and its run's queued status (seq 2); then the marker
    assert notes == [(first.id, 2, 2), (first.id, 3, 1)]


# -- streams across nodes -------------------------------------------------------------------


async def test_a_subscriber_on_another_node_gets_every_event_in_order(
    tmp_path: Path, postgres_url: str
) -> None:
    """A run on node A (a script saying ten things): node B's feed subscriber and a
    follower (what B's streams send) get every event, in seq order, none twice, up to the
    final status."""
    steps = [{"say": f"line {i}"} for i in range(10)]
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            conversation = await new_conversation(sup_a, script(*steps))
            followed: list[Event] = []

            async def follow() -> None:
                items = follow_conversation(sup_b, conversation.id, 0, None)
                async with aclosing(items) as batches:
                    async for batch in batches:
                        followed.extend(item for item in batch if isinstance(item, Event))
                        if followed and is_finished(followed[-1]):
                            return

            sup_b.set_limits(max_concurrent_runs=0)  # the run is claimed by A
            with sup_b.feed.subscribe(conversation.id) as subscription:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow)
                    await sup_a.start_run(conversation.id)
                    events = await received(subscription, is_finished)
            stored = sup_a.store.search_events(conversation.id, EventQuery(limit=100)).items
    assert len(stored) == 10 + 3  # the lines, then queued, running and finished
    assert [event.seq for event in events] == [event.seq for event in stored]
    assert [event.id for event in events] == [event.id for event in stored]
    assert [item.seq for item in followed] == [event.seq for event in stored]


async def test_another_nodes_changes_leave_no_stale_cached_record(
    tmp_path: Path, postgres_url: str
) -> None:
    """Node B cached two conversations before node A changed them: one B's stream follows
    (A runs it), one nobody follows (A appends to it first). Once B's stream has shown the
    final status, B's records show both changes (status, event count)."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            b = sup_b.store
            conversation = await new_conversation(sup_a, script({"say": "one"}, {"say": "two"}))
            quiet = await new_conversation(sup_a, script())
            for record in (conversation, quiet):
                before = await sup_b.io(b.get_conversation, record.id)
                assert b.cached_conversation(record.id) == before
                assert (before.status, before.event_count) == (Status.IDLE, 0)
            sup_b.set_limits(max_concurrent_runs=0)  # the run is claimed by A
            with sup_b.feed.subscribe(conversation.id) as subscription:
                await append(sup_a, quiet.id, "unseen")
                await sup_a.start_run(conversation.id)
                events = await received(subscription, is_finished)
            assert b.cached_conversation(quiet.id) is None  # forgotten before the stream fed
            after = await sup_b.io(b.get_conversation, conversation.id)
            after_quiet = await sup_b.io(b.get_conversation, quiet.id)
    assert (after.status, after.event_count) == (Status.FINISHED, events[-1].seq)
    assert after.run is not None and after.run.status is Status.FINISHED
    assert after_quiet.event_count == 1


async def test_a_node_ignores_its_own_notes(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A's own commits reach its subscribers once, through its store's listener: its
    changes part neither reads them back nor forgets its (fresh) cached record. A's notes
    come before B's later one on A's connection, so once B's event has reached A, A's own
    notes have been handled."""
    reads: list[str] = []
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            search_events = sup_a.store.search_events

            def counted(conversation_id: str, query: EventQuery) -> EventPage:
                reads.append(conversation_id)
                return search_events(conversation_id, query)

            monkeypatch.setattr(sup_a.store, "search_events", counted)
            own = await new_conversation(sup_a, script())
            other = await new_conversation(sup_b, script())
            await sup_a.io(sup_a.store.get_conversation, own.id)
            with (
                sup_a.feed.subscribe(own.id) as mine,
                sup_a.feed.subscribe(other.id) as theirs,
            ):
                seqs = await append(sup_a, own.id, "one", "two", "three")
                (barrier,) = await append(sup_b, other.id, "after them")
                await received(theirs, seq_at_least(barrier))
                events = await received(mine, seq_at_least(seqs[-1]))
                cached = sup_a.store.cached_conversation(own.id)
    assert [event.seq for event in events] == seqs
    assert cached is not None and cached.event_count == seqs[-1]
    assert own.id not in reads
    assert reads.count(other.id) >= 1  # the other node's event was read back


class CutOff:
    """Ends a node's listening session and holds its reconnection until :meth:`reconnect`
    (its listener's backoff is replaced by a gate): what is committed in between is lost
    to that node, deterministically."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate, self.waiting = threading.Event(), threading.Event()
        monkeypatch.setattr(notifications, "backoff_seconds", self._backoff)

    def _backoff(self, *args: Any, **kwargs: Any) -> float:
        self.waiting.set()
        self.gate.wait(30)
        return 0.0

    async def cut(self, url: str, node_id: str) -> None:
        """End the node's changes listener; return once it waits to reconnect."""
        assert pg.terminate_sessions(url, f"trellis-changes-{node_id}") == [True]
        assert await trio.to_thread.run_sync(self.waiting.wait, 10)

    def reconnect(self) -> None:
        self.gate.set()


@pytest.fixture
def cut_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[CutOff]:
    cut_off = CutOff(monkeypatch)
    yield cut_off
    cut_off.reconnect()  # never leave a listener's thread waiting


async def test_a_subscriber_gets_what_was_sent_while_the_listener_was_disconnected(
    tmp_path: Path, postgres_url: str, cut_off: CutOff
) -> None:
    """B's listening session is terminated; A appends while B cannot reconnect, so those
    notes are lost. Once B is back it re-reads what it follows from the watermark: its
    subscriber gets every event, once, in order."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            conversation = await new_conversation(sup_a, script())
            with sup_b.feed.subscribe(conversation.id) as subscription:
                early = await append(sup_a, conversation.id, "1", "2", "3")
                events = await received(subscription, seq_at_least(early[-1]))
                await cut_off.cut(postgres_url, sup_b.store.node_id)
                lost = await append(sup_a, conversation.id, "4", "5", "6")
                cut_off.reconnect()
                events += await received(subscription, seq_at_least(lost[-1]))
                later = await append(sup_a, conversation.id, "7")
                events += await received(subscription, seq_at_least(later[-1]))
    assert [event.seq for event in events] == [*early, *lost, *later]
    assert [event.seq for event in events] == list(range(1, 8))


async def test_lost_notes_before_any_delivery_bring_the_newest_event(
    tmp_path: Path, postgres_url: str, cut_off: CutOff
) -> None:
    """A subscription that had nothing delivered yet when notes were lost has no watermark
    to re-read from: it gets the conversation's newest event, so that its stream notices
    what it missed and reads it from the store (follow's gap rule)."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            conversation = await new_conversation(sup_a, script())
            with sup_b.feed.subscribe(conversation.id) as subscription:
                await cut_off.cut(postgres_url, sup_b.store.node_id)
                lost = await append(sup_a, conversation.id, "1", "2", "3")
                cut_off.reconnect()
                events = await received(subscription, seq_at_least(lost[-1]))
    assert [event.seq for event in events] == [lost[-1]]


@pytest.mark.parametrize("delivered", [True, False], ids=["after-an-event", "before-any"])
async def test_a_conversation_deleted_on_another_node_ends_its_subscriptions(
    tmp_path: Path, postgres_url: str, delivered: bool
) -> None:
    """A deletes a conversation B follows: B's subscription ends with ``deleted`` — after
    an event delivered, or before any (no watermark: only its existence is read)."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            conversation = await new_conversation(sup_a, script())
            with sup_b.feed.subscribe(conversation.id) as subscription:
                if delivered:
                    (seq,) = await append(sup_a, conversation.id, "hello")
                    assert [e.seq for e in await received(subscription, seq_at_least(seq))] == [1]
                await sup_a.io(sup_a.store.delete_conversation, conversation.id)
                end = await subscription.receive()
    assert end == StreamEnd("deleted")


async def test_the_feed_delivers_an_event_once_whichever_way_it_came() -> None:
    """An event that reaches the feed twice (committed here, and read back after another
    node's note) is delivered once: the feed drops what is at or below its watermark."""
    feed = LocalFeed()
    feed.open()
    events = [Event.model_construct(conversation_id="c", seq=seq) for seq in range(1, 5)]
    with feed.subscribe("c") as subscription:
        assert feed.watermark("c") is None
        feed.assume_delivered("c", 1)  # its subscriber's replay has seq 1
        feed.deliver(events[:3])
        feed.deliver(events[1:])
        got = [await subscription.receive() for _ in range(3)]
        assert feed.watermark("c") == 4
    assert [event.seq for event in got] == [2, 3, 4]  # type: ignore[union-attr]
    assert feed.watermark("c") is None  # forgotten with its last subscriber


async def test_two_nodes_writing_one_conversation_stream_it_once_in_order(
    tmp_path: Path, postgres_url: str
) -> None:
    """A and B append to the same conversation in turn while B's stream follows it: the
    stream gets every event once, in seq order (B's own event may reach B's feed before
    an earlier one of A's: the stream then reads the gap from the store)."""
    with trio.fail_after(30):
        async with two_nodes(tmp_path, postgres_url) as (sup_a, sup_b):
            conversation = await new_conversation(sup_a, script())
            seqs: list[int] = []

            async def follow() -> None:
                items = follow_conversation(sup_b, conversation.id, 0, None)
                async with aclosing(items) as batches:
                    async for batch in batches:
                        seqs.extend(item.seq for item in batch if isinstance(item, Event))
                        if len(seqs) >= 20:
                            return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await trio.testing.wait_all_tasks_blocked()  # subscribed, replay read
                assert sup_b.feed.is_followed(conversation.id)
                for i in range(20):
                    await append(sup_a if i % 2 else sup_b, conversation.id, str(i))
    assert seqs == list(range(1, 21))
