"""``GET /api/conversations/{id}/events/stream``: a conversation's events, live, as SSE.

Each event is one Server-Sent Event whose ``id`` is its ``seq`` and whose ``data`` is the
event as JSON (the same shape as the events list). A client that lost its connection
reconnects with ``Last-Event-ID: N`` (browsers do it by themselves) or ``?after_seq=N`` and
gets exactly the events after ``N``, then the live ones: no gap, no duplicate.

Text an agent is producing (e.g. a model's tokens) arrives as ``event: delta`` frames with
data ``{"run_id", "text", "after_seq"}`` and **no** ``id`` line, so they never move
``Last-Event-ID``: deltas are not stored, and the complete message follows as an ordinary
event. They are sent when ``kinds`` is absent or includes ``message``.

A comment line (``: heartbeat``) is sent after ``stream_heartbeat_seconds`` of silence, so
proxies keep the connection open. The stream ends with an ``end`` event, data
``{"reason", "last_seq"}``: ``deleted``, ``shutdown`` (after the final statuses of a drain),
or ``slow_consumer`` (the client fell ``stream_buffer_events`` behind: reconnect with
``Last-Event-ID`` to resume).

What is sent, and in which order, is decided by :func:`app.live.follow.follow_conversation`
(shared with the WebSocket stream, ``app/api/ws_stream.py``); this module only renders it,
with the SSE plumbing of :mod:`app.api.sse` (shared with the server-wide stream).

Cancellation: a client that disconnects cancels the body generator; the follower (and its
subscription) is closed on the way out, so nothing is left behind.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import pydantic_core
from pydantic import Field, field_validator
from quart import Blueprint, Response

from app.api import http, sse
from app.api.http import parse_query, supervisor
from app.api.openapi import documented
from app.api.schemas import _Strict
from app.events import EVENT_KINDS, Event
from app.live.feed import Delta
from app.live.follow import End, FollowItem, Heartbeat, follow_conversation
from app.store.base import INT64_MAX
from app.supervisor import RunSupervisor

blueprint = Blueprint("streams", __name__, url_prefix="/api/conversations/<conversation_id>")


class StreamQuery(_Strict):
    #: Resume after this seq (``Last-Event-ID`` does the same and wins when larger).
    after_seq: int | None = Field(None, ge=0, le=INT64_MAX)
    #: Comma-separated event kinds to send (default: all); ``seq`` still advances past
    #: others. Deltas are sent when this is absent or includes ``message``.
    kinds: str | None = Field(None, max_length=200)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: str | None) -> str | None:
        if value is not None:
            unknown = [kind for kind in value.split(",") if kind not in EVENT_KINDS]
            if unknown:
                raise ValueError(f"unknown kinds {unknown}; the kinds are {list(EVENT_KINDS)}")
        return value

    def kind_set(self) -> frozenset[str] | None:
        """The kinds to send; ``None`` for all."""
        return frozenset(self.kinds.split(",")) if self.kinds else None


@blueprint.get("/events/stream")
@documented(
    "Server-Sent Events: the conversation's events after after_seq (or Last-Event-ID), then"
    " live ones; each SSE id is the event's seq. Text an agent is producing arrives as"
    " 'delta' events (data {run_id, text, after_seq}, no id, not stored) when kinds is"
    " absent or includes message. Ends with an 'end' event {reason, last_seq} (deleted,"
    " shutdown, slow_consumer). The same stream as WebSocket JSON frames:"
    " /api/conversations/{conversation_id}/events/ws.",
    query=StreamQuery,
    errors=(404, 422),
    headers=("Last-Event-ID",),
    media_type="text/event-stream",
)
async def stream_events(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(StreamQuery)
    after = sse.resume_point(query.after_seq)
    await http.get_conversation(sup, conversation_id)  # 404 before the stream starts
    return sse.sse_response(_frames(sup, conversation_id, after, query.kind_set()))


async def _frames(
    sup: RunSupervisor, conversation_id: str, after: int, kinds: frozenset[str] | None
) -> AsyncGenerator[bytes, None]:
    """The stream's body: each batch of the follower's items as one chunk of SSE frames
    (one write for a whole replay page). The follower subscribes when sending begins, so a
    response never sent leaves no subscription behind."""
    async with aclosing(follow_conversation(sup, conversation_id, after, kinds)) as batches:
        async for batch in batches:
            yield b"".join(render(item) for item in batch)


def render(item: FollowItem) -> bytes:
    """One SSE frame for ``item``."""
    if isinstance(item, Event):
        return sse.frame(pydantic_core.to_json(item), seq=item.seq)  # the events list's JSON
    if isinstance(item, Delta):
        data = {"run_id": item.run_id, "text": item.text, "after_seq": item.after_seq}
        return sse.frame(pydantic_core.to_json(data), event="delta")
    if isinstance(item, Heartbeat):
        return sse.HEARTBEAT
    assert isinstance(item, End)
    return sse.end_frame(item.reason, item.last_seq)
