"""The embedded store: one SQLite file in WAL mode (:class:`SqliteStore`).

The store's logic is :class:`~app.store.sql_store.SqlStore`; this module gives it SQLite:
:class:`SqliteEngine` opens connections with the settings every connection needs
(``app/store/schema.py``), pools the readers, and tells storage errors (disk full, I/O
error, read-only: ``app/store/faults.py``) from the rest. Threads: any thread may call
any method (``app/store/connections.py``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from app.store import queries
from app.store.engine import Connection, Dialect
from app.store.faults import StoreUnavailable, describe, is_storage_error, store_unavailable
from app.store.schema import connect, initialize
from app.store.sql_store import SqlStore, conversation_not_found
from app.store.text_search import FtsTextSearch

__all__ = ["SQLITE_DIALECT", "SqliteEngine", "SqliteStore", "conversation_not_found"]

log = logging.getLogger("trellis.store")


@contextmanager
def _lenient_text(conn: Connection) -> Iterator[None]:
    """Decode TEXT values with replacement characters on this (borrowed) connection: text
    that is not valid UTF-8 (written by another program) does not fail a whole query."""
    connection = cast(sqlite3.Connection, conn)
    previous = connection.text_factory
    connection.text_factory = _decode_lenient
    try:
        yield
    finally:
        connection.text_factory = previous


def _decode_lenient(value: bytes) -> str:
    return value.decode("utf-8", "replace")


SQLITE_DIALECT = Dialect(
    text=FtsTextSearch(), agent_kind=queries.SQLITE_AGENT_KIND, lenient_text=_lenient_text
)


class SqliteEngine:
    """Connections to one SQLite file: the writer, and a pool of readers that holds at most
    as many connections as reads ever ran at once (WAL readers are never blocked by the
    writer). A reader whose read transaction cannot be ended is closed instead of going
    back to the pool."""

    begin_write = "BEGIN IMMEDIATE"
    error = sqlite3.Error
    dialect = SQLITE_DIALECT

    def __init__(self, path: Path) -> None:
        self._path = path
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        connection = connect(self._path)
        with self._all_lock:
            self._all.append(connection)
        return connection

    def open_writer(self) -> Connection:
        return self._open()

    def initialize(self, writer: Connection) -> None:
        initialize(cast(sqlite3.Connection, writer))

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            connection = self._idle_readers.get_nowait()
        except queue.Empty:
            connection = self._open()
        try:
            connection.execute("BEGIN")
            yield connection
        finally:
            self._release_reader(connection)

    def _release_reader(self, connection: sqlite3.Connection) -> None:
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")  # a read: nothing to keep, same as COMMIT
        except sqlite3.Error:
            log.warning("a read transaction would not end; closing its connection", exc_info=True)
            self.discard(connection)
        else:
            self._idle_readers.put(connection)

    def discard(self, connection: Connection) -> None:
        """Close (an open transaction is discarded by the close) and forget."""
        with self._all_lock:
            self._all.remove(cast(sqlite3.Connection, connection))
        with contextlib.suppress(sqlite3.Error):
            cast(sqlite3.Connection, connection).close()

    def is_broken(self, connection: Connection) -> bool:
        return False  # a file: a failed write leaves the connection usable

    def is_storage_error(self, error: BaseException) -> bool:
        return is_storage_error(error)

    def is_conflict(self, error: BaseException) -> bool:
        return False  # one process writes the file, through one connection

    def describe(self, error: BaseException) -> str:
        return describe(error)

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        return store_unavailable(error)

    def close(self) -> None:
        with self._all_lock:
            for connection in self._all:
                connection.close()
            self._all.clear()


class SqliteStore(SqlStore):
    """The :class:`~app.store.base.EventStore` on one SQLite file (created if missing)."""

    def __init__(self, path: Path | str, *, group_commit: bool = True) -> None:
        """``group_commit=False``: one transaction per write (a benchmark's baseline)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(SqliteEngine(self.path), group_commit=group_commit)

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path}>"
