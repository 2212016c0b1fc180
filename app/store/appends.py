"""Appending an event: what the caller's thread prepares, and the SQL the writer runs.

Group commit (``app/store/group_commit.py``) runs many threads' appends one after another
in one transaction, so the part done there — under the write lock, in the leader's thread —
is kept to the two statements that must see the transaction (the next ``seq``, the insert)
and the event record. Everything else (the payload's JSON, its searchable text, the event
id, the status and token columns) is computed before queueing, in :meth:`NewEvent.of`, by
the appending thread. What the ``q`` filter's index needs after an insert is the engine's
(:meth:`~app.store.engine.TextSearch.after_append`: SQLite indexes a conversation's events
in batches, ``app/store/text_search.py``; PostgreSQL's index needs nothing).
"""

from __future__ import annotations

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
from app.store.engine import Connection, TextSearch
from app.store.schema import searchable

_BUMP_CONVERSATION = (
    "UPDATE conversations SET last_seq = last_seq + 1, updated_at = ?,"
    " status = COALESCE(?, status), current_run_id = COALESCE(?, current_run_id),"
    " prompt_tokens = prompt_tokens + ?, completion_tokens = completion_tokens + ?"
    " WHERE id = ? RETURNING last_seq, indexed_seq, n"
)
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


def insert_event(conn: Connection, new: NewEvent, text: TextSearch) -> Event | None:
    """Give ``new`` the conversation's next ``seq`` and insert it (write transaction open);
    ``None`` when the conversation does not exist (nothing changed).

    The ``seq`` comes from the conversation's row (``UPDATE … RETURNING``), which the
    transaction then holds locked until it ends: other writers — other threads' batches,
    other processes on the same PostgreSQL database — wait for it, and get the next one."""
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
    text.after_append(conn, new.conversation_id, number, seq, indexed_seq)
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
