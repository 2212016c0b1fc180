"""Shared fixtures: a real SQLite file per test, a supervisor with the ``gated`` kind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.records import ConversationRecord
from app.settings import Settings
from app.store import NewConversation, SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry


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
