"""The SQLite connections of the store: one writer under a lock, a pool of readers.

All writes go through one writer connection under a ``threading.Lock``: writes are short
(tens of microseconds with ``synchronous=NORMAL``), and an in-process lock queues writers
fairly instead of letting SQLite's busy handler sleep and retry. Reads borrow a connection
from a pool, one thread at a time per connection (WAL readers are never blocked by the
writer); a new run thread borrows one instead of opening its own, which would cost more
than a whole small transaction. Any thread may read or write.

When the disk refuses (full, I/O error, read-only), a write must fail cleanly and the next
one must be able to succeed — without a restart. Rules that make it so, all in
:meth:`Connections.write`:

1. A failed statement or ``COMMIT`` rolls back — unless SQLite already did. ``SQLITE_FULL``
   or ``SQLITE_IOERR`` at ``COMMIT`` make SQLite roll back on its own; a ``ROLLBACK`` then
   raises "no transaction is active" and would hide the real error. ``in_transaction``
   tells which case we are in.
2. If ``ROLLBACK`` itself fails, the original error is raised (with a note); the writer
   connection is closed — closing discards the transaction — and the next write opens a
   fresh one. The writer is never left inside a transaction.
3. Storage errors become :class:`~app.store.faults.StoreUnavailable` (chaining the
   original) and are recorded in :meth:`Connections.health`; a successful write clears it.
   Every other error passes through unchanged.
4. Once ``COMMIT`` succeeded, the write succeeded: a failing ``after_commit`` (the cache
   refresh) is logged and reported to ``on_cache_error``, never raised to the writer.

Group commit (:meth:`Connections.submit`, ``app/store/group_commit.py``): writes that wait
for the lock at the same time share one transaction, each in its own savepoint; the rules
above hold per transaction (``after_commit`` runs once per batch, after its ``COMMIT``), and
every caller returns only after the ``COMMIT`` that holds its write.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from app.events import utc_now
from app.store.faults import (
    StoreHealth,
    StoreUnavailable,
    describe,
    is_storage_error,
    store_unavailable,
)
from app.store.group_commit import GroupCommit, PendingWrite, shared_error
from app.store.schema import PROBE_WRITE, connect, initialize

log = logging.getLogger("trellis.store")

R = TypeVar("R")


class Connections:
    """``read()`` and ``write()`` transactions on one database file (created if missing).

    ``after_commit`` runs after every committed write transaction, with the write lock still
    held. If it raises, the error is logged and ``on_cache_error`` is called (lock still
    held): the store passes a function that empties its cache, so that no reader is served a
    record the failed refresh left stale. ``on_begin`` runs right after every ``BEGIN`` of a
    write transaction (lock held; it must not fail). ``group_commit=False`` gives every
    :meth:`submit` a transaction of its own (the baseline of ``bench/store_scale.py``).
    """

    def __init__(
        self,
        path: Path,
        after_commit: Callable[[sqlite3.Connection], None],
        on_cache_error: Callable[[], None] | None = None,
        on_begin: Callable[[], None] | None = None,
        *,
        group_commit: bool = True,
    ) -> None:
        self._after_commit = after_commit
        self._on_cache_error = on_cache_error
        self._on_begin = on_begin
        self._group_commit = group_commit
        self._path = path
        self._lock = threading.Lock()
        self._group = GroupCommit(self._lock, self._commit_batch)
        self._idle_readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._health = StoreHealth()
        writer = self._open()
        initialize(writer)
        self._writer: sqlite3.Connection | None = writer  # None: reopened by the next write

    def _open(self) -> sqlite3.Connection:
        connection = connect(self._path)
        with self._all_lock:
            self._all.append(connection)
        return connection

    def _discard(self, connection: sqlite3.Connection) -> None:
        """Close a connection that cannot be trusted any more (an open transaction is
        discarded by the close) and forget it."""
        with self._all_lock:
            self._all.remove(connection)
        with contextlib.suppress(sqlite3.Error):
            connection.close()

    # -- reads -------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one consistent snapshot) on a pooled connection.

        The pool holds at most as many connections as reads ever ran at once. A connection
        whose read transaction cannot be ended is closed instead of going back to the pool.
        """
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
            self._discard(connection)
        else:
            self._idle_readers.put(connection)

    # -- writes ------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer connection; rolled back if anything raises.

        Errors:
            :class:`~app.store.faults.StoreUnavailable` when the storage refused (disk full,
            I/O error, read-only), chaining the original error; nothing was written, and
            :meth:`health` records it. Any other exception — from SQLite or raised in the
            block — propagates unchanged after the rollback.
        """
        with self._lock:
            with self._transaction() as connection:
                yield connection
            self._run_after_commit(connection)

    def submit(self, work: Callable[[sqlite3.Connection], R]) -> R:
        """Run ``work(writer)`` in a write transaction, shared with the writes other threads
        submitted meanwhile (group commit); return its result once that transaction is
        committed and ``after_commit`` ran. Blocks: call it from a worker thread.

        ``work`` must change the database only through the connection it is given (it may
        run again after a rolled-back attempt; see ``app/store/group_commit.py``).

        Errors:
            What ``work`` raised — only its own changes were rolled back, the rest of the
            batch committed. :class:`~app.store.faults.StoreUnavailable` when the storage
            refused anything in the batch: nothing of the batch was saved.
        """
        write = PendingWrite(work)
        if self._group_commit:
            self._group.wait_for(write)
        else:
            with self._lock:
                self._commit_batch([write])
        return write.outcome()

    def waiting_writes(self) -> int:
        """How many submitted writes wait for a leader (never blocks)."""
        return self._group.waiting()

    def _commit_batch(self, writes: list[PendingWrite[Any]]) -> None:
        """Write lock held: run ``writes`` in one transaction and settle each of them;
        writes a failed transaction did not belong to run again in the next one."""
        while writes:
            writes = self._attempt(writes)

    def _attempt(self, writes: list[PendingWrite[Any]]) -> list[PendingWrite[Any]]:
        """One transaction for ``writes``; returns those to run again (none if it committed
        or failed for a storage reason)."""
        running: PendingWrite[Any] | None = None
        try:
            with self._transaction() as connection:
                for running in writes:
                    running.run(connection, alone=len(writes) == 1)
                running = None
        except Exception as error:
            owner = running or writes[0]
            retry = not isinstance(error, StoreUnavailable) and running is not None
            for write in writes:
                if write is owner:
                    write.settle(error)
                elif write.failed_alone():
                    write.settle()  # its own error stands
                elif not retry:
                    write.settle(shared_error(error))
            return [write for write in writes if not write.done] if retry else []
        self._run_after_commit(connection)
        for write in writes:
            write.settle()
        return []

    def probe(self) -> StoreHealth:
        """Try a tiny write (one row of ``health_probe``) and return the health it leaves.

        For readiness checks while :meth:`health` is not ok: it notices that writes work
        again even when nobody else writes. Blocks (the write lock, one small transaction):
        call it from a worker thread, like any store call.

        Errors:
            Never a storage error (that is what the returned health reports). Anything else
            propagates, e.g. ``SQLITE_BUSY`` if another process held the database's write
            lock for the whole busy timeout.
        """
        with self._lock, contextlib.suppress(StoreUnavailable), self._transaction() as conn:
            conn.execute(PROBE_WRITE, (utc_now().isoformat(),))
        return self._health

    def health(self) -> StoreHealth:
        """What the last write found. Never blocks: safe on the Trio thread."""
        return self._health  # an immutable record, replaced whole under the write lock

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on the writer (write lock held), rules 1 to 3."""
        try:
            connection = self._writer_connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                if self._on_begin is not None:
                    self._on_begin()
                yield connection
                connection.execute("COMMIT")
            except BaseException as error:
                self._roll_back(connection, error)
                raise
        except Exception as error:
            if not is_storage_error(error):
                raise
            self._record_failure(error)
            raise store_unavailable(error) from error
        self._record_success()

    def _writer_connection(self) -> sqlite3.Connection:
        if self._writer is None:
            self._writer = self._open()
        return self._writer

    def _roll_back(self, connection: sqlite3.Connection, error: BaseException) -> None:
        """Rules 1 and 2: end the failed transaction without replacing ``error``."""
        if not connection.in_transaction:
            return  # SQLite already rolled back (SQLITE_FULL or SQLITE_IOERR at COMMIT)
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error as rollback_error:
            log.warning("ROLLBACK failed; replacing the writer connection", exc_info=True)
            error.add_note(
                f"ROLLBACK failed too ({describe(rollback_error)}); the writer connection "
                "was closed, which discarded the transaction"
            )
            self._writer = None
            self._discard(connection)

    def _record_failure(self, error: BaseException) -> None:
        if self._health.ok:
            log.error("store writes fail: %s", describe(error), exc_info=error)
        self._health = self._health.after_failure(error, utc_now())

    def _record_success(self) -> None:
        if not self._health.ok:
            health = self._health
            log.info(
                "store writes work again (after %d failed since %s)",
                health.failures,
                health.failing_since,
            )
            self._health = StoreHealth()

    def _run_after_commit(self, connection: sqlite3.Connection) -> None:
        """Rule 4: the write is committed; a failure here must not say otherwise."""
        try:
            self._after_commit(connection)
        except Exception:
            log.exception("the cache refresh after a committed write failed; dropping the cache")
            if self._on_cache_error is None:
                return
            try:
                self._on_cache_error()
            except Exception:
                log.exception("dropping the cache failed too: it may serve stale records")

    @contextmanager
    def locked_writer(self) -> Iterator[sqlite3.Connection]:
        """The writer connection with the write lock held, for a read that no write may
        interleave with (no transaction of its own: each statement sees the last commit)."""
        with self._lock:
            yield self._writer_connection()

    def close(self) -> None:
        """Close every connection, from any thread."""
        with self._lock, self._all_lock:
            for connection in self._all:
                connection.close()
            self._all.clear()
