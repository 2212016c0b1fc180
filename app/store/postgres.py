"""The store on PostgreSQL: :class:`PostgresStore`.

The logic is :class:`~app.store.sql_store.SqlStore`, exactly as on SQLite; this module
gives it PostgreSQL (:class:`PostgresEngine`), through psycopg 3's blocking API, called
from worker threads like every store call:

- one writer connection (autocommit mode; the store issues ``BEGIN``/``COMMIT``/savepoints
  itself) under the store's write lock, as on SQLite, so group commit, listeners in commit
  order and the record cache work unchanged. Several processes may write one database:
  ``seq`` comes from ``UPDATE conversations … RETURNING``, which row-locks the conversation
  until the transaction ends, never from a counter in this process;
- reads on a ``psycopg_pool.ConnectionPool`` (at most :data:`MAX_READERS` connections),
  each one ``REPEATABLE READ READ ONLY`` transaction: one snapshot, as SQLite's ``BEGIN``.
  A pooled connection the server ended (a database restart or failover ends them all)
  fails at that ``BEGIN``, before the read's own statements: it is dropped and another
  borrowed, so no read fails for it (see :meth:`PostgresEngine.read`);
- the schema and its migrations: ``app/store/pg_schema.py``; ``?`` placeholders, rows and
  NUL characters: ``app/store/pg_connection.py``.

Errors: the database unreachable, the connection lost, the server shutting down or out of
disk (:func:`is_storage_error`) become :class:`~app.store.faults.StoreUnavailable`, for
reads and writes alike, and writes record them in ``health()``; a writer connection the
server closed is replaced by the next write. Every other error passes through.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from app.redact import mask_url
from app.store import queries
from app.store.change_notes import NOTIFY_ALL, channel_name
from app.store.engine import Connection, Dialect
from app.store.faults import StoreUnavailable
from app.store.pg_connection import PgConnection, register_nul_escape
from app.store.pg_schema import initialize
from app.store.sql_store import SqlStore
from app.store.text_search import TrigramTextSearch

#: Read connections at most (reads wait for one beyond): the I/O limiter's threads and the
#: run threads share them; PostgreSQL's default max_connections is 100 for all clients.
MAX_READERS = 16
#: How long a connect may take, and how long a read waits for a pooled connection.
CONNECT_TIMEOUT_SECONDS = 10

#: SQLSTATE classes that mean "the database cannot serve us", not "this request is wrong":
#: connection exception, insufficient resources (disk full, out of memory), system error
#: (I/O). Plus the shutdown codes of class 57 (admin, crash, cannot connect now...).
_STORAGE_CLASSES = ("08", "53", "58")
_STORAGE_CODES_PREFIX = "57P"

_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

POSTGRES_DIALECT = Dialect(
    text=TrigramTextSearch(),
    agent_kind=queries.POSTGRES_AGENT_KIND,
    lenient_text=lambda conn: contextlib.nullcontext(),  # text is always valid UTF-8 here
    notify_changes=NOTIFY_ALL,
)


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` says PostgreSQL cannot be used: no SQLSTATE (the client lost the
    connection, or could not connect), or one of :data:`_STORAGE_CLASSES` / ``57P…``."""
    if not isinstance(error, psycopg.OperationalError):
        return False
    code = error.sqlstate
    return code is None or code[:2] in _STORAGE_CLASSES or code.startswith(_STORAGE_CODES_PREFIX)


