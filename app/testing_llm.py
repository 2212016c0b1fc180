"""A fake OpenAI-compatible Chat Completions server, for tests — yours and ours.

It is a real HTTP/1.1 server on 127.0.0.1 (port 0, in a background thread, keep-alive like
a real provider), so the code under test speaks real HTTP through its real client; nothing
is mocked. Each test scripts the answers, in order, and reads back the requests the server
got::

    with FakeChatServer() as provider:
        provider.add(tool_call_reply([("terminal", {"command": "ls"})]), text_reply("Done."))
        ...  # run an "llm" agent with base_url=provider.url
        assert provider.requests[0].body["tools"][0]["function"]["name"] == "terminal"

A scripted answer can be delayed (``delay_seconds``: the server holds the response; closing
the server releases it at once), be an HTTP error (``error_reply(429, retry_after=...)``),
or carry any JSON body (``ScriptedReply(400, ["not", "an", "object"])``). Two misbehave the
way real providers sometimes do: ``ScriptedReply(..., drip_seconds=1.0)`` sends its body one
byte at a time, and :func:`oversized_reply` streams a body of any size (generated as it is
sent, without ``Content-Length``). ``body_bytes_sent`` says how much of each answer's body
went out before the client stopped reading.

Streams: a request with ``"stream": true`` gets a scripted completion (``text_reply``,
``tool_call_reply``, any 200 whose body has ``choices[0].message``) as OpenAI sends it:
``text/event-stream`` in chunked encoding (keep-alive), in the chunks
:mod:`app.testing_llm_stream` describes (content in word pieces of at most 5 characters,
so a long word — or an API key — spans several). ``FakeChatServer(streaming=False)`` is a
provider that cannot stream: it answers every request with plain JSON. For stream
requests, the other cases:

* errors (``error_reply``) and 200 bodies that are not completions: plain JSON, as ever;
* ``drip_seconds``: the stream's bytes, one at a time;
* :func:`oversized_reply`: an endless-looking stream of content chunks, as large as asked;
* ``hold=StreamHold(after_chunks=n)``: the server sends ``n`` chunks, says so
  (``await hold.wait_reached()``), and sends the rest once the test calls
  ``hold.release()`` (closing the server drops the connection instead);
* ``cut_after_chunks=n``: the server sends ``n`` chunks, then drops the connection in the
  middle of the body, as a provider (or a proxy) failing mid-stream does.

Like every real provider, the server refuses (400, without using up a scripted reply) a
request whose ``messages`` leave a tool call unanswered or answer a call nobody made:
:func:`message_sequence_error` says what is wrong. ``FakeChatServer(check_messages=False)``
turns that off.

Ownership: the server thread and one handler thread per connection belong to the
``with`` block; leaving it closes the listener at once (no polling: a wake-up socket),
disconnects the clients and joins the threads. They are daemon threads: a server left
open never holds up the interpreter's exit.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from app.testing_llm_stream import JsonObject, reply_events
from app.testing_llm_stream import StreamHold as StreamHold  # re-exported: part of the script
from app.testing_llm_stream import stream_chunks as stream_chunks  # re-exported, likewise


@dataclass(frozen=True)
class ScriptedReply:
    """One scripted answer: a status, a JSON body (any JSON value), headers, a delay.

    ``drip_seconds``: the headers go out at once, then the body one byte at a time, this
    long apart. ``streamed_bytes``: instead of ``body``, a body this large is generated
    while it is sent (see :func:`oversized_reply`). ``hold`` and ``cut_after_chunks``
    apply when the answer is streamed (see the module docstring).
    """

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    drip_seconds: float = 0.0
    streamed_bytes: int = 0
    hold: StreamHold | None = None
    cut_after_chunks: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: JsonObject
    received_at: float  # time.monotonic() when the request arrived
    client_port: int  # the client's side of the TCP connection: equal ports, one connection


def text_reply(
    text: str, *, prompt_tokens: int = 10, completion_tokens: int = 5, delay_seconds: float = 0.0
) -> ScriptedReply:
    """The assistant answers with text and no tool calls."""
    return _completion(
        {"role": "assistant", "content": text},
        "stop",
        prompt_tokens,
        completion_tokens,
        delay_seconds,
    )


def tool_call_reply(
    calls: list[tuple[str, JsonObject | str]],
    *,
    text: str | None = None,
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
) -> ScriptedReply:
    """The assistant asks for tool calls (arguments as a dict, or raw text to test bad JSON)."""
    tool_calls = [
        {
            "id": f"call_{index}",
            "type": "function",
            "function": {
                "name": name,
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
            },
        }
        for index, (name, arguments) in enumerate(calls)
    ]
    message = {"role": "assistant", "content": text, "tool_calls": tool_calls}
    return _completion(message, "tool_calls", prompt_tokens, completion_tokens, 0.0)


def error_reply(
    status: int, message: str = "scripted error", *, retry_after: float | str | None = None
) -> ScriptedReply:
    """An HTTP error in OpenAI's error shape, optionally with ``Retry-After`` (seconds, or
    a string such as an HTTP date)."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    body = {"error": {"message": message, "type": "scripted", "code": status}}
    return ScriptedReply(status, body, headers)


