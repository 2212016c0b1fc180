"""Keep-alive connections over real HTTP: a response sent without reading the request body
leaves the connection usable or cleanly closed, and ``Connection: close`` is honoured.

A raw client (h11 over a trio TCP stream) sends two requests on one connection, so each
test sees exactly what happens to *that* connection; httpx checks the same from a pooling
client's side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from app.api.connection import DRAIN_MAX_BYTES
from app.settings import Settings
from tests.conftest import script
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

BODY_BYTES = 460_000  # the issue saw the next request hang from bodies of ~450 KB on
MAX_REQUEST_BYTES = 65_536  # so that a BODY_BYTES body is a 413
STEP_SECONDS = 5.0  # per exchange: a hang fails the test instead of waiting for its timeout
JSON = [("Content-Type", "application/json")]


class RawConnection:
    """One client connection driven by h11: requests go out, responses come back, in order."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.h11 = h11.Connection(h11.CLIENT)

    async def exchange(
        self, method: str, path: str, body: bytes = b"", headers: list[tuple[str, str]] = JSON
    ) -> tuple[h11.Response, bytes]:
        """Send a request while reading its response (the server may answer early)."""
        async with trio.open_nursery() as nursery:
            await self.send_head(method, path, [("Content-Length", str(len(body))), *headers])
            nursery.start_soon(self.send_body, body)
            response, data = await self.read_response()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.next_cycle()
        return response, data

    async def send_head(self, method: str, path: str, headers: list[tuple[str, str]]) -> None:
        """Send a request head; its body (framed as the headers say) is up to the caller."""
        request = h11.Request(method=method, target=path, headers=[("Host", self.host), *headers])
        await self.stream.send_all(self.h11.send(request) or b"")

    async def send_data(self, data: bytes) -> None:
        """Send part of a request body, in 64 KiB pieces."""
        for start in range(0, len(data), 65_536):
            piece = h11.Data(data=data[start : start + 65_536])
            await self.stream.send_all(self.h11.send(piece) or b"")

    async def send_body(self, body: bytes) -> None:
        """Send the rest of a request body, then the end of the request."""
        await self.send_data(body)
        await self.stream.send_all(self.h11.send(h11.EndOfMessage()) or b"")

    def next_cycle(self) -> None:
        """Get ready for the next exchange on this connection (both sides must be done)."""
        self.h11.start_next_cycle()

    async def read_response(self) -> tuple[h11.Response, bytes]:
        """The next response, read to its end."""
        response: h11.Response | None = None
        data = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, bytes(data)
            else:
                raise AssertionError(f"the connection ended mid-response: {event!r}")

    async def _next_event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.stream.receive_some(65_536))
        return event

    async def wait_closed_by_server(self) -> None:
        """Return once the server has closed the connection (end of file or reset)."""
        try:
            while await self.stream.receive_some(65_536):
                pass
        except trio.BrokenResourceError:
            pass  # a reset is a close too


@asynccontextmanager
async def raw_connection(server: LiveServer) -> AsyncIterator[RawConnection]:
    url = server.client.base_url
    assert url.host and url.port
    stream = await trio.open_tcp_stream(url.host, url.port)
    async with stream:
        yield RawConnection(stream, f"{url.host}:{url.port}")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    settings = Settings(data_dir=tmp_path / "data", max_request_bytes=MAX_REQUEST_BYTES)
    async with live_server(settings) as live:
        yield live


async def _idle_conversation(server: LiveServer) -> str:
    created = await server.client.post(
        "/api/conversations", json={"agent": script({"finish": "done"})}
    )
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["id"]
    return conversation_id


# Each answers without reading the body: no route, wrong method, nothing to pause, too large.
UNREAD_BODIES = [
    pytest.param("POST", "/api/nowhere", 404, id="404"),
    pytest.param("POST", "/health", 405, id="405"),
    pytest.param("POST", "/api/conversations/{idle}/pause", 409, id="409"),
    pytest.param("POST", "/api/conversations", 413, id="413"),
]