def describe(error: BaseException) -> str:
    """The first line of the message, and the SQLSTATE if there is one."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    code = getattr(error, "sqlstate", None)
    return f"{first} (SQLSTATE {code})" if code else first


class PostgresEngine:
    """Connections to one PostgreSQL database (see the module docstring)."""

    begin_write = "BEGIN"
    error = psycopg.Error
    dialect = POSTGRES_DIALECT

    def __init__(self, url: str, *, max_readers: int = MAX_READERS) -> None:
        self._url = url
        self.schema = "public"  # until initialize() reads it
        self._writers: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._readers = ConnectionPool(
            url,
            min_size=1,
            max_size=max_readers,
            kwargs=self._connect_options(),
            configure=register_nul_escape,
            timeout=CONNECT_TIMEOUT_SECONDS,
            open=False,  # opened once the schema is there (initialize)
            name="trellis-readers",
        )

    @staticmethod
    def _connect_options() -> dict[str, Any]:
        return {
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "application_name": "trellis",
        }

    def open_writer(self) -> Connection:
        raw = psycopg.connect(self._url, **self._connect_options())
        register_nul_escape(raw)
        with self._lock:
            self._writers.append(raw)
        return PgConnection(raw)

    def initialize(self, writer: Connection) -> None:
        assert isinstance(writer, PgConnection)
        initialize(writer.raw)
        row = writer.raw.execute("SELECT current_schema()").fetchone()
        #: The schema the store's tables are in (names its notification channels).
        self.schema = str(row[0]) if row is not None else "public"
        self._readers.open()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only snapshot on a pooled connection (rolled back after the block).

        Errors: :class:`StoreUnavailable` for a storage error (the pool drops a
        connection the server closed); others propagate."""
        try:
            with self._begun_reader() as connection:
                try:
                    yield connection
                finally:
                    if connection.in_transaction and not connection.raw.broken:
                        connection.execute("ROLLBACK")
        except psycopg.Error as error:
            if not is_storage_error(error):
                raise
            raise self.unavailable(error) from error

    @contextmanager
    def _begun_reader(self) -> Iterator[PgConnection]:
        """A pooled connection with its read transaction begun. One that turns out dead at
        ``BEGIN`` (the server ended its session) goes back broken — the pool drops it —
        and the next is tried: at most as many as the pool holds, then a new one."""
        for attempt in range(self._readers.max_size + 1):
            with self._readers.connection() as raw:
                connection = PgConnection(raw)
                try:
                    connection.execute(_BEGIN_READ)
                except psycopg.OperationalError:
                    if not raw.broken or attempt == self._readers.max_size:
                        raise
                    continue  # leaving the block returns it broken: the pool drops it
                yield connection
                return
        raise AssertionError("unreachable: the last attempt raises or yields")

    def discard(self, connection: Connection) -> None:
        assert isinstance(connection, PgConnection)
        with self._lock:
            self._writers.remove(connection.raw)
        with contextlib.suppress(psycopg.Error):
            connection.raw.close()

    def is_broken(self, connection: Connection) -> bool:
        assert isinstance(connection, PgConnection)
        return connection.raw.broken or connection.raw.closed

    def is_storage_error(self, error: BaseException) -> bool:
        return is_storage_error(error)

    def is_conflict(self, error: BaseException) -> bool:
        """A deadlock or serialization failure (SQLSTATE class 40, "transaction
        rollback"; psycopg raises them as ``OperationalError``): run again."""
        code = getattr(error, "sqlstate", None)
        return isinstance(error, psycopg.Error) and code is not None and code.startswith("40")

    def describe(self, error: BaseException) -> str:
        return describe(error)

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"the store cannot reach its database: {describe(error)}; nothing of this change"
            " was saved. Check that the PostgreSQL server is running and reachable from this"
            " host (and has disk space); the store reconnects without a restart once it is",
            detail={"sqlite_error": None, "sqlstate": getattr(error, "sqlstate", None)},
        )

    def close(self) -> None:
        with self._lock:
            for raw in self._writers:
                raw.close()
            self._writers.clear()
        self._readers.close()


class PostgresStore(SqlStore):
    """The :class:`~app.store.base.EventStore` on a PostgreSQL database at ``url`` (tables
    in its current schema, created or migrated on opening).

    Errors: ``psycopg.OperationalError`` when the database cannot be reached;
    ``RuntimeError`` for a schema newer than this Trellis, or no ``pg_trgm``.
    """

    def __init__(self, url: str, *, group_commit: bool = True) -> None:
        """``group_commit=False``: one transaction per write (a benchmark's baseline)."""
        self.url = url
        self.cluster_url = url
        engine = PostgresEngine(url)
        super().__init__(engine, group_commit=group_commit)
        self.changes_channel = channel_name("changes", engine.schema)

    def __repr__(self) -> str:
        return f"<PostgresStore {mask_url(self.url)}>"
