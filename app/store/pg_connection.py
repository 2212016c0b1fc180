"""A psycopg connection that the store's shared SQL can use as it uses ``sqlite3``.

The shared modules write SQL with ``?`` placeholders and read rows by position or by
column name (``sqlite3.Row``). :class:`PgConnection` wraps a blocking ``psycopg``
connection so that they run unchanged:

- ``execute(sql, params)`` translates ``?`` to ``%s`` (a literal ``%`` doubled), cached per
  SQL string; psycopg prepares a statement on the server once it ran a few times;
- rows are :class:`PgRow`: ``row[0]`` and ``row["seq"]``, unpacking, ``keys()``;
- ``in_transaction``: whether a transaction is open (or failed and not yet rolled back).

NUL characters: PostgreSQL's ``text`` cannot hold U+0000, which SQLite stores and returns.
Every string passed as a parameter is escaped on the way in, and every ``text`` value
unescaped on the way out (:func:`escape_nul`, :func:`unescape_nul`): U+0000 is stored as
:data:`NUL_ESCAPE` + ``"0"`` and :data:`NUL_ESCAPE` itself as two of it. The escape is
injective, so equality and substring matches on escaped values (keys, ids, ``q``) mean
what they mean on the originals; strings without either character (all but a few) pass
unchanged. A title or error that holds NULs counts its escapes against the summary's cut
(``substr`` in SQL): such a title is cut a few characters earlier in the list.

Threads: a connection is used by one thread at a time (the writer under the write lock, a
reader while it is borrowed); nothing here locks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg.adapt import Buffer
from psycopg.pq import TransactionStatus
from psycopg.types.string import StrDumperUnknown, TextLoader

#: The escape character of NUL in stored text: a private-use code point (U+F8FF).
NUL_ESCAPE = "\uf8ff"
_ESCAPED_ESCAPE = NUL_ESCAPE * 2
_ESCAPED_NUL = NUL_ESCAPE + "0"


def escape_nul(text: str) -> str:
    """``text`` as PostgreSQL stores it (no U+0000)."""
    if "\x00" not in text and NUL_ESCAPE not in text:
        return text
    return text.replace(NUL_ESCAPE, _ESCAPED_ESCAPE).replace("\x00", _ESCAPED_NUL)


def unescape_nul(text: str) -> str:
    """The string :func:`escape_nul` made ``text`` from (a cut escape is kept as it is)."""
    if NUL_ESCAPE not in text:
        return text
    out: list[str] = []
    index, end = 0, len(text)
    while index < end:
        char = text[index]
        if char == NUL_ESCAPE and index + 1 < end:
            following = text[index + 1]
            if following == NUL_ESCAPE or following == "0":
                out.append(NUL_ESCAPE if following == NUL_ESCAPE else "\x00")
                index += 2
                continue
        out.append(char)
        index += 1
    return "".join(out)


class _NulSafeDumper(StrDumperUnknown):
    """``str`` parameters, NULs escaped (type left for the server to infer, as psycopg's
    default ``str`` dumper does)."""

    def dump(self, obj: str) -> Buffer | None:
        return super().dump(escape_nul(obj))


class _NulSafeLoader(TextLoader):
    """``text`` (and ``varchar``) values, NULs unescaped."""

    def load(self, data: Buffer) -> bytes | str:
        text = super().load(data)
        return unescape_nul(text) if isinstance(text, str) else text  # bytes: SQL_ASCII


def register_nul_escape(connection: psycopg.Connection[Any]) -> None:
    """Make ``connection`` escape NULs in every string parameter and text value."""
    connection.adapters.register_dumper(str, _NulSafeDumper)
    for type_name in ("text", "varchar"):
        connection.adapters.register_loader(type_name, _NulSafeLoader)


@lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (and ``%`` to ``%%``). The shared SQL has no
    ``?`` or ``%`` inside string literals; patterns are always parameters."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgRow:
    """A row readable by position and by column name, like ``sqlite3.Row``."""

    __slots__ = ("_names", "_values")

    def __init__(self, values: Sequence[Any], names: dict[str, int]) -> None:
        self._values = values
        self._names = names

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self._values[self._names[key]]
        return self._values[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __repr__(self) -> str:
        return f"<PgRow {dict(zip(self._names, self._values, strict=False))}>"


def _row_factory(cursor: psycopg.Cursor[Any]) -> Any:
    """psycopg's row factory protocol: a function of the cursor, once per result."""
    names: dict[str, int] = {}
    for index, column in enumerate(cursor.description or ()):
        names.setdefault(column.name, index)  # the first of two equal names, as sqlite3

    def make(values: Sequence[Any]) -> PgRow:
        return PgRow(values, names)

    return make


class PgConnection:
    """A psycopg connection in autocommit mode, seen as the store's
    :class:`~app.store.engine.Connection` (see the module docstring)."""

    __slots__ = ("raw",)

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    @property
    def in_transaction(self) -> bool:
        status = self.raw.info.transaction_status
        return status in (TransactionStatus.INTRANS, TransactionStatus.INERROR)

    def execute(self, sql: str, parameters: Any = (), /) -> psycopg.Cursor[Any]:
        """Run one statement. Prepared on the server once psycopg saw it a few times —
        except a ``q`` search (``ILIKE``): its best plan depends on the pattern's value (a
        rare trigram: the trigram index, ~1 ms; a common one: the conversation's own index
        in ``seq`` order), and a prepared statement falls back to one generic plan for
        all (measured: a rare ``q`` in 20,000 events, p50 10 ms prepared, 1.8 ms not)."""
        cursor = self.raw.cursor(row_factory=_row_factory)
        prepare = False if "ILIKE" in sql else None
        return cursor.execute(translate(sql), parameters, prepare=prepare)
