"""The PostgreSQL schema of the store, and its versioned migrations.

Tables and columns are SQLite's (``app/store/schema.py``), so the shared SQL runs on both:
timestamps are ISO 8601 ``TEXT`` and JSON is ``TEXT``, as there; ``n`` columns are
identities. Two differences:

- The ``q`` filter's index is ``events_text_trgm``, a ``pg_trgm`` GIN index on
  ``events.text`` (``gin_trgm_ops``): it serves ``ILIKE '%q%'`` for any ``q`` of 3+
  characters and is maintained by every insert (no ``events_text`` table; the column
  ``conversations.indexed_seq``, SQLite's index watermark, is kept for the shared append
  statement and stays 0).
- ``trellis_agent_kind(text)``: a summary's agent kind from the spec's JSON, NULL when it
  is not JSON (SQLite: ``json_valid``/``json_extract``).

For the cluster (``app/cluster/nodes.py``): ``runs.node`` (the node that claimed a run)
and ``nodes`` (one row per live node, its lease). A lease's times are ``TIMESTAMPTZ`` set
by the database's ``now()``, never by a node's clock: nodes whose clocks disagree still
agree on which lease has expired.

Versions: one row in ``trellis_schema``. At start, in one transaction under an advisory
lock (several nodes may start at once; the second waits and then finds nothing to do):
a database without the table gets :data:`SCHEMA` and version :data:`SCHEMA_VERSION`; an
older one gets :data:`_MIGRATIONS` step by step; a newer one is refused with nothing
changed. Tables are created in the connection's current schema (the first of its
``search_path``), never a hard-coded one.
"""

from __future__ import annotations

from typing import Any

import psycopg

#: 1: the first shape (SQLite schema version 5, plus runs.node and nodes); 2: the
#: index runs_active_by_conversation (the cluster queue).
SCHEMA_VERSION = 2

#: The advisory lock of migrations: a constant and the hash of the current schema (the
#: run queue's locks, ``app/store/claims.py``, use other keys).
_MIGRATION_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtext('trellis.migrate'), hashtext(current_schema()))"
)

SCHEMA = """
CREATE TABLE conversations (
    n               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the list cursor
    id              TEXT NOT NULL UNIQUE,
    title           TEXT,
    status          TEXT NOT NULL,
    agent           TEXT NOT NULL,                      -- JSON agent spec
    agent_state     TEXT NOT NULL DEFAULT '{}',         -- JSON, owned by the agent kind
    max_iterations  INTEGER NOT NULL,
    workspace       TEXT,                               -- directory name; null = the id
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_seq        BIGINT NOT NULL DEFAULT 0,          -- seq of the newest event = count
    prompt_tokens   BIGINT NOT NULL DEFAULT 0,          -- summed over llm_call events
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    current_run_id  TEXT,
    webhook         TEXT,                               -- JSON {"url": ...}; null = none
    tenant          TEXT NOT NULL DEFAULT 'default',    -- who may see it (app/principal.py)
    indexed_seq     BIGINT NOT NULL DEFAULT 0           -- SQLite's; always 0 here
);
CREATE INDEX conversations_by_status ON conversations (status, n);
CREATE INDEX conversations_by_tenant ON conversations (tenant, n);

CREATE TABLE runs (
    n               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- creation order
    id              TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    status          TEXT NOT NULL,
    reason          TEXT,
    queued_at       TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    steps           INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    node            TEXT                                -- the node that claimed it
);
CREATE INDEX runs_by_conversation ON runs (conversation_id, n);
CREATE INDEX runs_active ON runs (status) WHERE status IN ('queued', 'running', 'pausing');
-- A conversation's first active run, for the cluster queue (app/store/claims.py).
CREATE INDEX runs_active_by_conversation ON runs (conversation_id, n)
    WHERE status IN ('queued', 'running', 'pausing');

CREATE TABLE events (                                   -- column order: appends.py inserts
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    id              TEXT NOT NULL UNIQUE,
    run_id          TEXT,
    timestamp       TEXT NOT NULL,
    source          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,                      -- JSON, includes "kind"
    text            TEXT NOT NULL,                      -- what the q filter searches
    PRIMARY KEY (conversation_id, seq)
);
CREATE INDEX events_by_kind ON events (conversation_id, kind, seq);
CREATE INDEX events_by_source ON events (conversation_id, source, seq);
CREATE INDEX events_by_run ON events (conversation_id, run_id, seq);
CREATE INDEX events_text_trgm ON events USING gin (text gin_trgm_ops);

CREATE TABLE idempotency_keys (
    key             TEXT PRIMARY KEY,
    request_hash    TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    created_at      TEXT NOT NULL,
    answer          TEXT              -- JSON {status, headers, body}: the first answer
);

CREATE TABLE health_probe (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    probed_at       TEXT NOT NULL
);

CREATE TABLE nodes (                                    -- app/cluster/nodes.py
    id              TEXT PRIMARY KEY,                   -- store.node_id
    address         TEXT NOT NULL,                      -- the URL it serves on, or ''
    max_concurrent_runs INTEGER NOT NULL,
    running         INTEGER NOT NULL DEFAULT 0,
    started_at      TIMESTAMPTZ NOT NULL,               -- the database's now()
    last_heartbeat  TIMESTAMPTZ NOT NULL                -- the database's now()
);

-- A summary's agent kind: the spec's "kind", NULL when the spec is not JSON (or its kind
-- cannot be text); json, not jsonb, so an escaped NUL elsewhere in the spec is no error.
CREATE FUNCTION trellis_agent_kind(spec TEXT) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN spec::json ->> 'kind';
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

CREATE TABLE trellis_schema (version INTEGER NOT NULL);
"""

