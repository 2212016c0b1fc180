"""The asynchronous client: :class:`AsyncTrellisClient`, for Trio and asyncio alike.

It is :class:`httpx.AsyncClient` underneath (which runs under either loop through anyio),
and sleeps with :func:`anyio.sleep` (retries, stream backoff), so it never names a loop.
Every method builds its request with the function of the same name in
:mod:`app.client._calls`; the sync client (:mod:`app.client._sync`) sends the very same
calls — only the sending and the sleeping differ.

Ownership: the client owns its connection pool; close it with ``async with`` or
:meth:`AsyncTrellisClient.aclose`. It owns no task: every request runs in the task that
awaits it. Cancellation: cancelling a call (a Trio cancel scope, an asyncio task cancel)
abandons the request and its connection; the server may or may not have processed it —
a create retried after that should carry the same ``idempotency_key``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx

from app.api.schemas import (
    ConversationList,
    EventList,
    MessageAccepted,
    RunList,
    ServerInfo,
    ServerLimits,
)
from app.client import _calls as calls
from app.client._errors import connection_errors, error_from_response
from app.client._requests import (
    Call,
    ClientOptions,
    RetryPolicy,
    build_request,
    documented_by,
    finish,
    with_idempotency_key,
)
from app.client._sse import Delta, Follow
from app.events import Event
from app.records import ConversationListItem, ConversationRecord, RunRecord

T = TypeVar("T")


class AsyncTrellisClient:
    """A Trellis server's HTTP API as awaitable methods returning the server's own models.

    ::

        async with AsyncTrellisClient("http://127.0.0.1:8000", api_key=key) as client:
            conversation = await client.create_conversation(
                {"kind": "script", "steps": [{"say": "hi"}]}, run=True
            )
            run = await client.wait_run(conversation.id, conversation.run.id)

    ``timeout``: seconds for connecting and for each read (``wait_run`` adds its own wait).
    ``retries_on_429``: retry a refused run (429 queue full) that many times, sleeping
    ``Retry-After`` seconds in between; creates then carry an automatic idempotency key.
    ``transport``: an httpx transport (tests, proxies, Unix sockets).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries_on_429: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.options = ClientOptions(base_url, api_key, timeout, retries_on_429)
        self._http = httpx.AsyncClient(**self.options.httpx_arguments(), transport=transport)

    def __repr__(self) -> str:
        return f"<AsyncTrellisClient {self.options}>"

    async def __aenter__(self) -> AsyncTrellisClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (open streams end with it)."""
        await self._http.aclose()

    async def _call(self, call: Call[T]) -> T:
        """Send ``call``; retry a 429 as :attr:`options` allow; its result or its error."""
        call = with_idempotency_key(call, self.options.retries_on_429)
        retries = RetryPolicy(self.options.retries_on_429)
        while True:
            request = build_request(self._http, call, self.options.timeouts)
            with connection_errors():
                response = await self._http.send(request)
            delay = retries.delay(response)
            if delay is None:
                return finish(call, response)
            await anyio.sleep(delay)

    # -- conversations ------------------------------------------------------------------

    @documented_by(calls.create_conversation)
    async def create_conversation(
        self,
        agent: dict[str, Any],
        *,
        title: str | None = None,
        initial_message: str | None = None,
        max_iterations: int | None = None,
        workspace: str | None = None,
        run: bool = False,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> ConversationRecord:
        return await self._call(
            calls.create_conversation(
                agent,
                title=title,
                initial_message=initial_message,
                max_iterations=max_iterations,
                workspace=workspace,
                run=run,
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
            )
        )

    @documented_by(calls.list_conversations)
    async def list_conversations(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> ConversationList:
        return await self._call(calls.list_conversations(status=status, limit=limit, cursor=cursor))

    async def iter_conversations(
        self, *, status: str | None = None
    ) -> AsyncIterator[ConversationListItem]:
        """Every conversation (newest first), page after page: ``list_conversations``
        following ``next_cursor`` until the last page."""
        cursor: str | None = None
        while True:
            page = await self.list_conversations(status=status, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    @documented_by(calls.get_conversation)
    async def get_conversation(self, conversation_id: str) -> ConversationRecord:
        return await self._call(calls.get_conversation(conversation_id))

    @documented_by(calls.delete_conversation)
    async def delete_conversation(
        self, conversation_id: str, *, delete_workspace: bool = False
    ) -> None:
        await self._call(
            calls.delete_conversation(conversation_id, delete_workspace=delete_workspace)
        )

    @documented_by(calls.send_message)
    async def send_message(
        self,
        conversation_id: str,
        content: str,
        *,
        run: bool = False,
        if_busy: str | None = None,
        idempotency_key: str | None = None,
    ) -> MessageAccepted:
        return await self._call(
            calls.send_message(
                conversation_id, content, run=run, if_busy=if_busy, idempotency_key=idempotency_key
            )
        )

    # -- runs ---------------------------------------------------------------------------

    @documented_by(calls.start_run)
    async def start_run(
        self, conversation_id: str, *, if_busy: str = "reject", idempotency_key: str | None = None
    ) -> RunRecord:
        return await self._call(
            calls.start_run(conversation_id, if_busy=if_busy, idempotency_key=idempotency_key)
        )

    @documented_by(calls.list_runs)
    async def list_runs(
        self, conversation_id: str, *, limit: int | None = None, after: int | None = None
    ) -> RunList:
        return await self._call(calls.list_runs(conversation_id, limit=limit, after=after))

    @documented_by(calls.get_run)
    async def get_run(self, conversation_id: str, run_id: str) -> RunRecord:
        return await self._call(calls.get_run(conversation_id, run_id))

    @documented_by(calls.wait_run)
    async def wait_run(
        self,
        conversation_id: str,
        run_id: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - the server's wait (?timeout=), not ours
    ) -> RunRecord:
        return await self._call(calls.wait_run(conversation_id, run_id, timeout=timeout))

    @documented_by(calls.pause)
    async def pause(self, conversation_id: str) -> RunRecord:
        return await self._call(calls.pause(conversation_id))

    @documented_by(calls.interrupt)
    async def interrupt(self, conversation_id: str) -> RunRecord:
        return await self._call(calls.interrupt(conversation_id))

    @documented_by(calls.server_runs)
    async def server_runs(
        self, *, status: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        return await self._call(calls.server_runs(status=status, limit=limit))

    # -- events -------------------------------------------------------------------------

    @documented_by(calls.search_events)
    async def search_events(
        self,
        conversation_id: str,
        *,
        kind: str | None = None,
        source: str | None = None,
        run_id: str | None = None,
        q: str | None = None,
        after_seq: int | None = None,
        before_seq: int | None = None,
        order: str | None = None,
        limit: int | None = None,
    ) -> EventList:
        return await self._call(
            calls.search_events(
                conversation_id,
                kind=kind,
                source=source,
                run_id=run_id,
                q=q,
                after_seq=after_seq,
                before_seq=before_seq,
                order=order,
                limit=limit,
            )
        )

    @documented_by(calls.count_events)
    async def count_events(
        self,
        conversation_id: str,
        *,
        kind: str | None = None,
        source: str | None = None,
        run_id: str | None = None,
        q: str | None = None,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> int:
        return await self._call(
            calls.count_events(
                conversation_id,
                kind=kind,
                source=source,
                run_id=run_id,
                q=q,
                after_seq=after_seq,
                before_seq=before_seq,
            )
        )

    @documented_by(calls.get_event)
    async def get_event(self, conversation_id: str, event_id: str) -> Event:
        return await self._call(calls.get_event(conversation_id, event_id))

    async def stream(
        self,
        conversation_id: str,
        *,
        after_seq: int = 0,
        kinds: Sequence[str] | None = None,
        deltas: bool = False,
        reconnect_attempts: int = 5,
    ) -> AsyncGenerator[Event | Delta, None]:
        """The conversation's events after ``after_seq``, then live ones as they are
        committed: ``GET /api/conversations/{id}/events/stream`` (Server-Sent Events).

        **Guarantee:** events come in ``seq`` order with no gap and no duplicate, across
        dropped connections: the iterator reconnects by itself with ``Last-Event-ID`` = the
        last ``seq`` it yielded (immediately, then with a bounded backoff; see
        :mod:`app.client._sse`). ``kinds`` keeps only those kinds (``seq`` still advances
        past the others). With ``deltas=True`` it also yields :class:`Delta` items, the
        text a model is producing (never stored; the whole message follows as an event).

        The iteration ends when the server ends the stream: the conversation was deleted
        or the server shut down (after sending every run's final status). Leave early
        with ``break``, preferably inside ``contextlib.aclosing(client.stream(...))`` so
        the connection closes at once.

        Errors: 404 ``NotFound``, 422 (``kinds``) when connecting;
        :class:`TrellisConnectionError` if the server cannot be reached at first, or after
        ``reconnect_attempts`` drops in a row without an event.
        """
        follow = Follow(
            conversation_id,
            after_seq=after_seq,
            kinds=kinds,
            deltas=deltas,
            reconnect_attempts=reconnect_attempts,
        )
        while True:
            request = build_request(self._http, follow.call(), self.options.stream_timeouts)
            try:
                response = await self._http.send(request, stream=True)
                try:
                    if response.is_error:
                        await response.aread()
                        raise error_from_response(response)
                    follow.connected()
                    lines = response.aiter_lines()
                    try:
                        async for line in lines:
                            item = follow.feed(line)
                            if item is not None:
                                yield item
                            if follow.ended:
                                break
                    finally:
                        await _close_body(lines)
                finally:
                    await response.aclose()
                if follow.ended:
                    return
                delay = follow.dropped(None)
            except httpx.TransportError as error:
                delay = follow.dropped(error)
            await anyio.sleep(delay)

    # -- the server ---------------------------------------------------------------------

    @documented_by(calls.server_info)
    async def server_info(self) -> ServerInfo:
        return await self._call(calls.server_info())

    @documented_by(calls.set_limits)
    async def set_limits(
        self, *, max_concurrent_runs: int | None = None, max_queued_runs: int | None = None
    ) -> ServerLimits:
        return await self._call(
            calls.set_limits(
                max_concurrent_runs=max_concurrent_runs, max_queued_runs=max_queued_runs
            )
        )

    @documented_by(calls.health)
    async def health(self) -> bool:
        return await self._call(calls.health())

    @documented_by(calls.ready)
    async def ready(self) -> bool:
        return await self._call(calls.ready())


async def _close_body(lines: AsyncIterator[str]) -> None:
    """Close httpx's chain of body generators behind ``lines`` now, however the reading
    stopped (the last frame, an error, the caller leaving the iteration).

    Leaving an ``async for`` over them would abandon each generator half-consumed, to be
    finalized whenever the garbage collector gets to it (with a ``ResourceWarning``
    under Trio). Reading on in a cancelled scope instead makes the cancellation rise from
    the socket read *inside* the innermost generator, which closes each of them and the
    connection at once (the same trick as ``app/agents/provider.py``, with anyio's scope
    so that it works under asyncio too). A finished chain ends the loop at once. A broken
    connection met on the way changes nothing: the body is given up either way.
    """
    with contextlib.suppress(httpx.TransportError), anyio.CancelScope() as scope:
        scope.cancel()
        async for _ in lines:
            pass
