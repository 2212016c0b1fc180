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
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from app.store.schema import TEXT_ROWID_BITS, searchable

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

# The summary of a conversation, in one row: the spec's kind without loading the spec (a
# spec that is not JSON gives NULL), long texts cut in SQL. Run columns are prefixed "run_".
_SUMMARY_SELECT = (
    f"SELECT c.n, c.id, c.tenant, substr(c.title, 1, {_TITLE_CHARS}) AS title, c.status,"
    f" CASE WHEN json_valid(c.agent)"
    f" THEN substr(json_extract(c.agent, '$.kind'), 1, {_KIND_CHARS}) END AS agent_kind,"
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


def list_summaries(
    conn: sqlite3.Connection,
    status: Status | None,
    limit: int,
    before_n: int | None,
    tenant: str | None = None,
) -> list[sqlite3.Row]:
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
    sql = f"{_SUMMARY_SELECT}{where} ORDER BY c.n DESC LIMIT ?"
    with _lenient_text(conn):
        return conn.execute(sql, (*params, limit)).fetchall()


def summary_page(rows: list[sqlite3.Row], limit: int) -> ConversationPage:
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


def summary_from_row(row: sqlite3.Row) -> ConversationListItem:
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


@contextmanager
def _lenient_text(conn: sqlite3.Connection) -> Iterator[None]:
    """Decode TEXT values with replacement characters on this (borrowed) connection."""
    previous = conn.text_factory
    conn.text_factory = _decode_lenient
    try:
        yield
    finally:
        conn.text_factory = previous


def _decode_lenient(value: bytes) -> str:
    return value.decode("utf-8", "replace")


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
    webhook = row["webhook"]
    return ConversationRecord(
        **_conversation_fields(row, _run_of(row)),
        agent=json.loads(row["agent"]),
        webhook=None if webhook is None else Webhook.model_validate_json(webhook),
    )


def _conversation_fields(row: sqlite3.Row, run: RunRecord | None) -> dict[str, Any]:
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


def _run_of(row: sqlite3.Row, *, error_chars: int | None = None) -> RunRecord | None:
    """The current run from the ``run_`` columns; its error cut to ``error_chars``."""
    if row["run_id"] is None:
        return None
    fields = {column: row[f"run_{column}"] for column in _RUN_COLUMNS}
    error = fields["error"]
    if error_chars is not None and isinstance(error, str) and len(error) > error_chars:
        fields["error"] = error[:error_chars] + "…"
    return RunRecord(conversation_id=row["id"], **fields)


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


#: The shortest ``q`` the text index answers (a trigram); shorter ones scan the text.
MIN_INDEXED_Q = 3
_SEQ_MASK = (1 << TEXT_ROWID_BITS) - 1


def _event_filters(
    conversation_id: str, query: EventQuery, *, indexed_q: bool = False
) -> tuple[str, list[Any]]:
    """The WHERE clause on ``events`` (aliased ``e``); with ``indexed_q`` it leaves ``q``
    and the seq bounds to the text index (:func:`_text_match`)."""
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
        # Substring match over the event's text (see app.events.searchable_text),
        # case-insensitive for ASCII letters: only for q shorter than MIN_INDEXED_Q.
        clauses.append("instr(lower(e.text), lower(?)) > 0")
        params.append(searchable(query.q))
    return " AND ".join(clauses), params


def _uses_text_index(query: EventQuery) -> bool:
    return query.q is not None and len(query.q) >= MIN_INDEXED_Q


@dataclass(frozen=True, slots=True)
class _TextMatch:
    """A ``q`` of 3+ characters, in two parts: the events in the text index (``MATCH`` over
    the rowid range ``low..high``: the conversation's, seq bounds folded in) and the newer
    ones, not indexed yet (seq in ``tail_after < seq < before``: a scan with
    ``trellis_contains``)."""

    phrase: str
    base: int  # the conversation's rowid 0 (seq = rowid - base)
    low: int
    high: int
    tail_after: int
    before: int
    q: str


def _text_match(conn: sqlite3.Connection, conversation_id: str, query: EventQuery) -> _TextMatch:
    row = conn.execute(
        "SELECT n, indexed_seq FROM conversations WHERE id = ?", (conversation_id,)
    ).fetchone()
    base = -1 if row is None else row[0] << TEXT_ROWID_BITS  # none: an empty range
    indexed = 0 if row is None else row[1]
    after = min(query.after_seq or 0, _SEQ_MASK)
    before = min(query.before_seq or _SEQ_MASK + 1, _SEQ_MASK + 1)
    q = searchable(query.q or "")
    phrase = '"' + q.replace('"', '""') + '"'  # q as one string
    return _TextMatch(
        phrase,
        base,
        base + after + 1,
        base + min(before - 1, indexed),
        max(after, indexed),
        before,
        q,
    )


_INDEXED_PART = (
    "SELECT e.* FROM events_text AS t CROSS JOIN events AS e ON e.seq = t.rowid - ? AND {where}"
    " WHERE events_text MATCH ? AND t.rowid BETWEEN ? AND ?"
)
_TAIL_PART = (
    "SELECT e.* FROM events AS e WHERE {where} AND e.seq > ? AND e.seq < ?"
    " AND trellis_contains(e.text, ?)"
)


def search_events(
    conn: sqlite3.Connection, conversation_id: str, query: EventQuery
) -> list[sqlite3.Row]:
    """Up to ``limit + 1`` rows: the extra row tells the caller there is a next page.

    A ``q`` of 3+ characters is answered by the text index, walked in ``seq`` order (the
    other filters checked on each hit, so a page stops after ``limit + 1`` hits), merged
    with a scan of the newest events, not indexed yet (fewer than ``TEXT_INDEX_EVERY``)."""
    direction = "ASC" if query.order is Order.ASC else "DESC"
    if not _uses_text_index(query):
        where, params = _event_filters(conversation_id, query)
        sql = f"SELECT e.* FROM events AS e WHERE {where} ORDER BY e.seq {direction} LIMIT ?"
        return conn.execute(sql, (*params, query.limit + 1)).fetchall()
    match = _text_match(conn, conversation_id, query)
    where, params = _event_filters(conversation_id, query, indexed_q=True)
    indexed = _INDEXED_PART.format(where=where) + f" ORDER BY t.rowid {direction} LIMIT ?"
    tail = _TAIL_PART.format(where=where) + f" ORDER BY e.seq {direction} LIMIT ?"
    sql = (
        f"SELECT * FROM ({indexed}) UNION ALL SELECT * FROM ({tail})"
        f" ORDER BY seq {direction} LIMIT ?"
    )
    limit = query.limit + 1
    return conn.execute(
        sql,
        (
            match.base,
            *params,
            match.phrase,
            match.low,
            match.high,
            limit,
            *params,
            match.tail_after,
            match.before,
            match.q,
            limit,
            limit,
        ),
    ).fetchall()


def count_events(conn: sqlite3.Connection, conversation_id: str, query: EventQuery) -> int:
    """How many events match. A ``q`` of 3+ characters alone (with seq bounds) is counted
    in the text index, plus a scan of the newest events not indexed yet; with other
    filters each hit is checked in ``events``. With no filter but seq bounds the answer
    is arithmetic: seqs are exactly ``1..last_seq``."""
    if all(getattr(query, name) is None for name in ("kind", "source", "run_id", "q")):
        row = conn.execute(
            "SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        last = 0 if row is None else int(row[0])
        below = last if query.before_seq is None else min(last, query.before_seq - 1)
        return max(0, below - (query.after_seq or 0))
    if not _uses_text_index(query):
        where, params = _event_filters(conversation_id, query)
        sql = f"SELECT count(*) FROM events AS e WHERE {where}"
        return int(conn.execute(sql, params).fetchone()[0])
    match = _text_match(conn, conversation_id, query)
    where, params = _event_filters(conversation_id, query, indexed_q=True)
    tail_sql = "SELECT count(*) FROM (" + _TAIL_PART.format(where=where) + ")"
    tail = conn.execute(tail_sql, (*params, match.tail_after, match.before, match.q))
    in_tail = int(tail.fetchone()[0])
    if len(params) == 1:  # the conversation only: the index alone counts the indexed part
        sql = "SELECT count(*) FROM events_text WHERE events_text MATCH ? AND rowid BETWEEN ? AND ?"
        row = conn.execute(sql, (match.phrase, match.low, match.high)).fetchone()
        return int(row[0]) + in_tail
    sql = "SELECT count(*) FROM (" + _INDEXED_PART.format(where=where) + ")"
    row = conn.execute(sql, (match.base, *params, match.phrase, match.low, match.high)).fetchone()
    return int(row[0]) + in_tail
