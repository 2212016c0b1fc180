"""The SQLite connections of the store: one writer under a lock, a pool of readers.

All writes go through one writer connection under a ``threading.Lock``: writes are short
(tens of microseconds with ``synchronous=NORMAL``), and an in-process lock queues writers
fairly instead of letting SQLite's busy handler sleep and retry. Reads borrow a connection
from a pool, one thread at a time per connection (WAL readers are never blocked by the
writer); a new run thread borrows one instead of opening its own, which would cost more
than a whole small transaction. Any thread may read or write.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app.store.schema import connect, initialize


class Connections:
    """``read()`` and ``write()`` transactions on one database file (created if missing).

    ``after_commit`` runs after every committed write, with the write lock still held.
    """

    def __init__(self, path: Path, after_commit: Callable[[sqlite3.Connection], None]) -> None:
        self._after_commit = after_commit
        self._path = path
        self._lock = threading.Lock()
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._writer = self._open()
        initialize(self._writer)

    def _open(self) -> sqlite3.Connection:
        connection = connect(self._path)
        with self._all_lock:
            self._all.append(connection)
        return connection

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one consistent snapshot) on a pooled connection.

        The pool holds at most as many connections as reads ever ran at once.
        """
        try:
            connection = self._idle_readers.get_nowait()
        except queue.Empty:
            connection = self._open()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")
            self._idle_readers.put(connection)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer connection; rolled back if anything raises."""
        with self._lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
            self._after_commit(self._writer)

    @contextmanager
    def locked_writer(self) -> Iterator[sqlite3.Connection]:
        """The writer connection with the write lock held, for a read that no write may
        interleave with (no transaction of its own: each statement sees the last commit)."""
        with self._lock:
            yield self._writer

    def close(self) -> None:
        """Close every connection, from any thread."""
        with self._lock, self._all_lock:
            for connection in self._all:
                connection.close()
            self._all.clear()
