"""The ``q`` filter of event search, per engine: the one place where its SQL differs.

``q`` is a substring of an event's searchable text (``events.text``), matched
case-insensitively per code point. Both engines keep a trigram index of that text, built
very differently:

- SQLite (:class:`FtsTextSearch`): an FTS5 trigram index, ``events_text``, filled in
  batches of :data:`TEXT_INDEX_EVERY` events per conversation (``app/store/schema.py``
  explains why). A ``q`` of 3+ characters walks the index and scans the newest events not
  indexed yet; a shorter one scans.
- PostgreSQL (:class:`TrigramTextSearch`): a ``pg_trgm`` GIN index on ``events.text``,
  maintained by every insert, answers ``ILIKE`` (the planner picks it, or the
  conversation's own index, whichever is cheaper): one plain query, nothing to batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.store.base import EventQuery
from app.store.engine import Connection
from app.store.queries import event_filters
from app.store.schema import TEXT_ROWID_BITS, searchable

#: A conversation's newest events, fewer than this, wait outside SQLite's text index (a
#: search with ``q`` scans them); one FTS5 insert per event would write an index segment each.
TEXT_INDEX_EVERY = 256

#: The shortest ``q`` the FTS5 index answers (a trigram); shorter ones scan the text.
MIN_INDEXED_Q = 3
_SEQ_MASK = (1 << TEXT_ROWID_BITS) - 1

_INDEX_TAIL = (
    "INSERT INTO events_text (rowid, text) SELECT ? << 32 | seq, text FROM events"
    " WHERE conversation_id = ? AND seq > ?"
)
_INDEXED_PART = (
    "SELECT e.* FROM events_text AS t CROSS JOIN events AS e ON e.seq = t.rowid - ? AND {where}"
    " WHERE events_text MATCH ? AND t.rowid BETWEEN ? AND ?"
)
_TAIL_PART = (
    "SELECT e.* FROM events AS e WHERE {where} AND e.seq > ? AND e.seq < ?"
    " AND trellis_contains(e.text, ?)"
)


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


class FtsTextSearch:
    """SQLite: FTS5 trigram index in batches, plus a scan of the unindexed tail."""

    def uses_index(self, query: EventQuery) -> bool:
        return query.q is not None and len(query.q) >= MIN_INDEXED_Q

    def scan_clause(self, q: str) -> tuple[str, Any]:
        # Case-insensitive for ASCII letters: only for q shorter than MIN_INDEXED_Q.
        return "instr(lower(e.text), lower(?)) > 0", searchable(q)

    def after_append(
        self, conn: Connection, conversation_id: str, number: int, seq: int, indexed_seq: int
    ) -> None:
        if seq - indexed_seq >= TEXT_INDEX_EVERY:
            index_text(conn, conversation_id, number, indexed_seq)

    def search(
        self, conn: Connection, conversation_id: str, query: EventQuery, direction: str
    ) -> list[Any]:
        """The index walked in ``seq`` order (the other filters checked on each hit, so a
        page stops after ``limit + 1`` hits), merged with a scan of the newest events."""
        match = _text_match(conn, conversation_id, query)
        where, params = event_filters(conversation_id, query, self, indexed_q=True)
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

    def count(self, conn: Connection, conversation_id: str, query: EventQuery) -> int:
        """Alone (with seq bounds), counted in the index; with other filters each hit is
        checked in ``events``; plus a scan of the newest events not indexed yet."""
        match = _text_match(conn, conversation_id, query)
        where, params = event_filters(conversation_id, query, self, indexed_q=True)
        tail_sql = "SELECT count(*) FROM (" + _TAIL_PART.format(where=where) + ")"
        tail = conn.execute(tail_sql, (*params, match.tail_after, match.before, match.q))
        in_tail = int(tail.fetchone()[0])
        if len(params) == 1:  # the conversation only: the index alone counts the indexed part
            sql = (
                "SELECT count(*) FROM events_text WHERE events_text MATCH ?"
                " AND rowid BETWEEN ? AND ?"
            )
            row = conn.execute(sql, (match.phrase, match.low, match.high)).fetchone()
            return int(row[0]) + in_tail
        sql = "SELECT count(*) FROM (" + _INDEXED_PART.format(where=where) + ")"
        row = conn.execute(
            sql, (match.base, *params, match.phrase, match.low, match.high)
        ).fetchone()
        return int(row[0]) + in_tail


def _text_match(conn: Connection, conversation_id: str, query: EventQuery) -> _TextMatch:
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


def index_text(conn: Connection, conversation_id: str, number: int, after: int) -> None:
    """Add the conversation's events after seq ``after`` to SQLite's text index (one
    statement; ``number``: the conversation's ``n``) and mark them indexed."""
    conn.execute(_INDEX_TAIL, (number, conversation_id, after))
    conn.execute("UPDATE conversations SET indexed_seq = last_seq WHERE id = ?", (conversation_id,))


class TrigramTextSearch:
    """PostgreSQL: ``ILIKE '%q%'`` (``%``, ``_`` and ``\\`` in ``q`` escaped), answered by
    the ``pg_trgm`` GIN index ``events_text_trgm``. ``ILIKE`` folds case per character
    (``lower()`` of the database's ctype; C.UTF-8 folds non-ASCII letters too). The
    column ``indexed_seq`` is SQLite's; here it stays 0 and nothing happens after an
    append (the index is maintained by the insert itself)."""

    def uses_index(self, query: EventQuery) -> bool:
        return False  # the plain query: the planner uses the trigram index where it helps

    def scan_clause(self, q: str) -> tuple[str, Any]:
        pattern = searchable(q).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return "e.text ILIKE ? ESCAPE '\\'", f"%{pattern}%"

    def after_append(
        self, conn: Connection, conversation_id: str, number: int, seq: int, indexed_seq: int
    ) -> None:
        return None

    def search(
        self, conn: Connection, conversation_id: str, query: EventQuery, direction: str
    ) -> list[Any]:
        raise NotImplementedError("uses_index() is always false")

    def count(self, conn: Connection, conversation_id: str, query: EventQuery) -> int:
        raise NotImplementedError("uses_index() is always false")
