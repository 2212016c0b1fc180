"""The lazy httpx client: built once, in a thread of its own, never leaked by a cancel."""

from __future__ import annotations

import threading

import httpx
import pytest
import trio
import trio.testing

from app.lazy_client import LazyAsyncClient, LazyClientStatistics

pytestmark = pytest.mark.timeout(30)


class GatedBuild:
    """A ``build`` that blocks in its worker thread until the test lets it finish; it
    records each client it built and the thread it ran in."""

    def __init__(self, *, fail: bool = False) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail = fail
        self.built: list[httpx.AsyncClient] = []
        self.threads: list[int] = []

    def __call__(self) -> httpx.AsyncClient:
        self.threads.append(threading.get_ident())
        self.entered.set()
        self.release.wait()
        if self.fail:
            raise RuntimeError("no CA bundle")
        client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(204)))
        self.built.append(client)
        return client

    async def wait_entered(self) -> None:
        # A limiter of the test's own: the default one must stay untouched.
        await trio.to_thread.run_sync(self.entered.wait, 5, limiter=trio.CapacityLimiter(1))


async def test_lazy_client_builds_once_in_its_own_thread_for_concurrent_callers() -> None:
    """Two first callers share one build, run in a worker thread on the client's own
    limiter (never Trio's default one); both get the same client."""
    build = GatedBuild()
    lazy = LazyAsyncClient(build)
    got: list[httpx.AsyncClient] = []

    async def get() -> None:
        got.append(await lazy.get())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get)
            nursery.start_soon(get)
            await build.wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            assert lazy.statistics() == LazyClientStatistics(open=False, building=True)
            assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            assert "building" in repr(lazy)
            build.release.set()
        assert got == build.built * 2 and len(build.built) == 1
        assert build.threads[0] != threading.get_ident()
        assert await lazy.get() is got[0]
        await lazy.aclose()
    assert got[0].is_closed


async def test_lazy_client_cancelled_get_keeps_the_client_its_thread_built() -> None:
    """A get() cancelled while its thread builds is not abandoned: it waits for the build,
    keeps the client, then raises Cancelled; the next get() reuses it, aclose closes it."""
    build = GatedBuild()
    lazy = LazyAsyncClient(build)
    got: list[httpx.AsyncClient] = []
    scope = trio.CancelScope()

    async def get() -> None:
        with scope:
            got.append(await lazy.get())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get)
            await build.wait_entered()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert lazy.statistics().building  # the thread runs on; the call waits for it
            build.release.set()
        assert scope.cancelled_caught and got == []
        assert lazy.statistics() == LazyClientStatistics(open=True, building=False)
        assert await lazy.get() is build.built[0]
        await lazy.aclose()
    assert len(build.built) == 1 and build.built[0].is_closed


async def test_lazy_client_aclose_waits_for_a_build_and_closes_its_client() -> None:
    """aclose() during a build waits for it and closes the client it made, so no pool is
    left open behind a closed owner; aclose is idempotent and shielded."""
    build = GatedBuild()
    lazy = LazyAsyncClient(build)

    async def close_while_cancelled() -> None:
        with trio.CancelScope() as closing:
            closing.cancel()  # shielded: it waits and closes all the same
            await lazy.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lazy.get)
            await build.wait_entered()
            nursery.start_soon(close_while_cancelled)
            await trio.testing.wait_all_tasks_blocked()
            assert lazy.statistics().building and build.built == []
            build.release.set()
        assert len(build.built) == 1 and build.built[0].is_closed
        assert lazy.statistics() == LazyClientStatistics(open=False, building=False)
        await lazy.aclose()
    assert repr(lazy) == "<LazyAsyncClient closed>"


async def test_lazy_client_keeps_nothing_when_the_build_fails() -> None:
    """A build that raises reaches the caller; nothing is kept, and the next get() builds
    again (after aclose, likewise, a new client)."""
    build = GatedBuild(fail=True)
    build.release.set()
    lazy = LazyAsyncClient(build)
    with trio.fail_after(10):
        with pytest.raises(RuntimeError, match="no CA bundle"):
            await lazy.get()
        assert not lazy.statistics().open
        build.fail = False
        first = await lazy.get()
        await lazy.aclose()
        second = await lazy.get()
        await lazy.aclose()
    assert first is not second and first.is_closed and second.is_closed
    assert len(build.threads) == 3
