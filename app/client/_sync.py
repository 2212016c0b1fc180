"""The synchronous client: :class:`TrellisClient`, for scripts, notebooks and threads.

It is :class:`httpx.Client` underneath and sleeps with :func:`time.sleep` (retries, stream
backoff). It is *not* the async client run in an event loop: both send the very same
calls, built by the functions of the same name in :mod:`app.client._calls` and read by
:mod:`app.client._requests`; only the sending and the sleeping differ. Each method blocks
the calling thread until the answer (from Trio, call it through
``trio.to_thread.run_sync``, or use :class:`~app.client.AsyncTrellisClient`).

Ownership: the client owns its connection pool; close it with ``with`` or
:meth:`TrellisClient.close`. One client may be shared by threads (httpx's pool is
thread-safe); a stream iterator belongs to the thread that iterates it.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

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


class TrellisClient:
    """A Trellis server's HTTP API as blocking methods returning the server's own models.

    ::

        with TrellisClient("http://127.0.0.1:8000", api_key=key) as client:
            conversation = client.create_conversation(
                {"kind": "script", "steps": [{"say": "hi"}]}, run=True
            )
            run = client.wait_run(conversation.id, conversation.run.id)

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
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.options = ClientOptions(base_url, api_key, timeout, retries_on_429)
        self._http = httpx.Client(**self.options.httpx_arguments(), transport=transport)

    def __repr__(self) -> str:
        return f"<TrellisClient {self.options}>"

    def __enter__(self) -> TrellisClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (open streams end with it)."""
        self._http.close()

    def _call(self, call: Call[T]) -> T:
        """Send ``call``; retry a 429 as :attr:`options` allow; its result or its error."""
        call = with_idempotency_key(call, self.options.retries_on_429)
        retries = RetryPolicy(self.options.retries_on_429)
        while True:
            request = build_request(self._http, call, self.options.timeouts)
            with connection_errors():
                response = self._http.send(request)
            delay = retries.delay(response)
            if delay is None:
                return finish(call, response)
            time.sleep(delay)

    # -- conversations ------------------------------------------------------------------

    @documented_by(calls.create_conversation)
    def create_conversation(
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
        return self._call(
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
    def list_conversations(
        self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> ConversationList:
        return self._call(calls.list_conversations(status=status, limit=limit, cursor=cursor))

    def iter_conversations(self, *, status: str | None = None) -> Iterator[ConversationListItem]:
        """Every conversation (newest first), page after page: ``list_conversations``
        following ``next_cursor`` until the last page."""
        cursor: str | None = None
        while True:
            page = self.list_conversations(status=status, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    @documented_by(calls.get_conversation)
    def get_conversation(self, conversation_id: str) -> ConversationRecord:
        return self._call(calls.get_conversation(conversation_id))

    @documented_by(calls.delete_conversation)
    def delete_conversation(self, conversation_id: str, *, delete_workspace: bool = False) -> None:
        self._call(calls.delete_conversation(conversation_id, delete_workspace=delete_workspace))

    @documented_by(calls.send_message)
    def send_message(
        self,
        conversation_id: str,
        content: str,
        *,
        run: bool = False,
        if_busy: str | None = None,
        idempotency_key: str | None = None,
    ) -> MessageAccepted:
        return self._call(
            calls.send_message(
                conversation_id, content, run=run, if_busy=if_busy, idempotency_key=idempotency_key
            )
        )

    # -- runs ---------------------------------------------------------------------------

    @documented_by(calls.start_run)
    def start_run(
        self, conversation_id: str, *, if_busy: str = "reject", idempotency_key: str | None = None
    ) -> RunRecord:
        return self._call(
            calls.start_run(conversation_id, if_busy=if_busy, idempotency_key=idempotency_key)
        )

    @documented_by(calls.list_runs)
    def list_runs(
        self, conversation_id: str, *, limit: int | None = None, after: int | None = None
    ) -> RunList:
        return self._call(calls.list_runs(conversation_id, limit=limit, after=after))

    @documented_by(calls.get_run)
    def get_run(self, conversation_id: str, run_id: str) -> RunRecord:
        return self._call(calls.get_run(conversation_id, run_id))

    @documented_by(calls.wait_run)
    def wait_run(self, conversation_id: str, run_id: str, *, timeout: float = 30.0) -> RunRecord:
        return self._call(calls.wait_run(conversation_id, run_id, timeout=timeout))

    @documented_by(calls.pause)
    def pause(self, conversation_id: str) -> RunRecord:
        return self._call(calls.pause(conversation_id))

    @documented_by(calls.interrupt)
    def interrupt(self, conversation_id: str) -> RunRecord:
        return self._call(calls.interrupt(conversation_id))

    @documented_by(calls.server_runs)
    def server_runs(
        self, *, status: str | None = None, limit: int | None = None
    ) -> list[RunRecord]:
        return self._call(calls.server_runs(status=status, limit=limit))

    # -- events -------------------------------------------------------------------------

    @documented_by(calls.search_events)
    def search_events(
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
        return self._call(
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
    def count_events(
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
        return self._call(
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
    def get_event(self, conversation_id: str, event_id: str) -> Event:
        return self._call(calls.get_event(conversation_id, event_id))

    def stream(
        self,
        conversation_id: str,
        *,
        after_seq: int = 0,
        kinds: Sequence[str] | None = None,
        deltas: bool = False,
        reconnect_attempts: int = 5,
    ) -> Generator[Event | Delta, None, None]:
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
        with ``break``, preferably inside ``contextlib.closing(client.stream(...))`` so
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
                response = self._http.send(request, stream=True)
                try:
                    if response.is_error:
                        response.read()
                        raise error_from_response(response)
                    follow.connected()
                    for line in response.iter_lines():
                        item = follow.feed(line)
                        if item is not None:
                            yield item
                        if follow.ended:
                            return
                finally:
                    response.close()
                delay = follow.dropped(None)
            except httpx.TransportError as error:
                delay = follow.dropped(error)
            time.sleep(delay)

    # -- the server ---------------------------------------------------------------------

    @documented_by(calls.server_info)
    def server_info(self) -> ServerInfo:
        return self._call(calls.server_info())

    @documented_by(calls.set_limits)
    def set_limits(
        self, *, max_concurrent_runs: int | None = None, max_queued_runs: int | None = None
    ) -> ServerLimits:
        return self._call(
            calls.set_limits(
                max_concurrent_runs=max_concurrent_runs, max_queued_runs=max_queued_runs
            )
        )

    @documented_by(calls.health)
    def health(self) -> bool:
        return self._call(calls.health())

    @documented_by(calls.ready)
    def ready(self) -> bool:
        return self._call(calls.ready())
