"""The ``q`` filter's text index (schema v5: ``events_text``, FTS5 trigram) and its migration.

Search and count must answer exactly what a plain scan answers: every case is compared
with a reference computed in Python over the same events — on each engine (``any_store``,
``tests/store_kinds.py``; PostgreSQL's ``pg_trgm`` index has no batches, so the splits of
index and tail are SQLite's). The index's own rows and the v5 migration are SQLite's.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from app.events import ActionPayload, MessagePayload, Payload, Source, StatusPayload
from app.lifecycle import Status
from app.store import EventQuery, NewConversation, SqliteStore
from app.store.base import Order
from app.store.schema import SCHEMA_VERSION
from app.store.sql_store import SqlStore
from app.store.text_search import TEXT_INDEX_EVERY
from tests.store_kinds import any_store_fixture, open_store

any_store = any_store_fixture("any_store")

TEXTS = [
    "Hello World",
    "deploy the service",
    "hello again, world",
    'say "quoted" things',
    "redeploy at noon",
    "nothing here",
    "HELLO loud",
    "deploy",
]


def create(store: SqlStore) -> str:
    agent = {"kind": "script", "steps": []}
    return store.create_conversation(NewConversation(agent, "t", 5))[0].id


def fill(store: SqlStore, conversation_id: str) -> list[tuple[int, str, str]]:
    """Append varied events; returns (seq, kind, text) of each, as the q filter sees it."""
    log = []
    for n, text in enumerate(TEXTS * 3):
        payload: Payload = (
            MessagePayload(text=text)
            if n % 3
            else ActionPayload(call_id=f"c{n}", tool="terminal", arguments={"command": text})
        )
        event = store.append_event(conversation_id, None, Source.AGENT, payload)
        searched = text if n % 3 else f"terminal {text}"
        log.append((event.seq, payload.kind, searched))
    return log


def reference(log: list[tuple[int, str, str]], query: EventQuery) -> list[int]:
    """The seqs a scan returns: ASCII case-insensitive substring, other filters, order."""
    seqs = [
        seq
        for seq, kind, text in log
        if (query.q is None or query.q.lower() in text.lower())
        and (query.kind is None or kind == query.kind)
        and (query.after_seq is None or seq > query.after_seq)
        and (query.before_seq is None or seq < query.before_seq)
    ]
    return seqs if query.order == "asc" else seqs[::-1]


QUERIES = [
    {"q": "hello"},
    {"q": "HeLLo"},
    {"q": "lo wo"},  # across a word boundary
    {"q": "deploy"},
    {"q": '"quoted"'},  # FTS syntax is text here
    {"q": "lo"},  # shorter than a trigram: the scan
    {"q": "deploy", "kind": "action"},
    {"q": "hello", "after_seq": 9},
    {"q": "hello", "before_seq": 20, "order": "desc"},
    {"q": "deploy", "after_seq": 3, "before_seq": 20, "kind": "message"},
    {"q": "zzz"},
    {},  # counted from last_seq, as are seq bounds alone
    {"after_seq": 5},
    {"after_seq": 3, "before_seq": 10},
    {"before_seq": 1000},
    {"after_seq": 1000},
]


def index_up_to(path: Path, conversation_id: str, seq: int) -> None:
    """Put the conversation's events up to ``seq`` in the text index, as the append that
    fills a batch does (here at any point, to test each split of index and tail)."""
    with closing(sqlite3.connect(path)) as conn, conn:
        (number,) = conn.execute(
            "SELECT n FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        conn.execute(
            "INSERT INTO events_text (rowid, text) SELECT ? << 32 | seq, text FROM events"
            " WHERE conversation_id = ? AND seq <= ?",
            (number, conversation_id, seq),
        )
        conn.execute(
            "UPDATE conversations SET indexed_seq = ? WHERE id = ?", (seq, conversation_id)
        )


#: Where each engine's events are when searched: SQLite's in the text index, in the tail
#: outside it, or split; PostgreSQL's trigram index has no batches.
PLACES = [
    *(pytest.param("sqlite", where, id=f"sqlite-{where}") for where in ("none", "half", "all")),
    pytest.param("postgres", "none", id="postgres"),
]


@pytest.mark.parametrize(("kind", "indexed"), PLACES)
@pytest.mark.parametrize("fields", QUERIES, ids=[str(q) for q in QUERIES])
def test_q_search_and_count_match_a_scan(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kind: str,
    indexed: str,
    fields: dict[str, Any],
) -> None:
    """Search pages and counts with q (alone and with kind/seq bounds/order) or seq bounds
    alone equal the reference scan, and another conversation's events never show up —
    whether the events are in the text index, in the tail outside it, or split."""
    store = open_store(request, kind, tmp_path)
    request.addfinalizer(store.close)
    other = create(store)
    fill(store, other)
    conversation_id = create(store)
    log = fill(store, conversation_id)
    for conversation in (other, conversation_id):
        split = {"none": 0, "half": len(log) // 2, "all": len(log)}[indexed]
        if split:
            index_up_to(store.path, conversation, split)
    query = EventQuery(**fields, limit=4)
    expected = reference(log, query)
    got: list[int] = []
    page_query = query
    while True:
        page = store.search_events(conversation_id, page_query)
        got += [event.seq for event in page.items]
        assert all(event.conversation_id == conversation_id for event in page.items)
        if page.next_seq is None:
            break
        bound = "after_seq" if query.order == "asc" else "before_seq"
        page_query = query.model_copy(update={bound: page.next_seq})
    assert got == expected
    assert store.count_events(conversation_id, query) == len(expected)


def test_q_folds_case_beyond_ascii(any_store: SqlStore) -> None:
    """With the index (3+ characters), case folding covers non-ASCII letters too."""
    store = any_store
    conversation_id = create(store)
    store.append_event(conversation_id, None, Source.USER, MessagePayload(text="ÉTÉ À PARIS"))
    assert store.count_events(conversation_id, EventQuery(q="été")) == 1
    assert store.count_events(conversation_id, EventQuery(q="à paris")) == 1


def test_q_finds_text_after_a_nul(any_store: SqlStore) -> None:
    """A NUL in an event's text (it would end the string for FTS5) hides nothing after it,
    and a q holding a NUL matches it, as the scan did before the index."""
    store = any_store
    conversation_id = create(store)
    text = "before\x00after the nul"
    store.append_event(conversation_id, None, Source.USER, MessagePayload(text=text))
    for q in ("after the", "re\x00af", "\x00"):
        assert store.count_events(conversation_id, EventQuery(q=q)) == 1, q
        assert len(store.search_events(conversation_id, EventQuery(q=q)).items) == 1, q
    stored = store.search_events(conversation_id, EventQuery()).items[0].payload
    assert stored == MessagePayload(text=text)  # the payload keeps its NUL


def text_hits(path: Path, phrase: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        sql = "SELECT count(*) FROM events_text WHERE events_text MATCH ?"
        return int(conn.execute(sql, (f'"{phrase}"',)).fetchone()[0])


def test_deleting_a_conversation_forgets_its_text(store: SqliteStore) -> None:
    """The index loses a deleted conversation's indexed events (the trigger), not the
    events it never held, and keeps others'."""
    gone, kept = create(store), create(store)
    for conversation_id in (gone, kept):
        for _ in range(TEXT_INDEX_EVERY + 1):  # one batch indexed, one event left outside
            store.append_event(conversation_id, None, Source.USER, MessagePayload(text="unicorn"))
    assert text_hits(store.path, "unicorn") == 2 * TEXT_INDEX_EVERY
    store.delete_conversation(gone)
    assert text_hits(store.path, "unicorn") == TEXT_INDEX_EVERY
    assert store.count_events(kept, EventQuery(q="unicorn")) == TEXT_INDEX_EVERY + 1


