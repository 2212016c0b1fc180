"""``WS /api/conversations/{id}/events/ws``: the conversation stream over a WebSocket.

The same items as the SSE stream (``app/api/streams.py``; both render
:func:`app.live.follow.follow_conversation`), one JSON text frame each::

    {"type": "event", "event": {...}}          an event, the same JSON as the events list
    {"type": "delta", "run_id", "text", "after_seq"}   text being produced; no seq, not stored
    {"type": "heartbeat"}                      nothing new for stream_heartbeat_seconds
    {"type": "end", "reason", "last_seq"}      the last frame before the close
    {"type": "error", "error": {"code", "message", "detail"}}   why the stream cannot start
    {"type": "pong"}                           the answer to a client frame {"type": "ping"}

Query: ``after_seq`` (resume: exactly the events after it, then live ones) and ``kinds``
(as for SSE: deltas only when absent or including ``message``). Other client frames are
ignored; protocol-level pings are answered by Hypercorn itself.

Every way the stream ends has its close code and reason:

=====  ==================  =====================================================
code   reason              when
=====  ==================  =====================================================
1000   ``deleted``         the conversation was deleted (after an ``end`` frame)
1001   ``shutdown``        the server drains; reconnect later with ``after_seq``
1008   ``slow_consumer``   the client fell ``stream_buffer_events`` behind; resume
4401   ``unauthorized``    with API keys: no key in the handshake and a first frame that
                           is not ``{"type": "auth", "key": ...}`` with a valid key
4404   ``not_found``       no such conversation (after an ``error`` frame)
4422   ``validation_error``  a bad query parameter (after an ``error`` frame)
1011   ``internal_error``  the server failed (e.g. the store is unavailable)
=====  ==================  =====================================================

A handshake refused by the guards (``app/api/guards.py``: foreign ``Origin`` 403, foreign
``Host`` 421) is answered with that HTTP error and never accepted. Errors of the request
itself (404, 422) are reported *after* accepting, as frame and close code, because a
browser's WebSocket API never shows the status of a refused handshake.

Cancellation and ownership: the handler owns a nursery of two tasks — the sender follows
the conversation and sends frames; the reader answers pings. When the stream ends the
sender closes the socket and cancels the reader. When the client goes away, quart-trio
cancels the handler: both tasks stop and the follower closes its subscription on the way
out, so nothing is left behind. Sends go through one lock, so the two tasks' frames never
interleave (permessage-deflate keeps state across frames).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

import pydantic_core
import trio
from quart import Blueprint, websocket

from app.api import http
from app.api.http import supervisor
from app.api.openapi import documented
from app.api.streams import StreamQuery
from app.auth import authenticate_websocket
from app.errors import TrellisError
from app.events import Event
from app.live.feed import Delta
from app.live.follow import End, FollowItem, Heartbeat, follow_conversation
from app.logs import log_fields

log = logging.getLogger("trellis.api")
request_log = logging.getLogger("trellis.http")

blueprint = Blueprint("ws_stream", __name__, url_prefix="/api/conversations/<conversation_id>")

#: Close codes of the ends of a stream (RFC 6455 §7.4.1: 1000 normal, 1001 going away,
#: 1008 policy violation, 1011 internal error; 4000-4999 are the application's own).
END_CODES = {"deleted": 1000, "shutdown": 1001, "slow_consumer": 1008}
INTERNAL_ERROR = 1011
APPLICATION_CODES = 4000  # + the HTTP status of a client error: 4404, 4422
PONG = '{"type":"pong"}'
MAX_PING_CHARS = 256  # a ping frame is ~16 characters; longer frames are not parsed
HEARTBEAT = '{"type":"heartbeat"}'


@blueprint.websocket("/events/ws")
@documented(
    "WebSocket (GET with Upgrade: websocket): the conversation's events after after_seq,"
    " then live ones, as JSON text frames: {type: event, event}, {type: delta, run_id,"
    " text, after_seq}, {type: heartbeat}, then {type: end, reason, last_seq} and a close"
    " (1000 deleted, 1001 shutdown, 1008 slow_consumer). A client frame {type: ping} is"
    " answered with {type: pong}. An unknown conversation or a bad query is an error frame"
    " and close 4404 / 4422; 1011 when the server fails. (A GET without Upgrade is a lookup"
    " of event id 'ws': 404.)",
    status=101,
    query=StreamQuery,
    errors=(404,),
)
async def stream_events_ws(conversation_id: str) -> None:
    sup = supervisor()
    try:
        await authenticate_websocket()  # with keys and no Authorization: the first frame
        query = _query()
        await http.get_conversation(sup, conversation_id)
    except TrellisError as error:
        await websocket.accept()  # a no-op when the auth frame was read
        await _fail(error)
        return
    sender = _Sender()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer_pings, sender)
            after, kinds = query.after_seq or 0, query.kind_set()
            end = await sender.send_all(follow_conversation(sup, conversation_id, after, kinds))
            await _close(END_CODES.get(end.reason, 1000), end.reason)
            nursery.cancel_scope.cancel()
    except* Exception as group:  # trio.Cancelled (a client gone) is no Exception: it passes
        failure = group.exceptions[0]
        log.error("websocket stream failed", exc_info=failure)
        await _fail(failure if isinstance(failure, TrellisError) else None)


def _query() -> StreamQuery:
    """The query (a repeated parameter arrives as a list, which the model refuses: 422)."""
    lists = websocket.args.lists()
    args = {key: values[0] if len(values) == 1 else values for key, values in lists}
    return http.validate(StreamQuery, args, loc="query")


class _Sender:
    """Sends frames one at a time (the sender and the reader share the socket)."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def send(self, frame: str) -> None:
        async with self._lock:
            await websocket.send(frame)

    async def send_all(self, batches: AsyncGenerator[list[FollowItem], None]) -> End:
        """Send the follower's items, one frame each, up to its :class:`End` (sent too);
        closes ``batches``."""
        async with aclosing(batches) as follower:
            async for batch in follower:
                for item in batch:
                    await self.send(render(item))
                    if isinstance(item, End):
                        return item
        raise AssertionError("a follower always ends with an End")


