"""Opening the store the settings name (blocking: call these from a worker thread).

PostgreSQL at ``database_url`` when it is set, else the SQLite file in ``data_dir``. Both
create or migrate their schema on opening and refuse a database written by a newer Trellis.
psycopg is imported only for PostgreSQL (importing it costs ~125 ms, which a server on
SQLite and every CLI command would otherwise pay).

Several servers may open one PostgreSQL database at once: they are the nodes of a cluster
(``app/cluster/``). A SQLite file belongs to one server (its data directory's lock).

Errors: :class:`~app.store.lock.DataDirError`, one line (unreachable, refused, a schema
newer than this Trellis); the password of a URL is masked in it.
"""

from __future__ import annotations

import sqlite3

from app.redact import mask_url
from app.settings import Settings
from app.store.base import EventStore
from app.store.lock import DataDirError
from app.store.sqlite import SqliteStore


def open_store(settings: Settings) -> EventStore:
    """Open (or create) the database the settings name (see the module)."""
    if settings.database_url:
        return _open_postgres(settings.database_url)
    try:
        return SqliteStore(settings.database_path)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise DataDirError(
            f"cannot open the database {settings.database_path}: {_first_line(exc)}"
        ) from None


def _open_postgres(url: str) -> EventStore:
    import psycopg

    from app.store.postgres import PostgresStore

    try:
        return PostgresStore(url)
    except (psycopg.Error, RuntimeError) as exc:
        raise DataDirError(
            f"cannot open the database {mask_url(url)}: {_first_line(exc)}"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