def test_events_are_indexed_in_batches_and_found_before(store: SqliteStore) -> None:
    """Events reach the text index TEXT_INDEX_EVERY at a time; until then a q search and
    count still find them (the scan of the tail), in seq order across both parts, also
    with a case-folded non-ASCII q."""
    conversation_id = create(store)
    total = TEXT_INDEX_EVERY + 10
    for n in range(1, total + 1):
        text = f"Été {n}" if n % 2 else f"winter {n}"
        store.append_event(conversation_id, None, Source.USER, MessagePayload(text=text))
    assert text_hits(store.path, "été") == TEXT_INDEX_EVERY // 2
    query = EventQuery(q="éTÉ", limit=500)
    expected = [n for n in range(1, total + 1) if n % 2]
    assert [e.seq for e in store.search_events(conversation_id, query).items] == expected
    assert store.count_events(conversation_id, query) == len(expected)
    newest_first = EventQuery(q="ÉTÉ", limit=3, order=Order.DESC, after_seq=TEXT_INDEX_EVERY - 4)
    page = store.search_events(conversation_id, newest_first)
    assert [e.seq for e in page.items] == expected[::-1][:3]
    both_parts = EventQuery(q="été", after_seq=TEXT_INDEX_EVERY - 4, before_seq=total)
    assert [e.seq for e in store.search_events(conversation_id, both_parts).items] == [
        n for n in expected if TEXT_INDEX_EVERY - 4 < n < total
    ]


def test_a_version_4_file_gets_its_text_index(tmp_path: Path) -> None:
    """A v4 file (no events_text) with events is upgraded on open: old events are found
    by q (search and count), new ones too, and user_version is 6."""
    path = tmp_path / "old.sqlite3"
    store = SqliteStore(path)
    conversation_id = create(store)
    log = fill(store, conversation_id)
    status = StatusPayload(status=Status.IDLE, previous=Status.IDLE, reason="deploy done")
    store.append_event(conversation_id, None, Source.SYSTEM, status)
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN node")  # as version 5 had it
        conn.execute("DROP TRIGGER events_text_forget")
        conn.execute("DROP TABLE events_text")
        conn.execute("ALTER TABLE conversations DROP COLUMN indexed_seq")
        conn.execute("PRAGMA user_version = 4")
        conn.commit()

    migrated = SqliteStore(path)
    try:
        query = EventQuery(q="deploy", limit=100)
        old = [*reference(log, query), len(log) + 1]
        assert [e.seq for e in migrated.search_events(conversation_id, query).items] == old
        assert migrated.count_events(conversation_id, query) == len(old)
        new = migrated.append_event(
            conversation_id, None, Source.USER, MessagePayload(text="deploy again")
        )
        assert migrated.count_events(conversation_id, query) == len(old) + 1
        assert migrated.search_events(conversation_id, query).items[-1].seq == new.seq
    finally:
        migrated.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
