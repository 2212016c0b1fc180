"""``naive_mode``: runs and short I/O share Trio's default thread limiter, with no line.

The design Trellis replaces, kept for benchmarks and teaching. The tests shrink Trio's default
limiter (a per-``trio.run`` object: each test has its own) to a few tokens, hold that many
gated runs mid-step, and watch a short store read: in naive mode it waits for a run to end,
in the normal mode it does not notice the runs at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from app.settings import Settings
from app.store import SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing import Gates, gated_registry
from tests.conftest import assert_all_returned, gated, new_conversation
from tests.live import live_server

pytestmark = pytest.mark.timeout(30)

THREADS = 3  # Trio's default limiter, shrunk: as many tokens as the test holds runs


def default_limiter() -> trio.CapacityLimiter:
    return trio.to_thread.current_default_thread_limiter()


@asynccontextmanager
async def open_supervisor(
    tmp_path: Path, gates: Gates, *, naive_mode: bool, **fields: Any
) -> AsyncIterator[RunSupervisor]:
    """A supervisor on a fresh store; on exit every run is stopped and checked returned."""
    settings = Settings(data_dir=tmp_path / "data", naive_mode=naive_mode, **fields)
    store = SqliteStore(settings.database_path)
    try:
        async with open_run_supervisor(settings, store, registry=gated_registry(gates)) as sup:
            yield sup
        assert_all_returned(sup)
    finally:
        store.close()


async def hold_runs(sup: RunSupervisor, gates: Gates, count: int) -> list[str]:
    """Start ``count`` runs and wait until every one is mid-step at gate ``hold``."""
    run_ids = []
    for _ in range(count):
        conversation = await new_conversation(sup, gated("hold"))
        run_ids.append((await sup.start_run(conversation.id)).id)
    await gates["hold"].wait_entered(count)
    return run_ids


def test_naive_mode_is_off_by_default() -> None:
    """The default settings keep the three limiters; the mode is named for what it is for."""
    assert Settings().naive_mode is False
    description = Settings.model_fields["naive_mode"].description or ""
    assert "for benchmarks and teaching only" in description.lower()


async def test_supervisor_default_mode_has_limiters_of_its_own(
    tmp_path: Path, gates: Gates
) -> None:
    """Without naive_mode neither runs nor I/O touch Trio's default limiter."""
    async with open_supervisor(tmp_path, gates, naive_mode=False) as sup:
        assert sup.io_limiter is not default_limiter()
        assert sup.run_limiter.total_tokens == sup.settings.max_concurrent_runs


@pytest.mark.parametrize(
    "naive_mode", [pytest.param(True, id="naive"), pytest.param(False, id="trellis")]
)
async def test_supervisor_short_io_waits_for_runs_only_in_naive_mode(
    tmp_path: Path, gates: Gates, naive_mode: bool
) -> None:
    """Runs holding every default-limiter token block a store read in naive mode only."""
    default_limiter().total_tokens = THREADS
    async with open_supervisor(
        tmp_path, gates, naive_mode=naive_mode, max_concurrent_runs=THREADS
    ) as sup:
        with trio.fail_after(10):
            conversation = await new_conversation(sup, gated("other"))
            await hold_runs(sup, gates, THREADS)
            done = trio.Event()

            async def read() -> None:
                await sup.io(sup.store.get_conversation, conversation.id)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                if naive_mode:
                    assert not done.is_set()
                    assert default_limiter().statistics().tasks_waiting == 1
                    gates["hold"].release()  # the runs finish, their threads return
                await done.wait()
            if not naive_mode:
                assert sup.statistics().running == THREADS  # still mid-step, gates closed
        gates.release_all()


async def test_supervisor_naive_mode_has_no_queue(tmp_path: Path, gates: Gates) -> None:
    """In naive mode every admitted run is seated at once, past max_concurrent_runs: no
    queue position, nothing queued; a run finding every thread taken waits silently."""
    limiter, marker = default_limiter(), object()
    limiter.total_tokens = THREADS + 1
    async with open_supervisor(tmp_path, gates, naive_mode=True, max_concurrent_runs=1) as sup:
        with trio.fail_after(10):
            held = await hold_runs(sup, gates, THREADS)
            late = await new_conversation(sup, gated("late"))
            run = await sup.start_run(late.id)
            # No checkpoint since start_run returned: the run's task has not asked for a
            # thread yet. Take the last one first (a short call of someone else's).
            limiter.acquire_on_behalf_of_nowait(marker)
            await trio.testing.wait_all_tasks_blocked()
            assert run.queue_position is None
            assert [sup.queue_position(run_id) for run_id in [*held, run.id]] == [None] * 4
            stats = sup.statistics()
            assert (stats.running, stats.queued, stats.waiting_for_slot) == (4, 0, 0)
            assert limiter.statistics().tasks_waiting == 1  # the run, for a thread
            assert gates["late"].entries == 0
            limiter.release_on_behalf_of(marker)
            await gates["late"].wait_entered()
        gates.release_all()


async def test_api_server_says_naive_mode_is_on(tmp_path: Path) -> None:
    """GET /api/server shows naive_mode and the shared limiter; run slots cannot be set."""
    settings = Settings(data_dir=tmp_path / "data", naive_mode=True)
    async with live_server(settings) as server:
        info = (await server.client.get("/api/server")).json()
        assert info["settings"]["naive_mode"] is True
        total = int(default_limiter().total_tokens)
        assert info["limits"]["io_threads"] == info["limits"]["max_concurrent_runs"] == total
        response = await server.client.patch("/api/server/limits", json={"max_concurrent_runs": 5})
        assert response.status_code == 409
        assert "naive_mode" in response.json()["error"]["message"]
        assert server.supervisor.run_limiter.total_tokens == float("inf")
