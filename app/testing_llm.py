"""A fake OpenAI-compatible Chat Completions server, for tests — yours and ours.

It is a real HTTP server on 127.0.0.1 (port 0, in a background thread), so the code under
test speaks real HTTP through its real client; nothing is mocked. Each test scripts the
answers, in order, and reads back the requests the server got::

    with FakeChatServer() as provider:
        provider.add(tool_call_reply([("terminal", {"command": "ls"})]), text_reply("Done."))
        ...  # run an "llm" agent with base_url=provider.url
        assert provider.requests[0].body["tools"][0]["function"]["name"] == "terminal"

A scripted answer can be delayed (``delay_seconds``: the server holds the response; closing
the server releases it at once) or be an HTTP error (``error_reply(429, retry_after=...)``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class ScriptedReply:
    """One scripted answer: a status, a JSON body, headers, and an optional delay."""

    status: int
    body: JsonObject
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: JsonObject
    received_at: float  # time.monotonic() when the request arrived


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
    status: int, message: str = "scripted error", *, retry_after: float | None = None
) -> ScriptedReply:
    """An HTTP error in OpenAI's error shape, optionally with ``Retry-After``."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    body = {"error": {"message": message, "type": "scripted", "code": status}}
    return ScriptedReply(status, body, headers)


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

    def __init__(self) -> None:
        self._script: deque[ScriptedReply] = deque()
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

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
        self._closing.set()  # releases delayed replies at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _next(self, request: RecordedRequest) -> ScriptedReply:
        with self._lock:
            self.requests.append(request)
            if self._script:
                return self._script.popleft()
        return error_reply(500, "the fake server has no scripted reply left")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                request = RecordedRequest(self.path, dict(self.headers), body, time.monotonic())
                reply = fake._next(request)
                if reply.delay_seconds and fake._closing.wait(reply.delay_seconds):
                    return  # closing: drop the connection without an answer
                payload = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in {
                        "Content-Type": "application/json",
                        **reply.headers,
                    }.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (an interrupted run): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
