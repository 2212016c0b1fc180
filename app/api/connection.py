"""Keep-alive connections stay usable: every exchange ends with the connection recycled or closed.

An HTTP/1.1 connection carries one exchange after another, so an exchange may end only once
both sides are done: the response sent *and* the request body read to its end. Two things
broke this under Hypercorn's trio worker with Quart-Trio (measured on Hypercorn 0.18,
quart-trio 0.12, h11 0.16), and this module is the ASGI middleware that fixes both
(:func:`install` puts it in front of the app):

1. **The end of an exchange was cancelled half-way.** Hypercorn finishes an exchange inside
   the app's last ``send``: it puts ``http.disconnect`` into the app's queue, then recycles
   the connection (and arms its keep-alive idle timer) or closes it. Quart-Trio's reader
   task takes that ``http.disconnect`` at once and cancels the request's nursery — the very
   task still running Hypercorn's bookkeeping. The cancel lands on its first checkpoint:

   * a connection to be closed (``Connection: close`` from the client, or a body left
     unread) was never closed — ``send_eof`` was interrupted before ``aclose``;
   * a recycled connection never re-armed its idle timer, so an idle keep-alive client was
     not closed after ``keep_alive_timeout``, nor at once on shutdown: SIGTERM waited for
     Hypercorn's ``graceful_timeout`` (1 s) instead.

   The fix: the last ``send`` runs shielded from cancellation (bounded by
   :data:`FINISH_TIMEOUT_SECONDS`, a limit that is never expected to be reached).

2. **A response sent without reading the request body** (404, 405, 409, 413, a refused
   guard) left the rest of the body on the wire. Hypercorn then meant to close the
   connection, without saying ``Connection: close`` — and with (1) the close was mostly
   skipped: h11 swallowed the rest of the body and then held the client's next request,
   unanswered, forever. Even a close that happens sends a TCP reset when unread data is
   pending, which can destroy the response before the client reads it. The fix:

   * before the last ``send``, the rest of the body is read and discarded (at most
     :data:`DRAIN_MAX_BYTES`, within :data:`DRAIN_TIMEOUT_SECONDS`); the exchange then ends
     normally and the connection stays usable;
   * a body of unknown length (chunked) gets ``Connection: close`` on its response, so the
     client expects the close; it is still drained within the same bounds first, so that
     the close is clean and the response arrives intact;
   * a body whose announced rest is larger than :data:`DRAIN_MAX_BYTES` gets
     ``Connection: close`` and is not drained: the connection is closed at once (a client
     still sending it may then see a reset).

Only HTTP/1.x exchanges are touched; WebSockets and HTTP/2 pass through unchanged.

**Cancellation:** the drain is bounded in bytes and time and runs in the request's task;
the shielded last ``send`` only finishes Hypercorn's bookkeeping for this connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)
from quart import Quart

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

# Read-and-discard is cheap (a loopback client sends 8 MiB in a few milliseconds) and lets
# the client receive its response; beyond this a client pays with a new connection instead.
# Go's net/http drains 256 KiB; bodies here are JSON of up to max_request_bytes (1 MiB by
# default), and a 413 for a somewhat larger one should still arrive intact.
DRAIN_MAX_BYTES = 8 * 1024 * 1024
DRAIN_TIMEOUT_SECONDS = 5.0
# The last send does no I/O that can wait on the client (Hypercorn shields its socket
# writes itself); this bound only guarantees that no shield can hold a task forever.
FINISH_TIMEOUT_SECONDS = 10.0
HTTP1_VERSIONS = frozenset({"1.0", "1.1"})


def install(app: Quart) -> None:
    """Put :class:`KeepAliveGuard` in front of ``app``'s ASGI handler."""
    app.asgi_app = KeepAliveGuard(app.asgi_app)  # type: ignore[method-assign]


class KeepAliveGuard:
    """ASGI middleware: every HTTP/1.x exchange ends with its body read and its end unbroken."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope["http_version"] not in HTTP1_VERSIONS:
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope, receive, send)
        await self.app(scope, exchange.receive, exchange.send)


class Exchange:
    """One request and its response, as seen through the ASGI calls of one HTTP/1.x exchange.

    ``receive`` counts the body as it arrives, whoever reads it; ``send`` applies the rules
    of the module docstring to the response's start and last message.
    """

    def __init__(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        self._receive = receive
        self._send = send
        self._announced = _announced_length(scope)
        self._received = 0
        self._body_complete = False  # the body's last message arrived, or the client left
        self._drain_until: int | None = None  # byte count at which a drain gives up
        self._drain_over = trio.Event()

    async def receive(self) -> ASGIReceiveEvent:
        """The next message from the client; the body is counted on its way through."""
        event = await self._receive()
        message = cast(dict[str, Any], event)
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            self._body_complete = not message.get("more_body", False)
        elif message["type"] == "http.disconnect":
            self._body_complete = True
        if self._body_complete or (
            self._drain_until is not None and self._received > self._drain_until
        ):
            self._drain_over.set()
        return event

    async def send(self, event: ASGISendEvent) -> None:
        """Pass ``event`` on; the response's start and last message get the rules above."""
        message = cast(dict[str, Any], event)
        if message["type"] == "http.response.start" and self._needs_close():
            event = cast(
                ASGISendEvent, {**message, "headers": [*message.get("headers", []), _CLOSE]}
            )
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if self._needs_drain():
                await self._drain()
            # Hypercorn ends the exchange inside this call: recycle or close, and re-arm
            # the idle timer. A cancel half-way would leave the connection neither.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FINISH_TIMEOUT_SECONDS
                await self._send(event)
            return
        await self._send(event)

    def _unread(self) -> int | None:
        """Announced body bytes not received yet; None for a body of unknown length."""
        return None if self._announced is None else self._announced - self._received

    def _needs_close(self) -> bool:
        """The rest of the body is unknown (chunked) or too large to be drained for sure."""
        unread = self._unread()
        return not self._body_complete and (unread is None or unread > DRAIN_MAX_BYTES)

    def _needs_drain(self) -> bool:
        """The rest of the body is worth draining: of unknown length, or small enough."""
        unread = self._unread()
        return not self._body_complete and (unread is None or unread <= DRAIN_MAX_BYTES)

    async def _drain(self) -> None:
        """Read and discard the rest of the body, within the byte and time bounds."""
        self._drain_until = self._received + DRAIN_MAX_BYTES
        with trio.move_on_after(DRAIN_TIMEOUT_SECONDS):
            async with trio.open_nursery() as nursery:
                # The app may be reading too (Quart-Trio always is, until the response
                # ends): whoever takes the last message, the event says so.
                nursery.start_soon(self._discard_until_cancelled)
                await self._drain_over.wait()
                nursery.cancel_scope.cancel()

    async def _discard_until_cancelled(self) -> None:
        while True:
            await self.receive()


_CLOSE = (b"connection", b"close")


def _announced_length(scope: HTTPScope) -> int | None:
    """The body's length from the request head: ``Content-Length``, 0 for none, or None
    for a chunked body (h11 has already refused malformed or conflicting values)."""
    length = 0
    for name, value in scope["headers"]:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return None
        if lowered == b"content-length":
            length = int(value)
    return length
