"""Throwaway PostgreSQL databases for the tests that need a real server.

The server is the one at ``$TRELLIS_TEST_POSTGRES`` (default: the local server these
machines run, ``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth). A test session
creates one database of its own (``trellis_test_<random>``) and drops it at the end; each
test gets a fresh *schema* in it (cheap: ~10 ms, where a database costs ~200 ms), named
first in the ``search_path`` of the URL it is given, so the store creates its tables there.
Extensions live in ``public``, which stays on the path.

Where no server answers: with ``CI`` set, the tests that need one fail (CI must never skip
them silently); elsewhere they are skipped, and ``make test`` says so in its summary
(``tests/conftest.py``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

ADMIN_URL = os.environ.get("TRELLIS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

#: Extensions the store uses, created once per test database (in ``public``).
EXTENSIONS = ("pg_trgm",)


def unavailable_reason() -> str | None:
    """Why the tests cannot use PostgreSQL (``None``: they can)."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"no PostgreSQL at {ADMIN_URL} ({first_line})"
    return None


def with_database(url: str, database: str) -> str:
    """``url`` naming another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose connections put ``schema`` first on the search path (then public)."""
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema},public")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit(parts._replace(query=query))


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new database (its URL), dropped with whatever is still connected at the end."""
    name = f"trellis_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(ADMIN_URL, name)
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            for extension in EXTENSIONS:
                connection.execute(f"CREATE EXTENSION IF NOT EXISTS {extension} SCHEMA public")
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def throwaway_schema(database_url: str) -> Iterator[str]:
    """A new schema in the database at ``database_url``; yields a URL that uses it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield with_search_path(database_url, name)
    finally:
        with psycopg.connect(database_url, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def terminate_sessions(url: str, application_name: str) -> list[bool]:
    """End every session of the database at ``url`` whose ``application_name`` is the one
    given (as a database restart or an administrator would); whether each was ended."""
    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return [bool(ended) for (ended,) in rows]
