"""Shared fixtures: a real SQLite file per test, a supervisor with the ``gated`` kind, and
a throwaway PostgreSQL schema for the tests that need one (``postgres_url``, tests/pg.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.records import ConversationRecord
from app.settings import Settings
from app.store import NewConversation, SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from tests import pg

#: Why PostgreSQL cannot be used here, once asked (``""``: it can).
_postgres_missing: str | None = None


def _postgres_reason() -> str:
    global _postgres_missing
    if _postgres_missing is None:
        _postgres_missing = pg.unavailable_reason() or ""
    return _postgres_missing


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One throwaway database for the session (dropped at its end).

    Without a server: fails under CI (``CI`` set: PostgreSQL must be there, never skipped
    silently), skips elsewhere; the summary of ``make test`` counts the skipped tests.
    """
    reason = _postgres_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests (.ci/run starts it)")
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    with pg.throwaway_database() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_database: str) -> Iterator[str]:
    """A URL of the session's database whose connections work in a fresh schema."""
    with pg.throwaway_schema(postgres_database) as url:
        yield url


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say plainly when the PostgreSQL tests did not run (a user's machine without it)."""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "PostgreSQL tests skipped" in str(report.longrepr)
    ]
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"{len(skipped)} PostgreSQL tests SKIPPED: {_postgres_reason()}."
            " Start PostgreSQL (or set TRELLIS_TEST_POSTGRES to a server URL) to run them.",
            yellow=True,
        )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_concurrent_runs=2, max_queued_runs=3)


@pytest.fixture
def gates() -> Iterator[Gates]:
    gates = Gates()
    yield gates
    gates.release_all()


@pytest.fixture
def store(settings: Settings) -> Iterator[SqliteStore]:
    store = SqliteStore(settings.database_path)
    yield store
    store.close()


@pytest.fixture
async def supervisor(
    settings: Settings, store: SqliteStore, gates: Gates
) -> AsyncIterator[RunSupervisor]:
    async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
        yield sup
    assert_all_returned(sup)


def assert_all_returned(sup: RunSupervisor) -> None:
    """Nothing borrowed, nothing waiting, no run thread alive: the supervisor is clean."""
    stats = sup.statistics()
    assert (stats.running, stats.queued, stats.run_threads_alive) == (0, 0, 0), stats
    assert (stats.io_borrowed, stats.tool_borrowed) == (0, 0), stats
    assert sup.run_limiter.borrowed_tokens == 0
    assert sup.run_limiter.statistics().tasks_waiting == 0


async def new_conversation(
    sup: RunSupervisor, agent: dict[str, Any], **fields: Any
) -> ConversationRecord:
    """Create a conversation through the store, as the API would."""
    new = NewConversation(
        agent=agent,
        title=fields.pop("title", None),
        max_iterations=fields.pop("max_iterations", 100),
        **fields,
    )
    conversation, _ = await sup.io(sup.store.create_conversation, new)
    return conversation


def gated(*steps: str) -> dict[str, Any]:
    return {"kind": "gated", "steps": list(steps)}


def script(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "script", "steps": list(steps)}
