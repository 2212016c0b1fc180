"""The SQLite schema and the per-connection settings of the embedded store.

Indexes are chosen for the queries the API makes at millions of events: every event query
is scoped to one conversation and ordered by ``seq``, so each index starts with
``(conversation_id, …)`` and ends with ``seq``. The ``q`` filter has an index of its own,
``events_text`` (FTS5, trigram tokenizer: any substring of 3+ characters); its rowid is the
conversation's ``n`` in the high 32 bits and the event's ``seq`` below
(:data:`TEXT_ROWID_BITS`), so one conversation's events are one rowid range, in ``seq``
order. It is filled in batches, not per event: each event added to FTS5 in its own
transaction writes a new index segment (measured: 80 µs an event without the index, 385 µs
with a trigger adding each event). A conversation's events up to ``indexed_seq`` are in the
index; the newer ones — fewer than ``app.store.appends.TEXT_INDEX_EVERY`` — are matched by a
scan (``app/store/queries.py``), and the append that reaches that count indexes them all in
one statement. Why these pragmas and indexes, with measurements: docs/architecture.md, §8.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

# 2: health_probe table, idempotency_keys.answer; 3: conversations.webhook;
# 4: conversations.tenant (and its index); 5: events_text (the q index) and its triggers;
# 6: runs.node (the node that claimed a run: always null here, see app/cluster/nodes.py)
SCHEMA_VERSION = 6

#: ``events_text.rowid = conversations.n << TEXT_ROWID_BITS | events.seq``.
TEXT_ROWID_BITS = 32


def searchable(text: str) -> str:
    """``text`` as ``events.text`` stores it and ``q`` is matched: NUL (which ends a string
    for FTS5 and SQLite's text functions) becomes U+FFFF, in the text and in ``q`` alike.
    Events stored before v5 keep their NULs: their index stops at the first one."""
    return text.replace("\x00", "\uffff")


SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    n               INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: the list cursor
    id              TEXT NOT NULL UNIQUE,
    title           TEXT,
    status          TEXT NOT NULL,
    agent           TEXT NOT NULL,                      -- JSON agent spec
    agent_state     TEXT NOT NULL DEFAULT '{}',         -- JSON, owned by the agent kind
    max_iterations  INTEGER NOT NULL,
    workspace       TEXT,                               -- directory name; null = the id
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_seq        INTEGER NOT NULL DEFAULT 0,         -- seq of the newest event = count
    prompt_tokens   INTEGER NOT NULL DEFAULT 0,         -- summed over llm_call events
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    current_run_id  TEXT,
    webhook         TEXT,                               -- JSON {"url": ...}; null = none
    tenant          TEXT NOT NULL DEFAULT 'default',    -- who may see it (app/principal.py)
    indexed_seq     INTEGER NOT NULL DEFAULT 0          -- events up to it are in events_text
);
CREATE INDEX IF NOT EXISTS conversations_by_status ON conversations (status, n);

CREATE TABLE IF NOT EXISTS runs (
    n               INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order
    id              TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    status          TEXT NOT NULL,
    reason          TEXT,
    queued_at       TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    steps           INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    node            TEXT                                -- PostgreSQL's; always null here
);
CREATE INDEX IF NOT EXISTS runs_by_conversation ON runs (conversation_id, n);
CREATE INDEX IF NOT EXISTS runs_active ON runs (status)
    WHERE status IN ('queued', 'running', 'pausing');

CREATE TABLE IF NOT EXISTS events (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    id              TEXT NOT NULL UNIQUE,
    run_id          TEXT,
    timestamp       TEXT NOT NULL,
    source          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,                      -- JSON, includes "kind"
    text            TEXT NOT NULL,                      -- what the q filter searches
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_kind ON events (conversation_id, kind, seq);
CREATE INDEX IF NOT EXISTS events_by_source ON events (conversation_id, source, seq);
CREATE INDEX IF NOT EXISTS events_by_run ON events (conversation_id, run_id, seq);

-- The q filter's index: every substring of 3+ characters of events.text, case-folded.
-- Contentless (the text stays in events only); rowid: see TEXT_ROWID_BITS. The text holds
-- no NUL (see searchable()), which would end it early for FTS5. Filled in batches up to
-- conversations.indexed_seq (app/store/appends.py).
CREATE VIRTUAL TABLE IF NOT EXISTS events_text USING fts5 (
    text, content = '', tokenize = 'trigram', columnsize = 0
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    key             TEXT PRIMARY KEY,
    request_hash    TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    created_at      TEXT NOT NULL,
    answer          TEXT              -- JSON {status, headers, body}: the first answer
) WITHOUT ROWID;

-- One row, rewritten by Connections.probe(): a write that touches no user data, so that
-- readiness learns that writes work again (space returned) even when nobody else writes.
CREATE TABLE IF NOT EXISTS health_probe (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at       TEXT NOT NULL
);
"""

#: The probe's write: insert the one row, or rewrite it (parameter: the time, ISO 8601).
PROBE_WRITE = (
    "INSERT INTO health_probe (id, probed_at) VALUES (1, ?)"
    " ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at"
)


def connect(path: Path) -> sqlite3.Connection:
    """Open a connection with the settings every connection needs.

    ``synchronous`` is per connection (forgetting it on one connection cost 5x in our
    measurements). ``NORMAL`` in WAL mode never loses a committed transaction when the
    *process* dies (SIGKILL); only a power cut can lose the last few.
    ``check_same_thread=False``: the store guarantees that a connection is used by one
    thread at a time (the writer under its lock, readers one per thread); it also lets
    ``close()`` close every connection from the closing thread.
    """
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.create_function("trellis_contains", 2, contains, deterministic=True)
    for pragma in PRAGMAS:
        connection.execute(f"PRAGMA {pragma}")
    return connection


#: Per-connection settings beyond durability, each measured (docs/architecture.md, §8):
#: checkpoint the WAL every ~40 MB instead of every ~4 MB (pages that many commits rewrite
#: are copied to the database once; fewer checkpoint fsyncs), and truncate it back to
#: 64 MB after a checkpoint so one burst does not keep a huge file.
PRAGMAS = ("wal_autocheckpoint = 10000", "journal_size_limit = 67108864")


def contains(text: str | None, q: str | None) -> bool:
    """SQL ``trellis_contains(text, q)``: the ``q`` match of events not yet in the text index
    (case-insensitive per code point, as the trigram tokenizer folds case)."""
    return text is not None and q is not None and q.lower() in text.lower()


def initialize(connection: sqlite3.Connection) -> None:
    """Switch the file to WAL (stored in the file), create what is missing and bring a
    file of an older version up to date (:data:`_MIGRATIONS`, in one transaction).

    Errors: ``RuntimeError`` for a file written by a newer Trellis (nothing is changed).
    """
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database has schema version {version}, newer than this Trellis"
            f" understands ({SCHEMA_VERSION}); upgrade Trellis or use another data_dir"
        )
    connection.execute("PRAGMA journal_mode = WAL")
    connection.executescript(SCHEMA)
    with connection:  # the steps and the new version: all or nothing (rolled back on error)
        connection.execute("BEGIN IMMEDIATE")
        for step in range(version or SCHEMA_VERSION, SCHEMA_VERSION):  # a new file: none
            for statement in _MIGRATIONS[step]:
                connection.execute(statement)
        for index in _LATE_INDEXES:
            connection.execute(index)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