def oversized_reply(total_bytes: int) -> ScriptedReply:
    """A 200 whose body is ``total_bytes`` long (JSON padding, never held in memory), sent
    without ``Content-Length`` and ended by closing the connection: the client cannot know
    the size before reading it."""
    return ScriptedReply(200, None, streamed_bytes=total_bytes)


def message_sequence_error(messages: Any) -> str | None:
    """What an OpenAI-compatible server rejects in ``messages``, or None: every
    ``tool_calls`` entry must be answered by a ``tool`` message before the next other
    message, and every ``tool`` message must answer such an entry. (Wording: OpenAI's.)"""
    if not isinstance(messages, list):
        return None
    unanswered: list[Any] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in unanswered:
                return (
                    "messages with role 'tool' must be a response to a preceding message "
                    f"with 'tool_calls' (tool_call_id {call_id!r})"
                )
            unanswered.remove(call_id)
            continue
        if unanswered:
            break
        if role == "assistant":
            unanswered = [call.get("id") for call in message.get("tool_calls") or []]
    if unanswered:
        return (
            "An assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'. The following tool_call_ids did not have "
            f"response messages: {', '.join(map(str, unanswered))}"
        )
    return None


def _completion(
    message: JsonObject,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    delay_seconds: float,
) -> ScriptedReply:
    body = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": "fake-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return ScriptedReply(200, body, delay_seconds=delay_seconds)


