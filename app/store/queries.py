"""SQL that builds rows into records, and the filtered queries of search and listing.

The conversation list returns summaries (:class:`~app.records.ConversationSummary`), read
by a query of their own that never loads an agent spec and reads at most
:data:`SUMMARY_ERROR_CHARS` of a run's error, and renders them one row at a time: a row
that cannot be rendered becomes an :class:`~app.records.UnreadableConversation` and a log
line, so one bad row never breaks a list. A page ends early, with a ``next_cursor``, rather
than grow past :data:`MAX_LIST_PAGE_BYTES`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from app.errors import InvalidInput
from app.events import Event, Payload
from app.lifecycle import Status
from app.records import (
    ConversationListItem,
    ConversationRecord,
    ConversationSummary,
    RunRecord,
    UnreadableConversation,
    Usage,
    Webhook,
)
from app.store.base import ConversationPage, EventQuery, Order
from app.store.engine import Connection, Dialect, TextSearch

log = logging.getLogger("trellis.store")

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
    "node",
)

# The conversation with its current run, in one row; run columns are prefixed "run_".
_CONVERSATION_SELECT = (
    "SELECT c.*, "
    + ", ".join(f"r.{column} AS run_{column}" for column in _RUN_COLUMNS)
    + " FROM conversations AS c LEFT JOIN runs AS r ON r.id = c.current_run_id"
)


def conversation_row(conn: Connection, conversation_id: str) -> Any:
    """The conversation's row with its current run's columns, or ``None``."""
    return conn.execute(_CONVERSATION_SELECT + " WHERE c.id = ?", (conversation_id,)).fetchone()


#: A page of the conversation list stops before its JSON would pass this many bytes (the
#: rest follows with ``next_cursor``). A summary is ~500-700 bytes, so 1,000 (the largest
#: limit) fit unless titles or run errors are long.
MAX_LIST_PAGE_BYTES = 1 << 20
#: Characters of a run's error a summary shows; the conversation's own record has it all.
SUMMARY_ERROR_CHARS = 1000
_TITLE_CHARS = 200  # the longest title a request may set
_KIND_CHARS = 100
# What a page's JSON holds besides its items ({"items":[],"next_cursor":"…"}), and what each
# item may add to its summary's size: a comma, and a live queue position instead of null.
_PAGE_ENVELOPE_BYTES, _ITEM_EXTRA_BYTES = 64, 8

# The summary of a conversation, in one row: the spec's kind without loading the spec (the
# dialect's expression on c.agent; a spec that is not JSON gives NULL), long texts cut in
# SQL. Run columns are prefixed "run_".
_SUMMARY_SELECT = (
    f"SELECT c.n, c.id, c.tenant, substr(c.title, 1, {_TITLE_CHARS}) AS title, c.status,"
    " {agent_kind} AS agent_kind,"
    " c.max_iterations, c.workspace, c.created_at, c.updated_at, c.last_seq,"
    " c.prompt_tokens, c.completion_tokens, "
    + ", ".join(
        f"substr(r.{column}, 1, {SUMMARY_ERROR_CHARS + 1}) AS run_{column}"
        if column == "error"
        else f"r.{column} AS run_{column}"
        for column in _RUN_COLUMNS
    )
    + " FROM conversations AS c LEFT JOIN runs AS r ON r.id = c.current_run_id"
)

#: The summary's agent kind in SQLite: ``json_extract`` where ``c.agent`` is JSON.
SQLITE_AGENT_KIND = (
    f"CASE WHEN json_valid(c.agent) THEN substr(json_extract(c.agent, '$.kind'), 1, {_KIND_CHARS})"
    " END"
)
#: The same in PostgreSQL (``trellis_agent_kind``: ``app/store/pg_schema.py``).
POSTGRES_AGENT_KIND = f"substr(trellis_agent_kind(c.agent), 1, {_KIND_CHARS})"


def list_summaries(
    conn: Connection,
    dialect: Dialect,
    status: Status | None,
    limit: int,
    before_n: int | None,
    tenant: str | None = None,
) -> list[Any]:
    """Up to ``limit`` summary rows, newest first, older than row ``before_n``; only the
    conversations of ``tenant`` when given (index ``conversations_by_tenant``).

    Text that is not valid UTF-8 (written by another program) is read with replacement
    characters instead of failing the whole query.
    """
    clauses: list[str] = []
    params: list[Any] = []
    if tenant is not None:
        clauses.append("c.tenant = ?")
        params.append(tenant)
    if status is not None:
        clauses.append("c.status = ?")
        params.append(status.value)
    if before_n is not None:
        clauses.append("c.n < ?")
        params.append(before_n)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    select = _SUMMARY_SELECT.format(agent_kind=dialect.agent_kind)
    sql = f"{select}{where} ORDER BY c.n DESC LIMIT ?"
    with dialect.lenient_text(conn):
        return conn.execute(sql, (*params, limit)).fetchall()


def summary_page(rows: list[Any], limit: int) -> ConversationPage:
    """The first ``limit`` rows as list items, cut short before :data:`MAX_LIST_PAGE_BYTES`
    (never before the first item); ``rows`` holds one more row when there is a next page."""
    items: list[ConversationListItem] = []
    size = _PAGE_ENVELOPE_BYTES
    for index, row in enumerate(rows[:limit]):
        item = summary_from_row(row)
        size += len(pydantic_core.to_json(item)) + _ITEM_EXTRA_BYTES
        if items and size > MAX_LIST_PAGE_BYTES:
            return ConversationPage(items, str(rows[index - 1]["n"]))
        items.append(item)
    next_cursor = str(rows[limit - 1]["n"]) if len(rows) > limit else None
    return ConversationPage(items, next_cursor)


def summary_from_row(row: Any) -> ConversationListItem:
    """The row's summary, or, if the row cannot be rendered, its stub (and a log line)."""
    try:
        return ConversationSummary(
            **_conversation_fields(row, _run_of(row, error_chars=SUMMARY_ERROR_CHARS)),
            agent_kind=row["agent_kind"],
        )
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning(
            "conversation %r cannot be listed: its stored record is invalid: %s",
            row["id"],
            _what_is_wrong(exc),
        )
        return UnreadableConversation(
            id=str(row["id"]),
            error="the stored record of this conversation cannot be read; see the server log",
        )


