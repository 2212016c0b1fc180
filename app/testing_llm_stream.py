"""The streaming side of the fake provider (:mod:`app.testing_llm`): SSE chunks and holds.

How an OpenAI-compatible provider streams a completion (``"stream": true``), as
:class:`~app.testing_llm.FakeChatServer` sends it. :func:`stream_chunks` cuts a scripted
completion into the chunks a real provider sends: a role chunk, the content in word-piece
chunks (at most 5 characters of a word each, so a long word — or an API key — spans
several), each tool call as a chunk with its ``index``, ``id`` and ``name`` then its
``arguments`` in three pieces, a chunk with the ``finish_reason``, and a ``usage`` chunk
if ``stream_options.include_usage`` asked for it. :func:`completion_events` frames them as
server-sent events ending with ``data: [DONE]``; :func:`padding_events` makes an
endless-looking stream of any size; :func:`reply_events` picks between them and plain JSON
for one request. :class:`StreamHold` lets a test stop a stream part-way and let it go
later.

Ownership: nothing here owns a thread. A :class:`StreamHold` is set by the server's handler
thread and waited for by the test (from Trio, in a thread of its own).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import trio

JsonObject = dict[str, Any]

#: A word-piece "token": up to 5 non-space characters and the spaces after them (or spaces).
_WORD_PIECE = re.compile(r"\S{1,5}\s*|\s+")


class StreamHold:
    """Where a streamed answer stops until the test lets it go (see :mod:`app.testing_llm`).

    ``reached`` is set once ``after_chunks`` chunks were written to the socket.
    """

    def __init__(self, after_chunks: int) -> None:
        self.after_chunks = after_chunks
        self.reached = threading.Event()
        self._released = threading.Event()

    def __repr__(self) -> str:
        state = "released" if self.released else "reached" if self.reached.is_set() else "ahead"
        return f"<StreamHold after {self.after_chunks} chunks, {state}>"

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Let the rest of the stream go (the server also releases it when closing)."""
        self._released.set()

    async def wait_reached(self) -> None:
        """Wait (from Trio, in a thread on a limiter of its own) until the hold is reached."""
        await trio.to_thread.run_sync(
            self.reached.wait, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True
        )

    def wait_released(self) -> None:
        """Block (the server's handler thread) until :meth:`release`."""
        self._released.wait()


def stream_chunks(completion: JsonObject, *, include_usage: bool = True) -> list[JsonObject]:
    """The chunks an OpenAI-compatible provider streams ``completion`` (a non-streamed
    ``chat.completion`` body) as, in order; ``data: [DONE]`` follows them."""
    head = {
        "id": completion.get("id", "chatcmpl-fake"),
        "object": "chat.completion.chunk",
        "created": 0,
        "model": completion.get("model"),
    }
    choice = completion["choices"][0]

    def chunk(delta: JsonObject, finish_reason: str | None = None) -> JsonObject:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    message = choice["message"]
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in _WORD_PIECE.findall(message["content"] or "")]
    for index, call in enumerate(message.get("tool_calls") or []):
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        start = {"index": index, "id": call["id"], "type": "function"}
        chunks.append(
            chunk({"tool_calls": [{**start, "function": {"name": name, "arguments": ""}}]})
        )
        third = max(1, -(-len(arguments) // 3))
        for at in range(0, len(arguments), third):
            piece = {"index": index, "function": {"arguments": arguments[at : at + third]}}
            chunks.append(chunk({"tool_calls": [piece]}))
    chunks.append(chunk({}, choice.get("finish_reason")))
    if include_usage:
        chunks.append({**head, "choices": [], "usage": completion.get("usage")})
    return chunks


def reply_events(
    request: Any, status: int, body: Any, streamed_bytes: int
) -> Iterator[bytes] | None:
    """The server-sent events that answer ``request`` (its JSON body) with a scripted
    ``status`` and ``body`` (``streamed_bytes``: padding of that size instead), or None
    for plain JSON: the request did not ask to stream, or the answer is not a 200
    completion."""
    if not (isinstance(request, dict) and request.get("stream") is True and status == 200):
        return None
    options = request.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    if streamed_bytes:
        return padding_events(streamed_bytes)
    return completion_events(body, include_usage=usage)


def completion_events(body: Any, *, include_usage: bool) -> Iterator[bytes] | None:
    """The server-sent events that stream ``body``, ``data: [DONE]`` last; None if ``body``
    is not a completion (an error or any other JSON: the server sends it plain)."""
    try:
        if not isinstance(body["choices"][0]["message"], dict):
            return None
    except (TypeError, KeyError, IndexError):
        return None
    chunks = stream_chunks(body, include_usage=include_usage)
    return iter([*(_event(json.dumps(chunk)) for chunk in chunks), _event("[DONE]")])


def padding_events(total_bytes: int) -> Iterator[bytes]:
    """Server-sent content chunks ``total_bytes`` long in all (about 64 KiB each, never
    held in memory together)."""
    words = "padding " * 8192
    event = _event(json.dumps({"choices": [{"index": 0, "delta": {"content": words}}]}))
    for _ in range(0, total_bytes, len(event)):
        yield event


def _event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
