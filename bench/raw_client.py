"""A minimal keep-alive HTTP/1.1 client over one raw socket, so client overhead stays tiny.

It speaks just enough HTTP for the benchmark: one request at a time on a persistent
connection, JSON bodies, responses framed by ``Content-Length`` (Hypercorn always sends it for
Trellis's JSON responses; 204 and 304 have no body). Anything else is an error, not a guess.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
RECV_BYTES = 65_536  # one read; Trellis's responses here are a few hundred bytes
DEFAULT_TIMEOUT_SECONDS = 10.0  # no single request in the benchmark should take this long
BODYLESS_STATUSES = (204, 304)


class HttpError(Exception):
    """The server answered with an unexpected status, or broke the HTTP framing."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ConnectionClosedIdle(HttpError):
    """The server closed the connection before sending any byte of the response."""


class RawClient:
    """One persistent connection to ``127.0.0.1:port``; not thread-safe (one per thread)."""

    def __init__(self, port: int, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.port = port
        self.timeout_seconds = timeout_seconds
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection((HOST, self.port), timeout=self.timeout_seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def request(self, method: str, path: str, body: Any = None) -> Response:
        """Send one request and read its whole response (reconnects if the server closed)."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        if body is not None or method != "GET":
            head += f"Content-Length: {len(payload)}\r\n"
        reused = self._sock is not None
        try:
            response = self._exchange(head.encode() + b"\r\n" + payload)
        except ConnectionClosedIdle:
            if not reused:
                raise
            # The server closed the kept-alive connection while it was idle (its
            # keep_alive_timeout) before reading this request: send it on a new one.
            response = self._exchange(head.encode() + b"\r\n" + payload)
        if response.headers.get("connection", "").lower() == "close":
            self.close()
        return response

    def _exchange(self, request: bytes) -> Response:
        sock = self._connect()
        try:
            sock.sendall(request)
            return self._read_response()
        except BaseException:
            self.close()  # the connection's state is unknown now
            raise

    def _read_response(self) -> Response:
        while b"\r\n\r\n" not in self._buffer:
            self._recv()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status in BODYLESS_STATUSES:
            return Response(status, headers, b"")
        if "content-length" not in headers:
            raise HttpError(f"status {status} response without Content-Length: {headers}")
        length = int(headers["content-length"])
        while len(self._buffer) < length:
            self._recv()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Response(status, headers, body)

    def _recv(self) -> None:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(RECV_BYTES)
        except ConnectionResetError:
            chunk = b""
        if not chunk and not self._buffer:
            raise ConnectionClosedIdle("the server closed the connection before answering")
        if not chunk:
            raise HttpError("the server closed the connection mid-response")
        self._buffer += chunk

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """``request`` that checks the status and returns the decoded JSON body."""
        response = self.request(method, path, body)
        if response.status != expect:
            raise HttpError(
                f"{method} {path}: expected {expect}, got {response.status}: {response.body!r}"
            )
        return response.json() if response.body else None

    def timed_get(self, path: str) -> int:
        """GET ``path`` and return the round trip in nanoseconds (status must be 200)."""
        start = time.perf_counter_ns()
        response = self.request("GET", path)
        elapsed = time.perf_counter_ns() - start
        if response.status != 200:
            raise HttpError(f"GET {path}: status {response.status}: {response.body!r}")
        return elapsed


def wait_for_status(port: int, path: str, deadline: float, poll_seconds: float) -> None:
    """Poll ``GET path`` on fresh connections until it answers 200, or raise at ``deadline``
    (a ``time.perf_counter()`` value). Refused connections are retried: the server may not
    be listening yet."""
    while True:
        try:
            with RawClient(port, timeout_seconds=max(deadline - time.perf_counter(), 0.01)) as c:
                if c.request("GET", path).status == 200:
                    return
        except (OSError, HttpError):
            pass
        if time.perf_counter() >= deadline:
            raise TimeoutError(f"GET {path} did not answer 200 before the deadline")
        time.sleep(poll_seconds)
