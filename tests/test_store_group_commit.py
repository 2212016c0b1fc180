"""Group commit (``app/store/group_commit.py``): writes of many threads share a transaction.

Batches are made deterministic by holding the write lock (``Connections.locked_writer``)
while the writers queue up — ``waiting_writes()`` tells when they all wait — and releasing
it: the leader then commits every waiting write in one transaction. Store listeners are
called once per committed transaction, so their calls show the batches.

The store-level tests run on each engine (``tests/store_kinds.py``); those that need
SQLite's own faults (a full disk, a savepoint SQLite refuses to undo, a killed process's
file) stay SQLite-only.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.errors import NotFound
from app.events import Event, MessagePayload, Source
from app.store import EventQuery, NewConversation, SqliteStore
from app.store.faults import StoreUnavailable
from app.store.sql_store import SqlStore
from tests.store_kinds import any_store_fixture, store_opener_fixture
from tests.test_store_faults import open_connections
from tests.tiny_fs import TinyFs, tiny_tmpfs

HANG = 30.0  # seconds: only to turn a hang into a failure

store = any_store_fixture()
store_opener = store_opener_fixture()


def create(store: SqlStore) -> str:
    agent = {"kind": "script", "steps": []}
    return store.create_conversation(NewConversation(agent, "t", 5))[0].id


def say(store: SqlStore, conversation_id: str, text: str) -> Event:
    return store.append_event(conversation_id, None, Source.AGENT, MessagePayload(text=text))


def seqs(store: SqlStore, conversation_id: str) -> list[int]:
    return [e.seq for e in store.search_events(conversation_id, EventQuery(limit=1000)).items]


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@contextmanager
def one_batch(store: SqlStore, writes: int) -> Iterator[ThreadPoolExecutor]:
    """Hold the write lock while the block submits ``writes`` writes from a pool of
    threads; release it once all of them wait: they commit as one batch."""
    with ThreadPoolExecutor(max_workers=writes) as pool, store._db.locked_writer():
        yield pool
        wait_until(lambda: store._db.waiting_writes() == writes)


def listen(store: SqlStore) -> list[list[Event]]:
    calls: list[list[Event]] = []
    store.add_listener(calls.append)
    return calls


def results(futures: list[Future[Any]]) -> list[Any]:
    return [future.result(timeout=HANG) for future in futures]


# -- batches -----------------------------------------------------------------------------


def test_waiting_writes_commit_together(store: SqlStore) -> None:
    """Appends waiting at the same time are committed in one transaction (one listener
    call), each returning its own event with the next seq of its conversation."""
    conversations = [create(store) for _ in range(8)]
    calls = listen(store)
    with one_batch(store, 16) as pool:
        futures = [pool.submit(say, store, c, f"{c}:{i}") for i in range(2) for c in conversations]
    events = results(futures)
    assert len(calls) == 1
    assert sorted(e.id for e in calls[0]) == sorted(e.id for e in events)
    for conversation_id in conversations:
        assert sorted(e.seq for e in events if e.conversation_id == conversation_id) == [1, 2]
        assert seqs(store, conversation_id) == [1, 2]


def test_a_failing_write_fails_alone(store: SqlStore) -> None:
    """In one batch, an append to a missing conversation and a save_progress of a missing
    run raise NotFound in their own callers; the other writes commit, with gapless seqs,
    and listeners never see the failed ones."""
    kept = create(store)
    calls = listen(store)
    with one_batch(store, 5) as pool:
        first = pool.submit(say, store, kept, "one")
        lost = pool.submit(say, store, "no-such-conversation", "lost")
        second = pool.submit(say, store, kept, "two")
        progress = pool.submit(store.save_progress, "no-such-run", steps=1, agent_state={})
        third = pool.submit(say, store, kept, "three")
    with pytest.raises(NotFound, match="no-such-conversation"):
        lost.result(timeout=HANG)
    with pytest.raises(NotFound, match="no-such-run"):
        progress.result(timeout=HANG)
    assert sorted(e.seq for e in results([first, second, third])) == [1, 2, 3]
    assert [len(call) for call in calls] == [3]
    assert {e.conversation_id for e in calls[0]} == {kept}
    assert seqs(store, kept) == [1, 2, 3]
    assert store.get_conversation(kept).event_count == 3


def test_a_failing_write_is_rolled_back_to_its_savepoint(store: SqlStore) -> None:
    """A write that changed rows and then raised loses its changes only: the writes before
    and after it in the batch are committed."""
    first, middle, last = (create(store) for _ in range(3))

    def retitle(conversation_id: str, title: str, fail: bool = False) -> Callable[..., None]:
        def work(connection: Any) -> None:
            sql = "UPDATE conversations SET title = ? WHERE id = ?"
            connection.execute(sql, (title, conversation_id))
            if fail:
                raise LookupError("after a change")

        return work

    works = (retitle(first, "a"), retitle(middle, "half", fail=True), retitle(last, "b"))
    with one_batch(store, 3) as pool:
        futures = [pool.submit(store._db.submit, work) for work in works]
    with pytest.raises(LookupError, match="after a change"):
        futures[1].result(timeout=HANG)
    results([futures[0], futures[2]])
    with store._read() as connection:
        titles = [store._conversation(connection, c).title for c in (first, middle, last)]
    assert titles == ["a", "t", "b"]


def test_a_write_whose_savepoint_cannot_be_undone_fails_alone(tmp_path: Path) -> None:
    """When ROLLBACK TO fails too, the write gets its own error (noted), the transaction is
    discarded with its connection, and the other writes of the batch commit in a fresh one."""
    conns = open_connections(tmp_path / "items.sqlite3")
    original = LookupError("the write's own error")

    def break_rollbacks(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO items (text) VALUES ('half')")
        connection.set_progress_handler(lambda: 1, 1)  # SQLite aborts every statement now
        raise original

    def insert(text: str) -> Callable[[sqlite3.Connection], object]:
        return lambda connection: connection.execute("INSERT INTO items (text) VALUES (?)", (text,))

    with closing(conns), ThreadPoolExecutor(max_workers=3) as pool:
        works = (insert("a"), break_rollbacks, insert("b"))
        with conns.locked_writer():
            futures = [pool.submit(conns.submit, work) for work in works]
            wait_until(lambda: conns.waiting_writes() == 3)
        with pytest.raises(LookupError) as caught:
            futures[1].result(timeout=HANG)
        assert caught.value is original
        assert "ROLLBACK TO the write's savepoint failed too" in caught.value.__notes__[0]
        results([futures[0], futures[2]])
        with conns.read() as connection:
            texts = [row[0] for row in connection.execute("SELECT text FROM items ORDER BY id")]
        assert texts == ["a", "b"]
        assert conns.health().ok


def test_listeners_see_commit_order(store: SqlStore) -> None:
    """Many threads appending to few conversations: the listener calls, concatenated,
    hold every event once, each conversation's seqs exactly 1..N in order."""
    conversations = [create(store) for _ in range(3)]
    calls = listen(store)
    per_thread, threads = 40, 12

    def append_many(number: int) -> None:
        for i in range(per_thread):
            say(store, conversations[(number + i) % 3], f"{number}:{i}")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results([pool.submit(append_many, n) for n in range(threads)])
    seen: dict[str, list[int]] = {c: [] for c in conversations}
    for call in calls:
        for event in call:
            seen[event.conversation_id].append(event.seq)
    assert sum(len(s) for s in seen.values()) == per_thread * threads
    for conversation_id, got in seen.items():
        assert got == list(range(1, len(got) + 1))
        assert seqs(store, conversation_id)[-1] == len(got)


