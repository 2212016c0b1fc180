"""What only the PostgreSQL store has: its schema versions, several stores ("nodes") on one
database, a lost connection, NUL characters (``app/store/postgres.py``, ``pg_schema.py``,
``pg_connection.py``). The behaviour it shares with SQLite is tested on both engines by
the store suites (``tests/store_kinds.py``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from app.events import MessagePayload, Source
from app.lifecycle import Trigger
from app.store import EventQuery, NewConversation, StoreUnavailable
from app.store.idempotency import IdempotentWrite
from app.store.pg_connection import NUL_ESCAPE, escape_nul, unescape_nul
from app.store.pg_schema import SCHEMA_VERSION
from app.store.postgres import PostgresStore

HANG = 30.0  # seconds: only to turn a hang into a failure


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement on a connection of its own (as another program), committed."""
    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def create(store: PostgresStore, title: str | None = "t") -> str:
    agent = {"kind": "script", "steps": []}
    return store.create_conversation(NewConversation(agent, title, 5))[0].id


def say(store: PostgresStore, conversation_id: str, text: str) -> int:
    return store.append_event(conversation_id, None, Source.AGENT, MessagePayload(text=text)).seq


def writer_pid(store: PostgresStore) -> int:
    """The server process of the store's writer connection."""
    with store._db.locked_writer() as writer:
        pid: int = writer.raw.info.backend_pid  # type: ignore[attr-defined]
    return pid


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(postgres_url)
    yield store
    store.close()


