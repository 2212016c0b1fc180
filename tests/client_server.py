"""What the client tests run against: a real server (Hypercorn, 127.0.0.1, port 0) with the
``gated`` agent kind, the same server in a thread of its own (for asyncio), and a loopback
TCP proxy whose connections a test can cut, to drop a stream for real.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from app.client import AsyncTrellisClient
from app.settings import Settings
from app.testing import Gates, gated_registry
from tests.live import LiveServer, live_server

#: The API keys of the keyed tests: a tenant's key and an admin key.
ALICE = "alice-key-0123456789abcdef"
ROOT = "root-key-0123456789abcdef00"
KEYS = [{"key": ALICE, "tenant": "alice"}, {"key": ROOT, "tenant": "ops", "admin": True}]


def script(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "script", "steps": list(steps)}


def gated(*steps: str) -> dict[str, Any]:
    return {"kind": "gated", "steps": list(steps)}


@asynccontextmanager
async def serving(settings: Settings, gates: Gates) -> AsyncIterator[tuple[LiveServer, str]]:
    """A live server with the ``gated`` kind, and its base URL."""
    async with live_server(settings, registry=gated_registry(gates)) as server:
        yield server, str(server.client.base_url).rstrip("/")


@asynccontextmanager
async def async_client(base_url: str, **options: Any) -> AsyncIterator[AsyncTrellisClient]:
    """An :class:`AsyncTrellisClient` built in a thread (building one loads the CA bundle,
    ~40 ms of blocking work the server's Trio thread should not do: see app/lazy_client.py)."""
    client = await trio.to_thread.run_sync(lambda: AsyncTrellisClient(base_url, **options))
    async with client:
        yield client


@contextmanager
def server_in_thread(settings: Settings, gates: Gates) -> Iterator[str]:
    """The live server in a thread running its own ``trio.run``, for clients on another
    event loop (asyncio); yields its base URL, stops it (draining) on the way out."""
    started: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event] | BaseException]
    started = queue.Queue()

    async def main() -> None:
        stop = trio.Event()
        async with serving(settings, gates) as (_, base_url):
            started.put((base_url, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # reported to the test, not lost in the thread
            started.put(error)

    thread = threading.Thread(target=run, name="trellis-test-server")
    thread.start()
    item = started.get(timeout=30)
    if isinstance(item, BaseException):
        raise item
    base_url, token, stop = item
    try:
        yield base_url
    finally:
        gates.release_all()
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=30)
        assert not thread.is_alive()


@dataclass
class CuttableProxy:
    """A loopback TCP proxy in front of ``target_port`` that a test can cut.

    :meth:`cut` closes every connection it carries, at once (the client sees its answer
    end mid-body); :meth:`cut_mid_frame` forwards the next frame the server sends but for
    its final blank line, and then cuts (the client holds every line of a frame that was
    never completed). New connections are carried as before, until :meth:`stop_listening`.
    ``requests`` keeps the first bytes each connection sent (its request head), so a test
    can read the headers of every reconnection.

    Ownership: :meth:`serve` runs in the test's nursery and owns one task per connection.
    """

    target_port: int
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    _scopes: set[trio.CancelScope] = field(default_factory=set)
    #: What :meth:`cut_mid_frame` forwarded before it cut.
    cut_forwarded: bytes = b""
    _cut_next_frame: bool = False
    _accepting: trio.CancelScope = field(default_factory=trio.CancelScope)
    _closed: trio.Event = field(default_factory=trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.requests)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        async with trio.open_nursery() as nursery:
            with self._accepting:
                async with listener:
                    while True:
                        nursery.start_soon(self._carry, await listener.accept())
            self._closed.set()

    def cut(self) -> None:
        """Close every connection now."""
        for scope in list(self._scopes):
            scope.cancel()

    def cut_mid_frame(self) -> None:
        """Forward the next bytes from the server up to the blank line that would complete
        their first SSE frame (``\\n\\n``), without it; then :meth:`cut`."""
        self._cut_next_frame = True

    async def stop_listening(self) -> None:
        """Refuse new connections from now on (a server that went away); the ones open
        stay open."""
        self._accepting.cancel()
        await self._closed.wait()

    async def _carry(self, client: trio.SocketStream) -> None:
        index = len(self.requests)
        self.requests.append(b"")
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            try:
                with trio.CancelScope() as scope:
                    self._scopes.add(scope)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._upstream, client, server, index)
                        nursery.start_soon(self._downstream, server, client, scope)
                self._scopes.discard(scope)
            finally:
                await trio.aclose_forcefully(server)
        finally:
            await trio.aclose_forcefully(client)

    async def _upstream(
        self, client: trio.SocketStream, server: trio.SocketStream, index: int
    ) -> None:
        while data := await client.receive_some():
            if not self.requests[index]:
                self.requests[index] = data
            await server.send_all(data)

    async def _downstream(
        self, server: trio.SocketStream, client: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        while data := await server.receive_some():
            if self._cut_next_frame:
                self._cut_next_frame = False
                self.cut_forwarded = data[: data.index(b"\n\n") + 1]
                await client.send_all(self.cut_forwarded)
                scope.cancel()
                return
            await client.send_all(data)
        scope.cancel()  # the server closed: so does the client's side