@pytest.mark.parametrize(("method", "path", "status"), UNREAD_BODIES)
async def test_unread_body_then_next_request_on_same_connection(
    server: LiveServer, method: str, path: str, status: int
) -> None:
    """Answered after 64 KiB of a 460 KB body, the rest sent after the answer: the same
    connection then serves the next request."""
    path = path.format(idle=await _idle_conversation(server))
    body = b"x" * BODY_BYTES
    async with raw_connection(server) as connection:
        await connection.send_head(method, path, [*JSON, ("Content-Length", str(BODY_BYTES))])
        with trio.fail_after(STEP_SECONDS):
            await connection.send_data(body[:65_536])
            response, _ = await connection.read_response()  # before the body was read
        assert response.status_code == status
        assert (b"connection", b"close") not in response.headers  # to be drained: kept alive
        with trio.fail_after(STEP_SECONDS):
            await connection.send_body(body[65_536:])
            connection.next_cycle()
            response, answer = await connection.exchange("GET", "/health", headers=[])
        assert (response.status_code, answer) == (200, b'{"status":"ok"}')


@pytest.mark.parametrize(("method", "path", "status"), UNREAD_BODIES)
async def test_unread_body_then_next_request_with_httpx(
    server: LiveServer, method: str, path: str, status: int
) -> None:
    """httpx gets the early answer, and its next request reuses the same connection."""
    path = path.format(idle=await _idle_conversation(server))

    async def body_answered_early() -> AsyncIterator[bytes]:
        yield b"x" * 65_536
        await trio.testing.wait_all_tasks_blocked()  # the server has answered, body unread
        yield b"x" * (BODY_BYTES - 65_536)

    headers = [*JSON, ("Content-Length", str(BODY_BYTES))]
    with trio.fail_after(STEP_SECONDS):
        first = await server.client.request(
            method, path, content=body_answered_early(), headers=headers
        )
    assert first.status_code == status
    with trio.fail_after(STEP_SECONDS):
        second = await server.client.get("/api/server")
    assert second.status_code == 200
    reused = second.extensions["network_stream"] is first.extensions["network_stream"]
    assert reused, "the connection was not kept alive"


async def test_body_beyond_drain_limit_gets_connection_close(server: LiveServer) -> None:
    """A body too large to drain: the response says ``Connection: close`` and the server
    closes the connection instead of holding it half-read."""
    async with raw_connection(server) as connection:
        length = str(DRAIN_MAX_BYTES + BODY_BYTES)
        await connection.send_head("POST", "/api/nowhere", [*JSON, ("Content-Length", length)])
        with trio.fail_after(STEP_SECONDS):
            response, _ = await connection.read_response()
            assert response.status_code == 404
            assert (b"connection", b"close") in response.headers
            await connection.wait_closed_by_server()


async def test_chunked_unread_body_is_drained_before_the_close(server: LiveServer) -> None:
    """A chunked body of unknown length: ``Connection: close``, yet the whole response
    arrives and the connection ends with a clean end of file."""
    async with raw_connection(server) as connection:
        chunked = [*JSON, ("Transfer-Encoding", "chunked")]
        await connection.send_head("POST", "/api/nowhere", chunked)
        with trio.fail_after(STEP_SECONDS):
            await connection.send_body(b"x" * BODY_BYTES)
            response, body = await connection.read_response()
            assert b"not_found" in body
            assert await connection.stream.receive_some(65_536) == b""  # end of file, no reset
        assert (b"connection", b"close") in response.headers


async def test_connection_close_request_is_answered_then_closed(server: LiveServer) -> None:
    """A request with ``Connection: close`` gets its response, then the server closes."""
    async with raw_connection(server) as connection:
        with trio.fail_after(STEP_SECONDS):
            response, _ = await connection.exchange(
                "GET", "/health", headers=[("Connection", "close")]
            )
            assert response.status_code == 200
            assert (b"connection", b"close") in response.headers
            assert await connection.stream.receive_some(65_536) == b""