def test_acknowledged_writes_survive_reopening(store_opener: Callable[..., SqlStore]) -> None:
    """Every append acknowledged to any of many threads is in the database after the store
    is closed and opened again, with no gap in any conversation."""
    store = store_opener()
    conversations = [create(store) for _ in range(10)]
    acked: list[tuple[str, int]] = []

    def append_many(conversation_id: str) -> None:
        for i in range(30):
            acked.append((conversation_id, say(store, conversation_id, f"m{i}").seq))

    with ThreadPoolExecutor(max_workers=20) as pool:
        results([pool.submit(append_many, conversations[n % 10]) for n in range(20)])
    store.close()
    reopened = store_opener()
    for conversation_id in conversations:
        mine = sorted(seq for c, seq in acked if c == conversation_id)
        assert mine == list(range(1, 61)) == seqs(reopened, conversation_id)


# -- storage faults ----------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[TinyFs]:
    with tiny_tmpfs(tmp_path / "data") as disk:
        yield disk


def test_storage_error_fails_the_whole_batch_then_writes_work(disk: TinyFs) -> None:
    """On a full disk the batch's COMMIT fails: every write of it raises its own
    StoreUnavailable and nothing of it is saved; once space returns the next append gets
    the next seq."""
    store = SqliteStore(disk.path / "trellis.sqlite3")
    try:
        conversation_id = create(store)
        say(store, conversation_id, "before")
        disk.fill()
        with one_batch(store, 4) as pool:
            futures = [pool.submit(say, store, conversation_id, f"lost {i}") for i in range(4)]
        errors = []
        for future in futures:
            with pytest.raises(StoreUnavailable) as caught:
                future.result(timeout=HANG)
            errors.append(caught.value)
        assert len({id(error) for error in errors}) == 4  # one exception object per caller
        assert all(isinstance(e.__cause__, sqlite3.OperationalError) for e in errors)
        assert store.health().failures == 1  # one transaction failed
        assert seqs(store, conversation_id) == [1]
        disk.free()
        assert say(store, conversation_id, "after").seq == 2
        assert seqs(store, conversation_id) == [1, 2]
        assert store.health().ok
    finally:
        store.close()


