"""One :class:`httpx.AsyncClient`, built on first use in a worker thread, shared after that.

Building an ``AsyncClient`` loads the CA bundle into a TLS context: ~40 ms of blocking
work, too long for the Trio thread and pointless to pay before the first request (a
server whose provider or webhooks are never used never pays it). A
:class:`LazyAsyncClient` is a coat check for that client: the first caller of
:meth:`~LazyAsyncClient.get` has it made (in a thread), everyone after gets the same one,
and :meth:`~LazyAsyncClient.aclose` hands it back. Used by
:class:`~app.agents.provider.ProviderClient` and
:class:`~app.live.webhooks.WebhookDispatcher`.

Ownership: the object that holds a ``LazyAsyncClient`` owns the client and must call
:meth:`~LazyAsyncClient.aclose` once no request is in flight; afterwards the next
:meth:`~LazyAsyncClient.get` builds a new client. The build thread runs on a
:class:`trio.CapacityLimiter` of one token of its own (or the one its owner passes), never
Trio's default limiter, whose threads serve the store: one build runs at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio


@dataclass(frozen=True, slots=True)
class LazyClientStatistics:
    """A snapshot: whether a client is built, and whether a build thread is running."""

    open: bool
    building: bool


class LazyAsyncClient:
    """The client ``build`` returns, built at most once until :meth:`aclose`.

    ``build`` runs in a worker thread: it may block, and must not touch Trio. ``limiter``
    is the limiter that thread runs on (default: one of its own, with one token).
    """

    def __init__(
        self,
        build: Callable[[], httpx.AsyncClient],
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._build = build
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        self._client: httpx.AsyncClient | None = None
        self._lock = trio.Lock()  # held while building: a second caller waits for the first

    def __repr__(self) -> str:
        s = self.statistics()
        building = " building" if s.building else ""
        return f"<LazyAsyncClient {'open' if s.open else 'closed'}{building}>"

    def statistics(self) -> LazyClientStatistics:
        return LazyClientStatistics(self._client is not None, self.limiter.borrowed_tokens > 0)

    async def get(self) -> httpx.AsyncClient:
        """The client, built now (in a worker thread) if there is none yet. Concurrent
        first callers wait for the one build on a lock, and all get the same client.

        Cancellation:
            While waiting for the lock or the limiter, ``Cancelled`` is raised at once. Once
            the build thread runs it is *not* abandoned (``abandon_on_cancel=False``): a
            thread cannot be stopped, and an abandoned one's client would be dropped
            without being closed — its connection pool leaked. So a cancelled call waits
            for the build (~40 ms), keeps the client for the next caller (or
            :meth:`aclose`), and only then raises ``Cancelled``.

        Errors:
            Whatever ``build`` raises; nothing is kept, and the next call tries again.
        """
        async with self._lock:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(self._build, limiter=self.limiter)
                await trio.lowlevel.checkpoint_if_cancelled()  # kept; now honour a cancel
            return self._client

    async def aclose(self) -> None:
        """Close the client and its connections. Idempotent; the next :meth:`get` builds
        a new client. A build in progress is waited for, and its client closed too.

        Cancellation:
            Shielded: closing sockets is quick, and a half-closed pool would leak them.
        """
        with trio.CancelScope(shield=True):
            async with self._lock:
                client, self._client = self._client, None
                if client is not None:
                    await client.aclose()
