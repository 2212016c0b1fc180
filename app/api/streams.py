"""``GET /api/conversations/{id}/events/stream``: a conversation's events, live, as SSE.

Each event is one Server-Sent Event whose ``id`` is its ``seq`` and whose ``data`` is the
event as JSON (the same shape as the events list). A client that lost its connection
reconnects with ``Last-Event-ID: N`` (browsers do it by themselves) or ``?after_seq=N`` and
gets exactly the events after ``N``, then the live ones: no gap, no duplicate.

How (see :mod:`app.live.feed`): subscribe first, replay from the store, then follow the
feed, dropping any ``seq`` already sent; should the feed ever skip ahead, the gap is read
from the store. A comment line (``: heartbeat``) is sent after ``stream_heartbeat_seconds``
of silence, so proxies keep the connection open. The stream ends with an ``end`` event
saying why: ``deleted``, ``shutdown`` (after the final statuses of a drain), or
``slow_consumer`` (the client fell ``stream_buffer_events`` behind: reconnect with
``Last-Event-ID`` to resume).

Cancellation: a client that disconnects cancels the generator; its subscription is closed
on the way out, so nothing is left behind.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pydantic_core
import trio
from pydantic import Field, field_validator
from quart import Blueprint, Response, request

from app.api import http
from app.api.http import parse_query, supervisor
from app.api.openapi import documented
from app.api.schemas import _Strict
from app.errors import InvalidInput, NotFound
from app.events import EVENT_KINDS, Event
from app.live.feed import Delta, StreamEnd, Subscription
from app.store.base import INT64_MAX, EventQuery
from app.supervisor import RunSupervisor

blueprint = Blueprint("streams", __name__, url_prefix="/api/conversations/<conversation_id>")

REPLAY_PAGE = 1000  # events per store read while replaying


class StreamQuery(_Strict):
    #: Resume after this seq (``Last-Event-ID`` does the same and wins when larger).
    after_seq: int | None = Field(None, ge=0, le=INT64_MAX)
    #: Comma-separated event kinds to send (default: all); ``seq`` still advances past others.
    kinds: str | None = Field(None, max_length=200)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: str | None) -> str | None:
        if value is not None:
            unknown = [kind for kind in value.split(",") if kind not in EVENT_KINDS]
            if unknown:
                raise ValueError(f"unknown kinds {unknown}; the kinds are {list(EVENT_KINDS)}")
        return value


@blueprint.get("/events/stream")
@documented(
    "Server-Sent Events: the conversation's events after after_seq (or Last-Event-ID), then"
    " live ones; each SSE id is the event's seq. Ends with an 'end' event (deleted,"
    " shutdown, slow_consumer).",
    query=StreamQuery,
    errors=(404, 422),
)
async def stream_events(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(StreamQuery)
    after = max(query.after_seq or 0, _last_event_id())
    kinds = frozenset(query.kinds.split(",")) if query.kinds else None
    await http.get_conversation(sup, conversation_id)  # 404 before the stream starts
    body = _events(sup, conversation_id, after, kinds)
    response = Response(body, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None  # Quart's 60 s response timeout would cut the stream
    return response


def _last_event_id() -> int:
    header = request.headers.get("Last-Event-ID")
    if header is None or header == "":
        return 0
    if not header.isdigit() or int(header) > INT64_MAX:
        raise InvalidInput(
            "Last-Event-ID must be the seq of an event (a whole number)",
            detail=[{"loc": ["header", "Last-Event-ID"], "msg": "not a seq"}],
        )
    return int(header)


async def _events(
    sup: RunSupervisor, conversation_id: str, after: int, kinds: frozenset[str] | None
) -> AsyncGenerator[bytes, None]:
    """The stream's body. It subscribes when sending begins (a response never sent leaves
    no subscription behind), before it replays: nothing can slip between the two."""
    with sup.feed.subscribe(conversation_id) as subscription:
        follow = _follow(sup, subscription, _Position(after), kinds)
        async with aclosing(follow) as frames:
            async for frame in frames:
                yield frame


class _Position:
    """The seq of the last event the stream sent (or skipped by its filter)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq


async def _follow(
    sup: RunSupervisor,
    subscription: Subscription,
    last: _Position,
    kinds: frozenset[str] | None,
) -> AsyncGenerator[bytes, None]:
    """Replay, then follow the feed; ends with an ``end`` frame."""
    try:
        async with aclosing(_stored(sup, subscription.conversation_id, last.seq, None)) as old:
            async for event in old:
                for frame in _send(event, last, kinds):
                    yield frame
        heartbeat = sup.settings.stream_heartbeat_seconds
        while True:
            with trio.move_on_after(heartbeat) as idle:
                item = await subscription.receive()
            if idle.cancelled_caught:
                yield b": heartbeat\n\n"
            elif isinstance(item, StreamEnd):
                yield _end(item.reason, last.seq)
                return
            elif isinstance(item, Delta):
                continue  # not rendered yet
            elif item.seq > last.seq + 1:  # never expected: read what the feed skipped
                gap = _stored(sup, item.conversation_id, last.seq, item.seq)
                async with aclosing(gap) as missed:
                    events = [event async for event in missed]
                for event in [*events, item]:
                    for frame in _send(event, last, kinds):
                        yield frame
            else:  # the next one, or one the replay already sent (dropped by _send)
                for frame in _send(item, last, kinds):
                    yield frame
    except NotFound:  # deleted while the stream read from the store
        yield _end("deleted", last.seq)


def _send(event: Event, last: _Position, kinds: frozenset[str] | None) -> list[bytes]:
    """The frame for ``event`` if it is new and wanted; advances ``last`` past it."""
    if event.seq <= last.seq:
        return []
    last.seq = event.seq
    return [_frame(event)] if kinds is None or event.payload.kind in kinds else []


async def _stored(
    sup: RunSupervisor, conversation_id: str, after: int, before: int | None
) -> AsyncGenerator[Event, None]:
    """The stored events after ``after`` (and before ``before``), oldest first, paged."""
    while True:
        query = EventQuery(after_seq=after, before_seq=before, limit=REPLAY_PAGE)
        page = await sup.io(sup.store.search_events, conversation_id, query)
        for event in page.items:
            yield event
        if page.next_seq is None:
            return
        after = page.next_seq


def _frame(event: Event) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (event.seq, pydantic_core.to_json(event))


def _end(reason: str, last_seq: int) -> bytes:
    data = json.dumps({"reason": reason, "last_seq": last_seq})
    return f"event: end\ndata: {data}\n\n".encode()
