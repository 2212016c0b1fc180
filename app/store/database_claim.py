"""One server per PostgreSQL database (for now): a session-level advisory lock.

The SQLite store's data directory is claimed with a file lock (``app/store/lock.py``) for
the reason that holds here too: two servers on one database would each believe they own
its runs, and the second one's crash recovery would pause the first one's running runs.
Until nodes share a database through leases and one queue, a server on PostgreSQL claims
the database (the schema its connections use, so that databases holding several Trellis
schemas are claimed one schema at a time) before the store opens it, and holds the claim
for as long as it lives.

The claim is ``pg_try_advisory_lock`` on a connection of its own, kept open: the server
releases the lock when that connection ends — by :meth:`DatabaseClaim.release`, or when
the process dies in any way (the kernel closes the socket, and PostgreSQL drops the
session). A holder on another machine that loses power is noticed only when PostgreSQL's
TCP keepalive gives up on its connection.

Cancellation: acquiring blocks (call it from a worker thread): connecting up to
:data:`CONNECT_TIMEOUT_SECONDS`, then waiting up to :data:`WAIT_SECONDS` for a holder that
is going away (a server killed a moment ago); a live holder fails the claim after that.

Errors: :class:`~app.store.lock.DataDirError` when the database cannot be reached (one
line), :class:`DatabaseInUse` when another live server holds the claim.
"""

from __future__ import annotations

import contextlib

import psycopg

from app.redact import mask_url
from app.store.lock import DataDirError

CONNECT_TIMEOUT_SECONDS = 10

#: How long a claim waits for a holder to go: a server killed a moment ago still holds its
#: lock until PostgreSQL has read the end of its connection (milliseconds, locally).
WAIT_SECONDS = 3

#: The two-int advisory lock key: this constant and the hash of the current schema.
_CLAIM = "SELECT pg_advisory_lock(hashtext('trellis.server'), hashtext(current_schema()))"
#: Who holds the claim: the application name the holder set (with its pid) and its address.
_HOLDER = (
    "SELECT a.application_name, a.client_addr FROM pg_locks AS l"
    " JOIN pg_stat_activity AS a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.classid = hashtext('trellis.server')::oid"
    " AND l.objid = hashtext(current_schema())::oid AND l.objsubid = 2"
)


class DatabaseInUse(DataDirError):
    """Another live server holds the database."""


class DatabaseClaim:
    """The claim on the database (schema) at ``url``; :meth:`acquire` it before opening."""

    def __init__(self, url: str, *, holder: str) -> None:
        """``holder``: who is claiming, shown to a server refused later (say, a pid)."""
        self.url = url
        self._holder = holder
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None

    def __repr__(self) -> str:
        return f"<DatabaseClaim {mask_url(self.url)} held={self.held}>"

    @property
    def held(self) -> bool:
        return self._connection is not None

    def acquire(self) -> None:
        """Claim the database, or fail at once (see the module's errors)."""
        try:
            connection = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                application_name=f"trellis {self._holder}"[:63],
            )
        except psycopg.Error as exc:
            where = mask_url(self.url)
            raise DataDirError(f"cannot open the database {where}: {_line(exc)}") from None
        try:
            connection.execute(f"SET lock_timeout = '{WAIT_SECONDS}s'")
            connection.execute(_CLAIM)
            connection.execute("RESET lock_timeout")
        except psycopg.errors.LockNotAvailable:
            in_use = self._in_use(connection)
            connection.close()
            raise in_use from None
        except psycopg.Error as exc:
            connection.close()
            where = mask_url(self.url)
            raise DataDirError(f"cannot claim the database {where}: {_line(exc)}") from None
        self._connection = connection

    def _in_use(self, connection: psycopg.Connection[tuple[object, ...]]) -> DatabaseInUse:
        """The error for a claim held by another server, naming it where it can."""
        schema, holder = "?", None
        with contextlib.suppress(psycopg.Error):
            schema = str((connection.execute("SELECT current_schema()").fetchone() or "?")[0])
            holder = connection.execute(_HOLDER).fetchone()
        who = "" if holder is None else f" ({holder[0]} at {holder[1] or 'a local socket'})"
        return DatabaseInUse(
            f"the database {mask_url(self.url)} (schema {schema}) is in use by another"
            f" Trellis server{who}; one server per database"
        )

    def release(self) -> None:
        """Give the claim up (closing its connection ends the lock). Idempotent."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def _line(error: psycopg.Error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
