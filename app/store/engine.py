"""What the shared store logic needs from a database engine: the seam between the SQL the
store writes once (``app/store/sql_store.py`` and the modules it uses) and SQLite or
PostgreSQL.

The shared modules write SQL with ``?`` placeholders against a :class:`Connection` — a
``sqlite3.Connection`` as it is, or the PostgreSQL adapter (``app/store/pg_connection.py``)
that translates — and read rows by position or by column name. What differs between the
engines is gathered in two objects:

- an :class:`Engine` (``app/store/connections.py`` drives it): how to open a writer, the
  pool of readers, how a write transaction begins, which errors mean "the storage is
  unavailable", and whether a connection is beyond use;
- a :class:`Dialect` (the SQL that differs): the ``q`` filter's text search
  (:class:`TextSearch`: SQLite's batched FTS5 trigram index, PostgreSQL's ``pg_trgm``
  index under ``ILIKE``), the agent kind of a conversation summary, SQLite's lenient
  decoding of text written by other programs, and how a transaction tells the other nodes
  what it changed (PostgreSQL's NOTIFY; nothing on SQLite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.store.base import EventQuery
    from app.store.faults import StoreUnavailable


class Cursor(Protocol):
    """A statement's result: rows indexable by position and by column name."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection in autocommit mode: transactions are the ``BEGIN``/``COMMIT``/
    ``SAVEPOINT`` statements the store executes; ``in_transaction`` tells whether one is
    open (after a failure: whether there is anything left to roll back)."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...


class Engine(Protocol):
    """One database, as :class:`~app.store.connections.Connections` drives it.

    ``open_writer`` and ``read`` may block (they may connect); ``close`` closes every
    connection the engine opened, from any thread.
    """

    #: The statement that opens a write transaction.
    begin_write: str

    @property
    def error(self) -> type[Exception]:
        """The driver's base error (what a failed ``ROLLBACK`` raises)."""
        ...

    dialect: Dialect

    def open_writer(self) -> Connection:
        """A new connection for writes (schema already initialized)."""
        ...

    def initialize(self, writer: Connection) -> None:
        """Create or migrate the schema (once, at start, before any other use)."""
        ...

    def read(self) -> AbstractContextManager[Connection]:
        """A read transaction (one snapshot) on a pooled connection."""
        ...

    def discard(self, connection: Connection) -> None:
        """Close a connection that cannot be trusted any more, and forget it."""
        ...

    def is_broken(self, connection: Connection) -> bool:
        """Whether the connection can no longer be used (the server closed it)."""
        ...

    def is_storage_error(self, error: BaseException) -> bool:
        """Whether ``error`` says the storage cannot take writes (see ``faults.py``)."""
        ...

    def is_conflict(self, error: BaseException) -> bool:
        """Whether ``error`` says the transaction lost a conflict with another writer and
        may simply run again (a deadlock PostgreSQL broke by aborting this side)."""
        ...

    def describe(self, error: BaseException) -> str:
        """The error for a log line or a health record: message and code."""
        ...

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        """The :class:`StoreUnavailable` for a storage error (the caller chains it)."""
        ...

    def close(self) -> None: ...


class TextSearch(Protocol):
    """The ``q`` filter of event search and count (a substring match of ``events.text``,
    case-insensitive per code point), and what an append owes the text index."""

    def uses_index(self, query: EventQuery) -> bool:
        """Whether :meth:`search` and :meth:`count` answer ``query`` (else a plain scan
        with :meth:`scan_clause`)."""
        ...

    def scan_clause(self, q: str) -> tuple[str, Any]:
        """The WHERE term matching ``q`` on ``events AS e``, and its one parameter."""
        ...

    def search(
        self, conn: Connection, conversation_id: str, query: EventQuery, direction: str
    ) -> list[Any]: ...
    def count(self, conn: Connection, conversation_id: str, query: EventQuery) -> int: ...
    def after_append(
        self, conn: Connection, conversation_id: str, number: int, seq: int, indexed_seq: int
    ) -> None:
        """An event ``seq`` was inserted (write transaction open; ``number``: the
        conversation's ``n``; ``indexed_seq``: its events up to there are indexed)."""
        ...


@dataclass(frozen=True, slots=True)
class Dialect:
    """The SQL that differs between the engines (see the module docstring)."""

    text: TextSearch
    #: SQL for a summary's ``agent_kind`` from ``c.agent`` (NULL when it is not JSON).
    agent_kind: str
    #: Read text that is not valid UTF-8 with replacement characters, for a block.
    lenient_text: Callable[[Connection], AbstractContextManager[None]]
    #: The statement that sends a transaction's change notes to the other nodes (parameters:
    #: the channel, the notes as a text array; ``app/store/change_notes.py``), or ``None``
    #: where no other node shares the database (SQLite).
    notify_changes: str | None = None