# -- a process killed while appending ----------------------------------------------------

_CHILD = """
import sys, threading
from app.events import MessagePayload, Source
from app.store import NewConversation, SqliteStore

store = SqliteStore(sys.argv[1])
ids = [store.create_conversation(NewConversation({"kind": "script", "steps": []}, "t", 5))[0].id
       for _ in range(8)]
lock = threading.Lock()

def append(conversation_id):
    for i in range(100_000):
        event = store.append_event(conversation_id, None, Source.AGENT, MessagePayload(text=str(i)))
        with lock:
            sys.stdout.write(f"{conversation_id} {event.seq}\\n")
            sys.stdout.flush()

for n in range(16):
    threading.Thread(target=append, args=(ids[n % 8],)).start()
"""


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_append(tmp_path: Path) -> None:
    """A process appending from 16 threads is SIGKILLed: every seq it acknowledged (told
    its parent over a pipe, after append_event returned) is in the file, and no
    conversation has a gap."""
    path = tmp_path / "trellis.sqlite3"
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: dict[str, int] = {}
    try:
        assert child.stdout is not None
        for count, line in enumerate(child.stdout):
            conversation_id, seq = line.split()
            acked[conversation_id] = max(acked.get(conversation_id, 0), int(seq))
            if count == 2_000:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=HANG)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with closing(sqlite3.connect(path)) as conn:
        for conversation_id, last_acked in acked.items():
            stored = [
                row[0]
                for row in conn.execute(
                    "SELECT seq FROM events WHERE conversation_id = ? ORDER BY seq",
                    (conversation_id,),
                )
            ]
            assert stored == list(range(1, len(stored) + 1))  # no gap
            assert len(stored) >= last_acked
            (last_seq,) = conn.execute(
                "SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            assert last_seq == len(stored)


# -- the baseline switch -----------------------------------------------------------------


def test_without_group_commit_each_write_commits_alone(
    store_opener: Callable[..., SqlStore],
) -> None:
    """``group_commit=False`` (the benchmark's baseline): waiting appends commit one
    transaction each."""
    store = store_opener(group_commit=False)
    conversation_id = create(store)
    calls = listen(store)
    writers = [threading.Thread(target=say, args=(store, conversation_id, "x")) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=HANG)
    assert [len(call) for call in calls] == [1, 1, 1, 1]
    assert seqs(store, conversation_id) == [1, 2, 3, 4]
