"""Server-Sent Events plumbing shared by the streams: where to resume, the response, frames.

Both SSE streams — a conversation's (``app/api/streams.py``) and the server's
(``app/api/server_stream.py``) — speak the same dialect of the `SSE format`_:

* A numbered frame carries ``id: <seq>``, so that a browser's ``EventSource`` (or any
  client) reconnects with ``Last-Event-ID: <seq>``; ``?after_seq=<seq>`` does the same for
  clients that cannot set headers. The larger of the two is where the stream resumes
  (:func:`resume_point`).
* An ephemeral frame (a token delta, a step) has no ``id`` line, so it never moves
  ``Last-Event-ID``.
* ``data`` is one line of JSON; ``event`` names the frame's type (absent for a
  conversation's stored events, which are the default ``message`` type).
* ``: heartbeat`` comments keep idle connections open through proxies (:data:`HEARTBEAT`).
* The last frame is ``event: end`` with ``{"reason", "last_seq"}`` (:func:`end_frame`).

Frames are bytes: a stream joins them into the chunks it writes. This module renders and
wraps; it owns no task. The response's body generator belongs to the stream that made it;
Quart cancels it when the client disconnects, and the generator closes what it holds.

.. _SSE format: https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from typing import Any

from quart import Response, request

from app.errors import InvalidInput
from app.store.base import INT64_MAX

#: The comment sent after ``stream_heartbeat_seconds`` of silence.
HEARTBEAT = b": heartbeat\n\n"


def last_event_id() -> int:
    """The request's ``Last-Event-ID`` header as a seq; 0 when absent or empty.

    Errors:
        :class:`~app.errors.InvalidInput` (422) when it is not a whole number in range.
    """
    header = request.headers.get("Last-Event-ID")
    if header is None or header == "":
        return 0
    if not header.isdigit() or int(header) > INT64_MAX:
        raise InvalidInput(
            "Last-Event-ID must be the seq of an event (a whole number)",
            detail=[{"loc": ["header", "Last-Event-ID"], "msg": "not a seq"}],
        )
    return int(header)


def resume_point(after_seq: int | None) -> int:
    """Where a stream resumes: after ``?after_seq`` or ``Last-Event-ID``, the larger one
    (0: from the start). Errors: as :func:`last_event_id`."""
    return max(after_seq or 0, last_event_id())


def sse_response(body: AsyncIterable[bytes]) -> Response:
    """A streaming ``text/event-stream`` response of ``body``'s chunks, never cached and
    never cut by Quart's response timeout (a stream lasts as long as its client stays)."""
    response = Response(body, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None  # Quart's 60 s response timeout would cut the stream
    return response


def frame(data: bytes, *, event: str | None = None, seq: int | None = None) -> bytes:
    """One SSE frame of ``data`` (one line of JSON): an ``id`` line only when it carries a
    ``seq``, an ``event`` line only when it has a type."""
    head = b"id: %d\n" % seq if seq is not None else b""
    if event is not None:
        head += b"event: %s\n" % event.encode()
    return b"%sdata: %s\n\n" % (head, data)


def json_frame(event: str, data: dict[str, Any], seq: int | None = None) -> bytes:
    """One SSE frame of type ``event`` whose data is ``data`` as JSON."""
    return frame(json.dumps(data).encode(), event=event, seq=seq)


def end_frame(reason: str, last_seq: int) -> bytes:
    """The last frame of a stream: why it ends, and the seq to resume after."""
    return json_frame("end", {"reason": reason, "last_seq": last_seq})
