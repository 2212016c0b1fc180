"""The connections of the store: one writer under a lock, a pool of readers.

All writes go through one writer connection under a ``threading.Lock``: writes are short
(tens of microseconds on SQLite with ``synchronous=NORMAL``), and an in-process lock queues
writers fairly instead of letting SQLite's busy handler sleep and retry. The same holds on
PostgreSQL, where it also keeps what the store tracks per transaction (the conversations
it touched, the events it appended, listeners in commit order) and group commit exactly as
on SQLite; other processes writing the same database are ordered by PostgreSQL's row
locks. Reads borrow a connection from the engine's pool (``app/store/engine.py``), one
thread at a time per connection; a new run thread borrows one instead of opening its own,
which would cost more than a whole small transaction. Any thread may read or write.

When the disk refuses (full, I/O error, read-only), a write must fail cleanly and the next
one must be able to succeed — without a restart. Rules that make it so, all in
:meth:`Connections.write`:

1. A failed statement or ``COMMIT`` rolls back — unless the database already did.
   ``SQLITE_FULL`` or ``SQLITE_IOERR`` at ``COMMIT`` make SQLite roll back on its own; a
   ``ROLLBACK`` then raises "no transaction is active" and would hide the real error. A
   PostgreSQL connection that was lost has nothing to roll back. ``in_transaction`` tells
   which case we are in.
2. If ``ROLLBACK`` itself fails, the original error is raised (with a note); the writer
   connection is closed — closing discards the transaction — and the next write opens a
   fresh one. So is a connection the server closed (``Engine.is_broken``). The writer is
   never left inside a transaction.
3. Storage errors (the engine's: disk full for SQLite, the server unreachable for
   PostgreSQL) become :class:`~app.store.faults.StoreUnavailable` (chaining the original)
   and are recorded in :meth:`Connections.health`; a successful write clears it. Every
   other error passes through unchanged.
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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from app.events import utc_now
from app.store.engine import Connection, Engine
from app.store.faults import StoreHealth, StoreUnavailable
from app.store.group_commit import GroupCommit, PendingWrite, shared_error
from app.store.schema import PROBE_WRITE

log = logging.getLogger("trellis.store")

R = TypeVar("R")

#: Times a write batch runs again after losing a conflict with another writer (PostgreSQL
#: aborted it to break a deadlock with another node's transaction) before its writes fail.
CONFLICT_RETRIES = 3


class _RunAgain(Exception):
    """The batch lost a conflict: nothing of it was saved, and it runs again whole."""


class Connections:
    """``read()`` and ``write()`` transactions on the engine's database.

    ``after_commit`` runs after every committed write transaction, with the write lock still
    held. If it raises, the error is logged and ``on_cache_error`` is called (lock still
    held): the store passes a function that empties its cache, so that no reader is served a
    record the failed refresh left stale. ``on_begin`` runs right after every ``BEGIN`` of a
    write transaction (lock held; it must not fail). ``before_commit`` runs right before its
    ``COMMIT``, in the transaction (the store's change notes to other nodes; if it raises,
    the transaction fails like a failed statement). ``group_commit=False`` gives every
    :meth:`submit` a transaction of its own (the baseline of ``bench/store_scale.py``).
    """

    def __init__(
        self,
        engine: Engine,
        after_commit: Callable[[Connection], None],
        on_cache_error: Callable[[], None] | None = None,
        on_begin: Callable[[], None] | None = None,
        *,
        before_commit: Callable[[Connection], None] | None = None,
        group_commit: bool = True,
    ) -> None:
        self._after_commit = after_commit
        self._before_commit = before_commit
        self._on_cache_error = on_cache_error
        self._on_begin = on_begin
        self._group_commit = group_commit
        self._engine = engine
        self._lock = threading.Lock()
        self._group = GroupCommit(self._lock, self._commit_batch)
        self._health = StoreHealth()
        writer = engine.open_writer()
        try:
            engine.initialize(writer)
        except BaseException:
            engine.close()
            raise
        self._writer: Connection | None = writer  # None: reopened by the next write

    # -- reads -------------------------------------------------------------------------

    def read(self) -> contextlib.AbstractContextManager[Connection]:
        """A read transaction (one consistent snapshot) on a pooled connection."""
        return self._engine.read()

    # -- writes ------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on the writer connection; rolled back if anything raises.

        Errors:
            :class:`~app.store.faults.StoreUnavailable` when the storage refused (disk full,
            I/O error, read-only; the database server gone), chaining the original error;
            nothing was written, and :meth:`health` records it. Any other exception — from
            the database or raised in the block — propagates unchanged after the rollback.
        """
        with self._lock:
            with self._transaction() as connection:
                yield connection
            self._run_after_commit(connection)

    def submit(self, work: Callable[[Connection], R]) -> R:
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
        writes a failed transaction did not belong to run again in the next one, and a
        batch another writer's locks made fail (``Engine.is_conflict``) runs again whole,
        up to :data:`CONFLICT_RETRIES` times."""
        conflicts = 0
        while writes:
            try:
                writes = self._attempt(writes, may_run_again=conflicts < CONFLICT_RETRIES)
            except _RunAgain:
                conflicts += 1

    def _attempt(
        self, writes: list[PendingWrite[Any]], *, may_run_again: bool
    ) -> list[PendingWrite[Any]]:
        """One transaction for ``writes``; returns those to run again (none if it committed
        or failed for a storage reason).

        Errors: :class:`_RunAgain` when the transaction lost a conflict with another
        writer and ``may_run_again`` (nothing settled: every write runs again)."""
        running: PendingWrite[Any] | None = None
        try:
            with self._transaction() as connection:
                for running in writes:
                    running.run(connection, alone=len(writes) == 1, engine=self._engine)
                running = None
        except Exception as error:
            if may_run_again and self._engine.is_conflict(error):
                log.info(
                    "a write batch lost a conflict (%s); running it again",
                    self._engine.describe(error),
                )
                raise _RunAgain from error
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
    def _transaction(self) -> Iterator[Connection]:
        """``BEGIN`` … ``COMMIT`` on the writer (write lock held), rules 1 to 3."""
        try:
            connection = self._writer_connection()
            connection.execute(self._engine.begin_write)
            try:
                if self._on_begin is not None:
                    self._on_begin()
                yield connection
                if self._before_commit is not None:
                    self._before_commit(connection)
                connection.execute("COMMIT")
            except BaseException as error:
                self._roll_back(connection, error)
                raise
        except Exception as error:
            self._drop_writer_if_broken()
            if not self._engine.is_storage_error(error):
                raise
            self._record_failure(error)
            raise self._engine.unavailable(error) from error
        self._record_success()

    def _writer_connection(self) -> Connection:
        if self._writer is None:
            self._writer = self._engine.open_writer()
        return self._writer

    def _drop_writer_if_broken(self) -> None:
        """Rule 2: a writer the server closed is replaced by the next write."""
        if self._writer is not None and self._engine.is_broken(self._writer):
            log.warning("the writer connection was lost; the next write opens a new one")
            self._engine.discard(self._writer)
            self._writer = None

    def _roll_back(self, connection: Connection, error: BaseException) -> None:
        """Rules 1 and 2: end the failed transaction without replacing ``error``."""
        if not connection.in_transaction:
            return  # already rolled back (SQLITE_FULL or SQLITE_IOERR at COMMIT; lost)
        try:
            connection.execute("ROLLBACK")
        except self._engine.error as rollback_error:
            log.warning("ROLLBACK failed; replacing the writer connection", exc_info=True)
            error.add_note(
                f"ROLLBACK failed too ({self._engine.describe(rollback_error)}); the writer "
                "connection was closed, which discarded the transaction"
            )
            self._writer = None
            self._engine.discard(connection)

    def _record_failure(self, error: BaseException) -> None:
        if self._health.ok:
            log.error("store writes fail: %s", self._engine.describe(error), exc_info=error)
        self._health = self._health.after_failure(self._engine.describe(error), utc_now())

    def _record_success(self) -> None:
        if not self._health.ok:
            health = self._health
            log.info(
                "store writes work again (after %d failed since %s)",
                health.failures,
                health.failing_since,
            )
            self._health = StoreHealth()

    def _run_after_commit(self, connection: Connection) -> None:
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
    def write_lock(self) -> Iterator[None]:
        """The write lock alone (no connection, no transaction), for a change that must not
        interleave with a write: dropping cached records another node changed."""
        with self._lock:
            yield

    @contextmanager
    def locked_writer(self) -> Iterator[Connection]:
        """The writer connection with the write lock held, for a read that no write may
        interleave with (no transaction of its own: each statement sees the last commit).

        Errors: :class:`~app.store.faults.StoreUnavailable` for a storage error (a lost
        PostgreSQL connection is replaced by the next use); others propagate."""
        with self._lock:
            try:
                yield self._writer_connection()
            except Exception as error:
                self._drop_writer_if_broken()
                if not self._engine.is_storage_error(error):
                    raise
                raise self._engine.unavailable(error) from error

    def close(self) -> None:
        """Close every connection, from any thread."""
        with self._lock:
            self._engine.close()
