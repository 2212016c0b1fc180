"""The store behaviour suites run on both engines: ``store`` parametrised by kind.

A suite module that holds for every engine overrides the SQLite-only ``store`` fixture of
``tests/conftest.py`` with one line (and may add a store opener the same way)::

    store = any_store_fixture()
    store_opener = store_opener_fixture()

The ``postgres`` case gets a throwaway schema (``postgres_url``, tests/conftest.py), and
is skipped where no server answers (failed under CI), as every PostgreSQL test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.store.postgres import PostgresStore
from app.store.sql_store import SqlStore
from app.store.sqlite import SqliteStore

KINDS = ("sqlite", "postgres")


def open_store(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path, *, group_commit: bool = True
) -> SqlStore:
    """A store of ``kind`` on the test's database (empty at first)."""
    if kind == "postgres":
        return PostgresStore(request.getfixturevalue("postgres_url"), group_commit=group_commit)
    return SqliteStore(tmp_path / "data" / "trellis.sqlite3", group_commit=group_commit)


def _any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    """An empty store of each kind in turn, closed after the test."""
    store = open_store(request, request.param, tmp_path)
    yield store
    store.close()


def is_sqlite(store: SqlStore) -> bool:
    return isinstance(store, SqliteStore)


def _store_opener(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., SqlStore]]:
    """Opens stores of one database (of each kind in turn): to reopen after a close, or
    as several nodes at once. Every store it opened is closed after the test."""
    opened: list[SqlStore] = []

    def open_one(*, group_commit: bool = True) -> SqlStore:
        opened.append(open_store(request, request.param, tmp_path, group_commit=group_commit))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def any_store_fixture(name: str = "store") -> Any:
    """A fixture ``name`` for the module that assigns it: a store of each kind in turn."""
    return pytest.fixture(params=KINDS, name=name)(_any_store)


def store_opener_fixture() -> Any:
    """A ``store_opener`` fixture for the module that assigns it: each kind in turn."""
    return pytest.fixture(params=KINDS, name="store_opener")(_store_opener)


def raw(store: SqlStore, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Run ``sql`` (``?`` placeholders) in a write transaction of the store's own writer,
    below the store's logic (as another program would): its rows, if any."""
    with store._db.write() as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if sql.lstrip().upper().startswith("SELECT") else []