class FakeChatServer:
    """``POST /v1/chat/completions`` answered from a FIFO script; every request recorded."""

    def __init__(self, *, check_messages: bool = True, streaming: bool = True) -> None:
        self.check_messages = check_messages
        self.streaming = streaming  # False: a provider that answers plain JSON, always
        self._holds: list[StreamHold] = []  # reached by a stream: released when closing
        self._script: deque[ScriptedReply] = deque()
        self.requests: list[RecordedRequest] = []
        #: Body bytes written per answer, in answer order (complete once the server closed).
        self.body_bytes_sent: list[int] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        #: Open connections and the daemon thread serving each (daemon: a server nobody
        #: closed never holds up the interpreter's exit).
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="fake-chat-server", daemon=True)

    @property
    def url(self) -> str:
        """The ``base_url`` to give a client: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def add(self, *replies: ScriptedReply) -> None:
        with self._lock:
            self._script.extend(replies)

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop at once: release delayed replies, stop accepting, disconnect the clients and
        join the threads serving them. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()  # releases delayed replies at once
        with self._lock:
            for hold in self._holds:  # and held streams
                hold.release()
        self._wake_writer.send(b"\0")  # ends the accept loop at once
        if self._thread.ident is not None:  # started
            self._thread.join()
        with self._lock:
            handlers = list(self._connections.items())
        for connection, thread in handlers:  # idle keep-alive connections among them
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
            thread.join()
        self._server.server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _serve(self) -> None:
        """Accept connections until the wake-up socket says stop (no poll interval)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._closing.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._server and not self._closing.is_set():
                        self._server.handle_request()  # the listener is ready: no wait

    def _next(self, request: RecordedRequest) -> ScriptedReply:
        messages = request.body.get("messages") if isinstance(request.body, dict) else None
        problem = message_sequence_error(messages)
        with self._lock:
            self.requests.append(request)
            if self.check_messages and problem:
                return error_reply(400, problem)
            if self._script:
                return self._script.popleft()
        return error_reply(500, "the fake server has no scripted reply left")

    def _events(self, reply: ScriptedReply, body: Any) -> Iterator[bytes] | None:
        """The server-sent events to answer ``body`` with, or None for plain JSON."""
        if not self.streaming:
            return None
        return reply_events(body, reply.status, reply.body, reply.streamed_bytes)

    def _pass(self, hold: StreamHold | None, sent_chunks: int) -> bool:
        """Hold a stream at ``hold`` until released; False when the server is closing."""
        if hold is None or sent_chunks != hold.after_chunks:
            return True
        with self._lock:
            self._holds.append(hold)
            if self._closing.is_set():
                return False
        hold.reached.set()
        hold.wait_released()
        return not self._closing.is_set()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real providers do

            def setup(self) -> None:
                super().setup()
                with fake._lock:  # under the lock: either close() sees it, or we see closing
                    fake._connections[self.connection] = threading.current_thread()
                    if fake._closing.is_set():
                        self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                with fake._lock:
                    fake._connections.pop(self.connection, None)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                port = self.client_address[1]
                request = RecordedRequest(
                    self.path, dict(self.headers), body, time.monotonic(), port
                )
                reply = fake._next(request)
                if reply.delay_seconds and fake._closing.wait(reply.delay_seconds):
                    self.close_connection = True
                    return  # closing: drop the connection without an answer
                self._answer(reply, fake._events(reply, body))

            def _answer(self, reply: ScriptedReply, events: Iterator[bytes] | None) -> None:
                sent = 0
                content_type = "application/json" if events is None else "text/event-stream"
                try:
                    self.send_response(reply.status)
                    for name, value in {"Content-Type": content_type, **reply.headers}.items():
                        self.send_header(name, value)
                    body = self._body(reply) if events is None else self._stream(reply, events)
                    for part in body:
                        self.wfile.write(part)
                        sent += len(part)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (an interrupted run)
                finally:
                    with fake._lock:
                        fake.body_bytes_sent.append(sent)

            def _body(self, reply: ScriptedReply) -> Iterator[bytes]:
                """Ends the headers, then yields the body's parts as they are to be sent."""
                if reply.streamed_bytes:
                    self.send_header("Connection", "close")
                    self.close_connection = True  # the end of the body is the end of the stream
                    self.end_headers()
                    yield from _padding(reply.streamed_bytes)
                    return
                payload = json.dumps(reply.body).encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                yield from self._drip(payload, reply.drip_seconds)

            def _stream(self, reply: ScriptedReply, events: Iterator[bytes]) -> Iterator[bytes]:
                """Ends the headers, then yields the stream's events as they are to be sent,
                in chunked encoding (the connection stays open for the next request)."""
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for number, event in enumerate(events):
                    if number == reply.cut_after_chunks or not fake._pass(reply.hold, number):
                        self.close_connection = True
                        return  # drop the connection mid-body
                    for part in self._drip(event, reply.drip_seconds):
                        yield b"%X\r\n%s\r\n" % (len(part), part)
                    if self.close_connection:
                        return  # the server is closing: drop the connection mid-body
                yield b"0\r\n\r\n"

            def _drip(self, payload: bytes, seconds: float) -> Iterator[bytes]:
                """``payload`` at once, or (``seconds``) a byte at a time until closing."""
                if not seconds:
                    yield payload
                    return
                for index in range(len(payload)):
                    if fake._closing.wait(seconds):
                        self.close_connection = True
                        return  # closing: drop the connection mid-body
                    yield payload[index : index + 1]

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


def _padding(total_bytes: int) -> Iterator[bytes]:
    """A JSON object ``total_bytes`` long, in 64 KiB parts: ``{"padding": "xxx…"}``."""
    head, tail = b'{"padding": "', b'"}'
    filler = total_bytes - len(head) - len(tail)
    part = b"x" * 65536
    yield head
    for start in range(0, filler, len(part)):
        yield part[: min(len(part), filler - start)]
    yield tail
