"""SQL that builds rows into records, and the filtered queries of search and listing."""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

from pydantic import TypeAdapter

from app.errors import InvalidInput
from app.events import Event, Payload
from app.lifecycle import Status
from app.records import ConversationRecord, RunRecord, Usage
from app.store.base import EventQuery, Order

_payload_adapter: TypeAdapter[Payload] = TypeAdapter(Payload)

_CURSOR = re.compile(r"[0-9]{1,18}")  # a row number; 18 digits stay inside SQLite's int64

_RUN_COLUMNS = (
    "id",
    "status",
    "reason",
    "queued_at",
    "started_at",
    "finished_at",
    "steps",
    "error",
)

# The conversation with its current run, in one row; run columns are prefixed "run_".
_CONVERSATION_SELECT = (
    "SELECT c.*, "
    + ", ".join(f"r.{column} AS run_{column}" for column in _RUN_COLUMNS)
    + " FROM conversations AS c LEFT JOIN runs AS r ON r.id = c.current_run_id"
)


def conversation_row(conn: sqlite3.Connection, conversation_id: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        _CONVERSATION_SELECT + " WHERE c.id = ?", (conversation_id,)
    ).fetchone()
    return row


def list_conversations(
    conn: sqlite3.Connection, status: Status | None, limit: int, before_n: int | None
) -> list[sqlite3.Row]:
    clauses: list[str] = []
    params: list[Any] = []
    if status is not None:
        clauses.append("c.status = ?")
        params.append(status.value)
    if before_n is not None:
        clauses.append("c.n < ?")
        params.append(before_n)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"{_CONVERSATION_SELECT}{where} ORDER BY c.n DESC LIMIT ?"
    return conn.execute(sql, (*params, limit)).fetchall()


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not _CURSOR.fullmatch(cursor):
        raise InvalidInput(
            "cursor must be a next_cursor value returned by this endpoint",
            detail=[{"loc": ["query", "cursor"], "msg": "not a cursor"}],
        )
    return int(cursor)


def conversation_from_row(row: sqlite3.Row) -> ConversationRecord:
    run = None
    if row["run_id"] is not None:
        run = RunRecord(
            conversation_id=row["id"], **{column: row[f"run_{column}"] for column in _RUN_COLUMNS}
        )
    return ConversationRecord(
        id=row["id"],
        title=row["title"],
        status=row["status"],
        agent=json.loads(row["agent"]),
        max_iterations=row["max_iterations"],
        workspace=row["workspace"] or row["id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        event_count=row["last_seq"],
        usage=Usage(prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"]),
        run=run,
    )


def run_from_row(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        conversation_id=row["conversation_id"], **{column: row[column] for column in _RUN_COLUMNS}
    )


def event_from_row(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        conversation_id=row["conversation_id"],
        seq=row["seq"],
        run_id=row["run_id"],
        timestamp=row["timestamp"],
        source=row["source"],
        payload=_payload_adapter.validate_json(row["payload"]),
    )


def _event_filters(conversation_id: str, query: EventQuery) -> tuple[str, list[Any]]:
    clauses = ["conversation_id = ?"]
    params: list[Any] = [conversation_id]
    for column in ("kind", "source", "run_id"):
        value = getattr(query, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(str(value))
    if query.after_seq is not None:
        clauses.append("seq > ?")
        params.append(query.after_seq)
    if query.before_seq is not None:
        clauses.append("seq < ?")
        params.append(query.before_seq)
    if query.q is not None:
        # Substring match over the event's text (see app.events.searchable_text),
        # case-insensitive for ASCII letters.
        clauses.append("instr(lower(text), lower(?)) > 0")
        params.append(query.q)
    return " AND ".join(clauses), params


def search_events(
    conn: sqlite3.Connection, conversation_id: str, query: EventQuery
) -> list[sqlite3.Row]:
    """Up to ``limit + 1`` rows: the extra row tells the caller there is a next page."""
    where, params = _event_filters(conversation_id, query)
    direction = "ASC" if query.order is Order.ASC else "DESC"
    sql = f"SELECT * FROM events WHERE {where} ORDER BY seq {direction} LIMIT ?"
    return conn.execute(sql, (*params, query.limit + 1)).fetchall()


def count_events(conn: sqlite3.Connection, conversation_id: str, query: EventQuery) -> int:
    where, params = _event_filters(conversation_id, query)
    count: int = conn.execute(f"SELECT count(*) FROM events WHERE {where}", params).fetchone()[0]
    return count