def wait_for(condition: Any) -> None:
    """Poll ``condition()`` (a state another thread reaches) until it holds; fail after
    :data:`HANG` seconds instead of hanging."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, "the awaited state was never reached"
        threading.Event().wait(0.005)


# -- schema versions ---------------------------------------------------------------------


def test_schema_version_is_recorded(store: PostgresStore, postgres_url: str) -> None:
    """A new database gets one version row, the code's version, and the trigram index."""
    assert sql(postgres_url, "SELECT version FROM trellis_schema") == [(SCHEMA_VERSION,)]
    indexes = sql(postgres_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'events'")
    assert any("gin_trgm_ops" in row[0] for row in indexes)
    tables = {
        row[0]
        for row in sql(
            postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }
    assert {"conversations", "runs", "events", "idempotency_keys", "nodes"} <= tables


def test_a_newer_schema_is_refused_and_left_alone(postgres_url: str) -> None:
    """A database of a newer version than the code: RuntimeError naming both versions,
    and nothing changed (version, rows)."""
    first = PostgresStore(postgres_url)
    kept = create(first)
    first.close()
    sql(postgres_url, "UPDATE trellis_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError) as caught:
        PostgresStore(postgres_url)
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}, newer" in message
    assert f"understands ({SCHEMA_VERSION})" in message
    assert sql(postgres_url, "SELECT version FROM trellis_schema") == [(SCHEMA_VERSION + 1,)]
    assert sql(postgres_url, "SELECT id FROM conversations") == [(kept,)]


def test_a_version_1_database_is_migrated(postgres_url: str) -> None:
    """Version 1 (no runs_active_by_conversation): opening it adds the index and records
    the current version; its rows are kept."""
    first = PostgresStore(postgres_url)
    kept = create(first)
    first.close()
    sql(postgres_url, "DROP INDEX runs_active_by_conversation")
    sql(postgres_url, "UPDATE trellis_schema SET version = 1")
    PostgresStore(postgres_url).close()
    assert sql(postgres_url, "SELECT version FROM trellis_schema") == [(SCHEMA_VERSION,)]
    index = "SELECT 1 FROM pg_indexes WHERE indexname = 'runs_active_by_conversation'"
    assert sql(postgres_url, index) == [(1,)]
    assert sql(postgres_url, "SELECT id FROM conversations") == [(kept,)]


def test_two_stores_starting_at_once_migrate_once(postgres_url: str) -> None:
    """Two stores opening a fresh schema at the same moment: the second waits for the
    first's migration (advisory lock) and finds nothing to do; both work."""
    lock = "hashtext('trellis.migrate'), hashtext(current_schema())"
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute(f"SELECT pg_advisory_lock({lock})")  # both starts queue behind it
        with ThreadPoolExecutor(max_workers=2) as pool:
            opening = [pool.submit(PostgresStore, postgres_url) for _ in range(2)]
            wait_for(lambda: sql(postgres_url, waiting) == [(2,)])
            holder.execute(f"SELECT pg_advisory_unlock({lock})")
            stores = [future.result(timeout=HANG) for future in opening]
    try:
        assert sql(postgres_url, "SELECT version FROM trellis_schema") == [(SCHEMA_VERSION,)]
        conversation_id = create(stores[0])
        assert say(stores[1], conversation_id, "hello") == 1
    finally:
        for opened in stores:
            opened.close()


# -- several nodes -----------------------------------------------------------------------


def test_two_nodes_appending_to_one_conversation_get_gapless_seqs(postgres_url: str) -> None:
    """Two stores (two nodes' writers) appending to one conversation from many threads:
    seqs are exactly 1..N, no gap, no duplicate, each thread's in order."""
    nodes = [PostgresStore(postgres_url) for _ in range(2)]
    try:
        conversation_id = create(nodes[0])
        start = threading.Barrier(8)

        def append_many(number: int) -> list[int]:
            node = nodes[number % 2]
            start.wait(timeout=HANG)
            return [say(node, conversation_id, f"{number}:{i}") for i in range(40)]

        with ThreadPoolExecutor(max_workers=8) as pool:
            got = [f.result(timeout=HANG) for f in [pool.submit(append_many, n) for n in range(8)]]
        everything = list(range(1, 8 * 40 + 1))
        assert sorted(seq for seqs in got for seq in seqs) == everything
        assert all(seqs == sorted(seqs) for seqs in got)
        page = nodes[1].search_events(conversation_id, EventQuery(limit=1000))
        assert [event.seq for event in page.items] == everything
        assert nodes[0].get_conversation(conversation_id).event_count == len(everything)
    finally:
        for node in nodes:
            node.close()


def test_two_nodes_batches_that_deadlock_run_again(postgres_url: str) -> None:
    """Two nodes' batches lock two conversations in opposite orders: PostgreSQL aborts one
    to break the deadlock, and that batch runs again whole; every append succeeds, each
    conversation's seqs are 1, 2."""
    nodes = [PostgresStore(postgres_url) for _ in range(2)]
    try:
        first, second = create(nodes[0]), create(nodes[0])
        with (
            psycopg.connect(postgres_url) as blocker,
            ThreadPoolExecutor(max_workers=4) as pool,
        ):
            # Both rows locked elsewhere: each node's batch waits on its first row, then
            # takes it the moment the blocker commits, and reaches for the other's.
            blocker.execute("SELECT 1 FROM conversations FOR UPDATE")
            futures = []
            for node, order in ((nodes[0], (first, second)), (nodes[1], (second, first))):
                with node._db.locked_writer():  # both writes of a node in one batch
                    for queued, conversation_id in enumerate(order, start=1):
                        # One at a time: a batch runs its writes in the order they queued.
                        futures.append(pool.submit(say, node, conversation_id, "x"))
                        wait_for(lambda n=node, q=queued: n._db.waiting_writes() == q)
            waiting = (
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
            )
            wait_for(lambda: sql(postgres_url, waiting) == [(2,)])
            blocker.commit()
            seqs = [future.result(timeout=HANG) for future in futures]
        assert sorted(seqs) == [1, 1, 2, 2]
        for conversation_id in (first, second):
            page = nodes[1].search_events(conversation_id, EventQuery())
            assert [event.seq for event in page.items] == [1, 2]
    finally:
        for node in nodes:
            node.close()


# -- a lost connection -------------------------------------------------------------------


def test_a_killed_writer_connection_is_unavailable_then_replaced(
    store: PostgresStore, postgres_url: str
) -> None:
    """The server ends the writer's session: that write raises StoreUnavailable (nothing
    saved) and health says so; the next write opens a new connection and works."""
    conversation_id = create(store)
    assert say(store, conversation_id, "before") == 1
    pid = writer_pid(store)
    assert sql(postgres_url, "SELECT pg_terminate_backend(%s, 10000)", (pid,)) == [(True,)]
    with pytest.raises(StoreUnavailable) as caught:
        say(store, conversation_id, "lost")
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    health = store.health()
    assert (health.ok, health.failures) == (False, 1)
    assert say(store, conversation_id, "after") == 2
    assert store.health().ok
    page = store.search_events(conversation_id, EventQuery())
    assert [event.payload.text for event in page.items] == ["before", "after"]  # type: ignore[union-attr]


def test_probe_notices_a_lost_writer_and_its_replacement(
    store: PostgresStore, postgres_url: str
) -> None:
    """With nobody else writing, probe() finds the writer's session gone (health not ok,
    never an exception), and the next probe, on a new connection, finds writes work."""
    create(store)
    assert sql(postgres_url, "SELECT pg_terminate_backend(%s, 10000)", (writer_pid(store),))
    lost = store.probe()
    assert (lost.ok, lost.failures) == (False, 1)
    assert store.probe().ok


def test_reads_survive_their_pooled_connections_being_killed(
    store: PostgresStore, postgres_url: str
) -> None:
    """A database restart ends every pooled reader's session: the next reads borrow,
    find them dead, and connect anew — no read fails for it."""
    conversation_id = create(store)
    say(store, conversation_id, "kept")
    with ThreadPoolExecutor(max_workers=4) as pool:  # several readers in the pool
        list(pool.map(lambda _: store.search_events(conversation_id, EventQuery()), range(8)))
    writer = writer_pid(store)
    killed = sql(
        postgres_url,
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
        " WHERE application_name = 'trellis' AND pid <> %s AND datname = current_database()",
        (writer,),
    )
    assert killed and all(ok for (ok,) in killed)
    for _ in range(len(killed) + 1):
        page = store.search_events(conversation_id, EventQuery())
        assert [event.payload.text for event in page.items] == ["kept"]  # type: ignore[union-attr]


def test_an_unreachable_database_fails_at_opening() -> None:
    """No server at the URL: opening raises psycopg's OperationalError (nothing to close)."""
    with pytest.raises(psycopg.OperationalError):
        PostgresStore("postgresql://postgres@127.0.0.1:1/none?connect_timeout=2")


# -- NUL characters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "plain", "a\x00b", "\x00", NUL_ESCAPE, NUL_ESCAPE + "0", "\x00" + NUL_ESCAPE + "\x00"],
)
def test_nul_escape_round_trips(text: str) -> None:
    """The escape is undone exactly, and the escaped text holds no NUL."""
    assert "\x00" not in escape_nul(text)
    assert unescape_nul(escape_nul(text)) == text


def test_nul_characters_round_trip_through_every_text_column(store: PostgresStore) -> None:
    """Titles, run reasons and errors, idempotency keys and event text with NULs (which
    PostgreSQL's text cannot hold) come back as they went in, and q finds them."""
    title = "a\x00title " + NUL_ESCAPE
    conversation_id = create(store, title)
    assert store.get_conversation(conversation_id).title == title
    listed = store.list_conversations(status=None, limit=10, cursor=None).items
    assert [item.title for item in listed] == [title]  # type: ignore[union-attr]
    run, _ = store.create_run(conversation_id, run_id="r\x001", activate=True, reason="why\x00")
    store.transition_run(run.id, Trigger.START, reason="go")
    failed = store.transition_run(run.id, Trigger.FAIL, reason="x\x00", error="bad\x00thing")
    assert (failed.reason, failed.error) == ("x\x00", "bad\x00thing")
    assert store.get_run(conversation_id, "r\x001").error == "bad\x00thing"
    keyed = IdempotentWrite("key\x00", "hash", lambda written: None)
    store.append_message(conversation_id, MessagePayload(text="nul\x00here"), idempotent=keyed)
    page = store.search_events(conversation_id, EventQuery(q="nul\x00he"))
    assert [event.payload.text for event in page.items] == ["nul\x00here"]  # type: ignore[union-attr]
    assert store.purge_idempotency_keys("9999", "key\x00") == 1