def _what_is_wrong(error: Exception) -> str:
    """The fields and what is wrong with them, never the stored values themselves."""
    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, item['loc']))}: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)
        )
    return f"{type(error).__name__}: {error}"


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not _CURSOR.fullmatch(cursor):
        raise InvalidInput(
            "cursor must be a next_cursor value returned by this endpoint",
            detail=[{"loc": ["query", "cursor"], "msg": "not a cursor"}],
        )
    return int(cursor)


def conversation_from_row(row: Any) -> ConversationRecord:
    webhook = row["webhook"]
    return ConversationRecord(
        **_conversation_fields(row, _run_of(row)),
        agent=json.loads(row["agent"]),
        webhook=None if webhook is None else Webhook.model_validate_json(webhook),
    )


def _conversation_fields(row: Any, run: RunRecord | None) -> dict[str, Any]:
    """The fields a conversation's record and its summary share."""
    return {
        "id": row["id"],
        "tenant": row["tenant"],
        "title": row["title"],
        "status": row["status"],
        "max_iterations": row["max_iterations"],
        "workspace": row["workspace"] or row["id"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "event_count": row["last_seq"],
        "usage": Usage(
            prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"]
        ),
        "run": run,
    }


def _run_of(row: Any, *, error_chars: int | None = None) -> RunRecord | None:
    """The current run from the ``run_`` columns; its error cut to ``error_chars``."""
    if row["run_id"] is None:
        return None
    fields = {column: row[f"run_{column}"] for column in _RUN_COLUMNS}
    error = fields["error"]
    if error_chars is not None and isinstance(error, str) and len(error) > error_chars:
        fields["error"] = error[:error_chars] + "…"
    return RunRecord(conversation_id=row["id"], **fields)


def run_from_row(row: Any) -> RunRecord:
    return RunRecord(
        conversation_id=row["conversation_id"], **{column: row[column] for column in _RUN_COLUMNS}
    )


def event_from_row(row: Any) -> Event:
    return Event(
        id=row["id"],
        conversation_id=row["conversation_id"],
        seq=row["seq"],
        run_id=row["run_id"],
        timestamp=row["timestamp"],
        source=row["source"],
        payload=_payload_adapter.validate_json(row["payload"]),
    )


def event_filters(
    conversation_id: str, query: EventQuery, text: TextSearch, *, indexed_q: bool = False
) -> tuple[str, list[Any]]:
    """The WHERE clause on ``events`` (aliased ``e``); with ``indexed_q`` it leaves ``q``
    and the seq bounds to the text index (``text.search``/``text.count``)."""
    clauses = ["e.conversation_id = ?"]
    params: list[Any] = [conversation_id]
    for column in ("kind", "source", "run_id"):
        value = getattr(query, column)
        if value is not None:
            clauses.append(f"e.{column} = ?")
            params.append(str(value))
    if indexed_q:
        return " AND ".join(clauses), params
    if query.after_seq is not None:
        clauses.append("e.seq > ?")
        params.append(query.after_seq)
    if query.before_seq is not None:
        clauses.append("e.seq < ?")
        params.append(query.before_seq)
    if query.q is not None:
        # Substring match over the event's text (see app.events.searchable_text).
        clause, param = text.scan_clause(query.q)
        clauses.append(clause)
        params.append(param)
    return " AND ".join(clauses), params


def search_events(
    conn: Connection, conversation_id: str, query: EventQuery, text: TextSearch
) -> list[Any]:
    """Up to ``limit + 1`` rows: the extra row tells the caller there is a next page.

    A ``q`` the engine's text index answers goes to it (``app/store/text_search.py``)."""
    direction = "ASC" if query.order is Order.ASC else "DESC"
    if text.uses_index(query):
        return text.search(conn, conversation_id, query, direction)
    where, params = event_filters(conversation_id, query, text)
    sql = f"SELECT e.* FROM events AS e WHERE {where} ORDER BY e.seq {direction} LIMIT ?"
    return conn.execute(sql, (*params, query.limit + 1)).fetchall()


def count_events(
    conn: Connection, conversation_id: str, query: EventQuery, text: TextSearch
) -> int:
    """How many events match. With no filter but seq bounds the answer is arithmetic:
    seqs are exactly ``1..last_seq``. A ``q`` the text index answers is counted there."""
    if all(getattr(query, name) is None for name in ("kind", "source", "run_id", "q")):
        row = conn.execute(
            "SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        last = 0 if row is None else int(row[0])
        below = last if query.before_seq is None else min(last, query.before_seq - 1)
        return max(0, below - (query.after_seq or 0))
    if text.uses_index(query):
        return text.count(conn, conversation_id, query)
    where, params = event_filters(conversation_id, query, text)
    sql = f"SELECT count(*) FROM events AS e WHERE {where}"
    return int(conn.execute(sql, params).fetchone()[0])