async def _answer_pings(sender: _Sender) -> None:
    """Read client frames for ever; answer each ``{"type": "ping"}`` with a pong."""
    while True:
        message = await websocket.receive()
        if _is_ping(message):
            await sender.send(PONG)


def _is_ping(message: str | bytes) -> bool:
    if len(message) > MAX_PING_CHARS:
        return False
    try:
        frame = json.loads(message)
    except ValueError:
        return False
    return isinstance(frame, dict) and frame.get("type") == "ping"


def render(item: FollowItem) -> str:
    """One JSON text frame for ``item``."""
    if isinstance(item, Event):
        return f'{{"type":"event","event":{pydantic_core.to_json(item).decode()}}}'
    if isinstance(item, Delta):
        delta = {"type": "delta", "run_id": item.run_id, "text": item.text}
        return pydantic_core.to_json(delta | {"after_seq": item.after_seq}).decode()
    if isinstance(item, Heartbeat):
        return HEARTBEAT
    assert isinstance(item, End)
    end = {"type": "end", "reason": item.reason, "last_seq": item.last_seq}
    return pydantic_core.to_json(end).decode()


async def _fail(error: TrellisError | None) -> None:
    """Send an ``error`` frame, then close: 4000 + the status for a client error (the code
    as reason), 1011 ``internal_error`` for anything else."""
    if error is not None and 400 <= error.status < 500:
        body = {"code": error.code, "message": error.message, "detail": error.detail}
        code, reason = APPLICATION_CODES + error.status, error.code
    else:
        message = "the stream failed; see the server log"
        body = {"code": "internal_error", "message": message, "detail": None}
        code, reason = INTERNAL_ERROR, "internal_error"
    await websocket.send(pydantic_core.to_json({"type": "error", "error": body}).decode())
    await _close(code, reason)


async def _close(code: int, reason: str) -> None:
    """Close the socket, and log it like a request: ``WS /api/... 1001 shutdown``."""
    await websocket.close(code, reason)
    log_fields(request_log, "WS {path} {code} {reason}", path=websocket.path, code=code,
               reason=reason)  # fmt: skip
