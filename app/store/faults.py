"""Storage faults: telling "the disk refused" apart from every other error, and remembering it.

A write can fail for two very different reasons. Most errors belong to the request: a
constraint, a missing conversation, an illegal status change. They say nothing about the
store, and pass through :meth:`~app.store.connections.Connections.write` unchanged. A
*storage* error says the store itself cannot write — the disk is full, the filesystem
returned an I/O error or went read-only — and every other write will fail the same way until
someone fixes the machine. Those become one typed error, and a health record that
readiness reports::

    TrellisError (app.errors)
    └── StoreUnavailable          503 store_unavailable   (chains the sqlite3/OS/psycopg error)

Which errors are storage errors: SQLite's primary result codes ``SQLITE_FULL``,
``SQLITE_IOERR`` (with all its extended codes, e.g. ``SQLITE_IOERR_WRITE`` for ``EROFS``)
and ``SQLITE_READONLY``; for errors without a code, their messages; and ``OSError`` with
``ENOSPC``, ``EDQUOT``, ``EROFS`` or ``EIO``. Nothing else: ``SQLITE_BUSY`` (another
process holds the lock) or ``SQLITE_CORRUPT`` are not fixed by freeing space, and are
reported as what they are.

The functions here are SQLite's; PostgreSQL's storage errors (the server unreachable, the
connection lost, the server shutting down) are told apart in ``app/store/postgres.py``.
Both engines record failures in the same :class:`StoreHealth`.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass
from datetime import datetime

from app.errors import TrellisError

#: Primary SQLite result codes that mean "the storage refused" (extended codes keep them
#: in their low byte: ``SQLITE_IOERR_WRITE = SQLITE_IOERR | 3 << 8``).
STORAGE_RESULT_CODES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY}
)

#: The same faults as seen by plain file I/O.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

#: SQLite's messages for those codes, for errors that carry no code.
_STORAGE_MESSAGES = ("database or disk is full", "disk i/o error", "readonly database")


class StoreUnavailable(TrellisError):
    """The store could not write: disk full, I/O error or read-only filesystem (SQLite);
    the database server unreachable or the connection lost (PostgreSQL).

    Nothing of the failed write was saved (it was rolled back). Writes work again, without
    a restart, once the cause is fixed. ``__cause__`` is the original ``sqlite3``,
    ``OSError`` or ``psycopg`` error; ``detail["sqlite_error"]`` its SQLite code name, if
    any (``detail["sqlstate"]`` PostgreSQL's code, if any).
    """

    status = 503
    code = "store_unavailable"


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` says the storage refused the write (see the module docstring)."""
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in STORAGE_RESULT_CODES
        return any(message in str(error).lower() for message in _STORAGE_MESSAGES)
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def describe(error: BaseException) -> str:
    """``"database or disk is full (SQLITE_FULL)"``: the message and its SQLite code name."""
    name = getattr(error, "sqlite_errorname", None)
    return f"{error} ({name})" if name else str(error)


def store_unavailable(error: BaseException) -> StoreUnavailable:
    """The :class:`StoreUnavailable` for a storage error (the caller chains ``error``)."""
    return StoreUnavailable(
        f"the store cannot write: {describe(error)}; nothing of this change was saved. "
        "Check free space on the data directory's filesystem and that it is mounted "
        "read-write (the kernel log tells whether it was remounted read-only after errors); "
        "writes resume without a restart once it is fixed",
        detail={"sqlite_error": getattr(error, "sqlite_errorname", None)},
    )


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """Whether the store's writes reach the disk, as the last write (or probe) found.

    ``failures`` counts the writes that failed with a storage error since the last one that
    succeeded; ``failing_since`` is when the first of them failed and ``last_failure_at``
    the latest (UTC); ``error`` describes the latest. A successful write resets it to
    ``StoreHealth()``. Other errors (constraints, conflicts) do not change it.
    """

    error: str | None = None
    failures: int = 0
    failing_since: datetime | None = None
    last_failure_at: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def after_failure(self, error: str, now: datetime) -> StoreHealth:
        """The record once one more write failed with a storage error (described)."""
        return StoreHealth(
            error=error,
            failures=self.failures + 1,
            failing_since=self.failing_since or now,
            last_failure_at=now,
        )