#: What brings a file of version N (the key) to version N + 1. ``SCHEMA`` creates missing
#: tables whole, so a step only changes tables that an older version already had.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # keys keep the first answer (old keys have none: no replay)
    1: ("ALTER TABLE idempotency_keys ADD COLUMN answer TEXT",),
    # a conversation may name a webhook (old conversations have none)
    2: ("ALTER TABLE conversations ADD COLUMN webhook TEXT",),
    # conversations belong to a tenant (old ones to the default tenant)
    3: ("ALTER TABLE conversations ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",),
    # the q index: SCHEMA created it empty; index the old events
    4: ("ALTER TABLE conversations ADD COLUMN indexed_seq INTEGER NOT NULL DEFAULT 0",),
    # the run record's node, as on PostgreSQL (one process owns a SQLite file: null)
    5: ("ALTER TABLE runs ADD COLUMN node TEXT",),
}

#: Every event into the text index, in one statement per table (a new file, the v5
#: migration, a bulk-loaded benchmark store).
INDEX_ALL_TEXT = (
    "INSERT INTO events_text (events_text) VALUES ('delete-all')",
    "INSERT INTO events_text (rowid, text) SELECT c.n << 32 | e.seq, e.text"
    " FROM events AS e JOIN conversations AS c ON c.id = e.conversation_id",
    "UPDATE conversations SET indexed_seq = last_seq",
)
_MIGRATIONS[4] += INDEX_ALL_TEXT

#: What refers to columns a migration adds: created after the migrations (``SCHEMA`` runs
#: first, when an old file does not have the column yet). A tenant's list is its
#: conversations newest first. Events go only with their conversation (ON DELETE CASCADE):
#: the indexed ones leave the text index first (a contentless index must be told the text).
_LATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS conversations_by_tenant ON conversations (tenant, n)",
    "CREATE TRIGGER IF NOT EXISTS events_text_forget BEFORE DELETE ON conversations BEGIN"
    " INSERT INTO events_text (events_text, rowid, text)"
    " SELECT 'delete', old.n << 32 | seq, text FROM events"
    " WHERE conversation_id = old.id AND seq <= old.indexed_seq;"
    " END",
)
