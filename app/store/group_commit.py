"""Group commit: the writes of many threads share one transaction, each in its own savepoint.

Who does what. A thread that writes (:meth:`~app.store.connections.Connections.submit`)
queues a :class:`PendingWrite` — a function of the writer connection, prepared in the
caller's thread so that little work is left for the transaction — and then waits for the
write lock. Whoever gets the lock first is the *leader*: it takes every write waiting in
the queue (its own included), runs them in one transaction and settles each one; the
others (*followers*) find theirs settled when they get the lock, and return. Nothing waits
for company: a lone writer leads a batch of one, with no savepoint, as before.

What each caller is told, and when: only after the ``COMMIT`` that holds its write (and the
``after_commit`` hook: listeners, cache) — acknowledged means committed. A write that raises
is rolled back to its savepoint alone and its caller gets its own error; the rest of the
batch commits. A storage error (disk full, I/O error, read-only) anywhere — in a write or at
``COMMIT`` — fails every write of the batch with its own
:class:`~app.store.faults.StoreUnavailable` (the database may have rolled the whole transaction
back, and the next write would fail alike). Any other failure of the transaction itself
(``ROLLBACK TO`` refused, a busy or interrupted ``COMMIT``) goes to the write that was
running, or to every write when none was; the writes it did not belong to are run again in
a fresh transaction (their functions only touch the connection, so a rolled-back attempt
left nothing). A batch that lost a conflict with another process's transaction (PostgreSQL
broke a deadlock by aborting it) runs again whole, a few times, before its writes fail.

Cancellation: none inside — a write that started runs to its outcome; callers block in a
worker thread, as for every store call.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from app.store.engine import Connection, Engine
from app.store.faults import StoreUnavailable

R = TypeVar("R")

#: The savepoint each write of a batch of several runs in.
_SAVEPOINT = "group_write"


class PendingWrite(Generic[R]):
    """One write: ``work(connection)``, then its outcome, set once by the leader.

    ``work`` must only change the database through the connection it is given (it may run
    again after a rolled-back attempt) and must not block on anything but the database.
    """

    __slots__ = ("_error", "_result", "_wake", "done", "work")

    def __init__(self, work: Callable[[Connection], R]) -> None:
        self.work = work
        self.done = False  # set by the leader, with the write lock held
        self._result: R | None = None
        self._error: BaseException | None = None
        self._wake = threading.Lock()  # held until the write is settled or must lead
        self._wake.acquire()

    def sleep(self) -> None:
        """Block until :meth:`wake` (at once if it already happened)."""
        self._wake.acquire()

    def wake(self) -> None:
        self._wake.release()

    def run(self, connection: Connection, *, alone: bool, engine: Engine) -> None:
        """Run the work inside the open transaction; alone, without a savepoint.

        Errors: the work's own error propagates when ``alone`` (the caller rolls the
        transaction back), or when it is a storage error, a lost conflict with another
        writer (the batch runs again), or the database ended the transaction (the batch
        fails); otherwise it is kept for this write's caller and only this
        write is rolled back. When ``ROLLBACK TO`` fails, the work's error propagates.
        """
        self._error = None
        if alone:
            self._result = self.work(connection)
            return
        connection.execute(f"SAVEPOINT {_SAVEPOINT}")
        try:
            self._result = self.work(connection)
        except Exception as error:
            if (
                not connection.in_transaction
                or engine.is_storage_error(error)
                or engine.is_conflict(error)
            ):
                raise
            _roll_back_savepoint(connection, error, engine)
            self._result, self._error = None, error
        connection.execute(f"RELEASE {_SAVEPOINT}")

    def failed_alone(self) -> bool:
        """Whether the last :meth:`run` kept an error of this write's own."""
        return self._error is not None

    def settle(self, error: BaseException | None = None) -> None:
        """The outcome is final (the batch committed, or failed with ``error``)."""
        if error is not None:
            self._result, self._error = None, error
        self.done = True

    def outcome(self) -> R:
        """The work's result, or its error raised in the caller's thread."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # set by run() when no error


def _roll_back_savepoint(connection: Connection, error: Exception, engine: Engine) -> None:
    """Undo the failed write alone; if even that fails, ``error`` (noted) fails the batch:
    the transaction is rolled back whole and the other writes run again."""
    try:
        connection.execute(f"ROLLBACK TO {_SAVEPOINT}")
        return
    except engine.error as rollback_error:
        error.add_note(f"ROLLBACK TO the write's savepoint failed too ({rollback_error})")
    raise error


class GroupCommit:
    """Leader/follower hand-off of writes: :meth:`wait_for` returns once a write is settled.

    ``commit(writes)`` runs a batch with ``write_lock`` held and must settle every write it
    was given. At most one thread leads at a time: it takes the write lock, and only then
    every write waiting (so all that arrived while it waited for the lock join). A follower
    sleeps on its own write and is woken exactly when its batch is settled — never queued
    behind the write lock — or when the lead passes to it: the leader hands the lead to
    the oldest write that arrived during its batch.
    """

    def __init__(
        self,
        write_lock: threading.Lock,
        commit: Callable[[list[PendingWrite[Any]]], None],
    ) -> None:
        self._write_lock = write_lock
        self._commit = commit
        self._mutex = threading.Lock()  # guards the two fields below; held for a moment
        self._waiting: list[PendingWrite[Any]] = []
        self._leading = False

    def waiting(self) -> int:
        """How many writes wait for a leader to take them (for tests and metrics)."""
        with self._mutex:
            return len(self._waiting)

    def wait_for(self, write: PendingWrite[Any]) -> None:
        """Queue ``write`` and return once it is settled (leading a batch if no one is)."""
        with self._mutex:
            self._waiting.append(write)
            follow, self._leading = self._leading, True
        if follow:
            write.sleep()
            if write.done:
                return
        self._lead()

    def _lead(self) -> None:
        """Commit every waiting write, then wake them and pass the lead on (or end it)."""
        batch: list[PendingWrite[Any]] = []
        try:
            with self._write_lock:
                with self._mutex:
                    batch, self._waiting = self._waiting, []
                self._commit(batch)
        finally:
            for write in batch:
                if not write.done:  # the commit was abandoned (KeyboardInterrupt...)
                    write.settle(RuntimeError("the write's batch was abandoned"))
            with self._mutex:
                successor = self._waiting[0] if self._waiting else None
                self._leading = successor is not None
            for write in batch:
                write.wake()
            if successor is not None:
                successor.wake()


def shared_error(error: BaseException) -> BaseException:
    """The error to give a write whose batch failed because of ``error``, which was not its
    own: a copy of a :class:`StoreUnavailable` (the store's state, not this write's), else
    a noted copy (each caller raises its own exception object, from its own thread)."""
    fresh = copy.copy(error)
    if isinstance(error, StoreUnavailable):
        fresh.__cause__ = error.__cause__
        return fresh
    fresh.__cause__ = error.__cause__
    fresh.__notes__ = [
        *getattr(error, "__notes__", []),
        "the transaction this write shared failed; nothing of this write was saved",
    ]
    return fresh
