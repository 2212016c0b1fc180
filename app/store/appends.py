"""Appending an event: what the caller's thread prepares, and the SQL the writer runs.

Group commit (``app/store/group_commit.py``) runs many threads' appends one after another
in one transaction, so the part done there — under the write lock, in the leader's thread —
is kept to the two statements that must see the transaction (the next ``seq``, the insert)
and the event record. Everything else (the payload's JSON, its searchable text, the event
id, the status and token columns) is computed before queueing, in :meth:`NewEvent.of`, by
the appending thread. The text index (``events_text``, see ``app/store/schema.py``) gets a
conversation's events in batches: the append that leaves :data:`TEXT_INDEX_EVERY` of them
unindexed adds them all in one statement.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass

from app.events import (
    Event,
    LLMCallPayload,
    Payload,
    Source,
    StatusPayload,
    searchable_text,
    utc_now,
)
from app.store.schema import searchable

_BUMP_CONVERSATION = (
    "UPDATE conversations SET last_seq = last_seq + 1, updated_at = ?,"
    " status = COALESCE(?, status), current_run_id = COALESCE(?, current_run_id),"
    " prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?"
    " WHERE id = ? RETURNING last_seq, indexed_seq, n"
)
_INDEX_TAIL = (
    "INSERT INTO events_text (rowid, text) SELECT ? << 32 | seq, text FROM events"
    " WHERE conversation_id = ? AND seq > ?"
)

#: A conversation's newest events, fewer than this, wait outside the text index (a search
#: with ``q`` scans them); one FTS5 insert per event would write an index segment each.
TEXT_INDEX_EVERY = 256
_INSERT_EVENT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event ready to insert: everything but its ``seq`` and time."""

    conversation_id: str
    run_id: str | None
    source: Source
    payload: Payload
    id: str
    payload_json: str
    text: str  # what the q filter searches (searchable_text, schema.searchable)
    status: str | None  # a status payload also sets the conversation's status
    tokens: tuple[int, int]  # (prompt, completion) an llm_call adds to the usage
    current_run_id: str | None  # set as the conversation's current run (activation)

    @classmethod
    def of(
        cls,
        conversation_id: str,
        run_id: str | None,
        source: Source,
        payload: Payload,
        current_run_id: str | None = None,
    ) -> NewEvent:
        """Prepare in the appending thread (no I/O, no lock)."""
        return cls(
            conversation_id=conversation_id,
            run_id=run_id,
            source=source,
            payload=payload,
            id=str(uuid.uuid4()),
            payload_json=payload.model_dump_json(),
            text=searchable(searchable_text(payload)),
            status=payload.status.value if isinstance(payload, StatusPayload) else None,
            tokens=(
                (payload.prompt_tokens, payload.completion_tokens)
                if isinstance(payload, LLMCallPayload)
                else (0, 0)
            ),
            current_run_id=current_run_id,
        )


def insert_event(conn: sqlite3.Connection, new: NewEvent) -> Event | None:
    """Give ``new`` the conversation's next ``seq`` and insert it (write transaction open);
    ``None`` when the conversation does not exist (nothing changed)."""
    now = utc_now()
    timestamp = now.isoformat()
    row = conn.execute(
        _BUMP_CONVERSATION,
        (timestamp, new.status, new.current_run_id, *new.tokens, new.conversation_id),
    ).fetchone()
    if row is None:
        return None
    seq, indexed_seq, number = row
    conn.execute(
        _INSERT_EVENT,
        (
            new.conversation_id,
            seq,
            new.id,
            new.run_id,
            timestamp,
            new.source.value,
            new.payload.kind,
            new.payload_json,
            new.text,
        ),
    )
    if seq - indexed_seq >= TEXT_INDEX_EVERY:
        index_text(conn, new.conversation_id, number, indexed_seq)
    # Built without re-validation: every field was produced or validated here.
    return Event.model_construct(
        id=new.id,
        conversation_id=new.conversation_id,
        seq=seq,
        run_id=new.run_id,
        timestamp=now,
        source=new.source,
        payload=new.payload,
    )


def index_text(conn: sqlite3.Connection, conversation_id: str, number: int, after: int) -> None:
    """Add the conversation's events after seq ``after`` to the text index (one statement;
    ``number``: the conversation's ``n``) and mark them indexed."""
    conn.execute(_INDEX_TAIL, (number, conversation_id, after))
    conn.execute("UPDATE conversations SET indexed_seq = last_seq WHERE id = ?", (conversation_id,))