#: What brings a database of version N (the key) to version N + 1 (none yet).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # the cluster queue asks "is this the conversation's first active run?" for every
    # queued run it looks at: without this index that is a scan of the active runs for
    # each (600 queued: 26 ms a claim; with it and claims.CLAIMABLE's min() form: 0.9 ms)
    1: (
        "CREATE INDEX IF NOT EXISTS runs_active_by_conversation ON runs (conversation_id, n)"
        " WHERE status IN ('queued', 'running', 'pausing')",
    ),
}


def initialize(connection: psycopg.Connection[Any]) -> None:
    """Create the schema, or migrate it, in one transaction under the migration lock
    (``connection`` in autocommit mode, no transaction open).

    Errors: ``RuntimeError`` for a database written by a newer Trellis, or when
    ``pg_trgm`` is missing and cannot be created (nothing is changed).
    """
    with connection.transaction():
        connection.execute(_MIGRATION_LOCK)
        version = _version(connection)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {version}, newer than this Trellis"
                f" understands ({SCHEMA_VERSION}); upgrade Trellis or use another database"
            )
        if version == SCHEMA_VERSION:
            return
        _create_trigram_extension(connection)
        if version == 0:
            connection.execute(SCHEMA)
            connection.execute(
                "INSERT INTO trellis_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
            )
            return
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                connection.execute(statement)
        connection.execute("UPDATE trellis_schema SET version = %s", (SCHEMA_VERSION,))


def _version(connection: psycopg.Connection[Any]) -> int:
    """The schema version in the current schema (0: no store there yet)."""
    exists = connection.execute(
        "SELECT 1 FROM pg_tables WHERE schemaname = current_schema()"
        " AND tablename = 'trellis_schema'"
    ).fetchone()
    if exists is None:
        return 0
    row = connection.execute("SELECT version FROM trellis_schema").fetchone()
    return 0 if row is None else int(row[0])


def _create_trigram_extension(connection: psycopg.Connection[Any]) -> None:
    """``pg_trgm`` (a trusted extension: a database owner may create it), if missing."""
    if connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone():
        return
    try:
        with connection.transaction():  # a savepoint: the error leaves the rest usable
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except psycopg.Error as error:
        raise RuntimeError(
            f"the store needs the PostgreSQL extension pg_trgm, and it cannot be created"
            f" ({str(error).strip().splitlines()[0]}); ask the database's owner to run"
            " CREATE EXTENSION pg_trgm, or install the postgresql-contrib package"
        ) from error
