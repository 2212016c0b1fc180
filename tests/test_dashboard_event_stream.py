"""``app/static/event_stream.js``: the dashboard's Server-Sent Events reader, in a browser.

The page reads its streams with ``fetch()`` because ``EventSource`` cannot send an
``Authorization`` header. These tests load the module into Debian's chromium (as
``tests/test_dashboard_browser.py`` does) from a small real HTTP server of their own, so
that each attempt of a reconnecting stream can be answered differently and its headers
recorded:

* the parser against the HTML standard's event stream rules, fed in awkward chunks;
* ``followStream`` across a drop, a 5xx, a frame cut in half, an ``end`` frame and a 401:
  each attempt carries the headers of that moment and the last event id seen as
  ``Last-Event-ID`` — exactly what ``EventSource`` resends — and a 4xx stops it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.test_dashboard_browser import browser_page, require_chromium

MODULE = Path(__file__).resolve().parent.parent / "app" / "static" / "event_stream.js"
PAGE = b"<!doctype html><title>event stream test</title>"

#: What ``/stream`` answers, attempt by attempt: (status, body). ``retry: 20`` makes the
#: waits between attempts short (20 ms, doubling while attempts fail).
ATTEMPTS: list[tuple[int, bytes]] = [
    (200, b'retry: 20\n\nid: 7\nevent: tick\ndata: {"n": 1}\n\nevent: tick\ndata: {"n": 2}\n\n'),
    (503, b'{"error": {"code": "shutting_down", "message": "draining"}}'),
    (200, b'id: 8\nevent: tick\ndata: {"n": 3}\n\nid: 9\nevent: tick\ndata: {"n":'),
    (200, b'event: end\ndata: {"reason": "slow_consumer", "last_seq": 8}\n\n'),
    (401, b'{"error": {"code": "unauthorized", "message": "the API key is not valid"}}'),
]


class StreamServer(ThreadingHTTPServer):
    """Serves a blank page, the module, and ``/stream`` as :data:`ATTEMPTS` says; records
    each attempt's ``Authorization`` and ``Last-Event-ID``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StreamHandler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str | None, str | None]] = []


class StreamHandler(BaseHTTPRequestHandler):
    server: StreamServer  # HTTP/1.0: each answer ends when the connection closes

    def do_GET(self) -> None:
        if self.path == "/stream":
            with self.server.lock:
                attempt = len(self.server.seen)
                headers = self.headers
                self.server.seen.append((headers["Authorization"], headers["Last-Event-ID"]))
            status, body = ATTEMPTS[attempt]
            kind = "text/event-stream" if status == 200 else "application/json"
            self.answer(status, kind, body)
        elif self.path == "/event_stream.js":
            self.answer(200, "text/javascript", MODULE.read_bytes())
        else:
            self.answer(200, "text/html", PAGE)

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def stream_server() -> Iterator[StreamServer]:
    server = StreamServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


PARSE = """async (chunks) => {
  const { EventStreamParser } = await import("/event_stream.js");
  const events = [];
  const parser = new EventStreamParser((event) => events.push(event));
  for (const chunk of chunks) parser.push(chunk);
  parser.end();
  return { events, retryMs: parser.retryMs, lastEventId: parser.lastEventId };
}"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_parser_follows_the_event_stream_rules() -> None:
    """CRLF split across chunks, a leading BOM, CR-only lines, comments, ``field:value``
    without a space, ids that persist (and one with NUL ignored), ``retry``, an empty data
    line, and an event cut off by the end: each as the HTML standard says."""
    require_chromium()
    chunks = [
        "\ufeffdata: a\r",
        "\ndata: b\r\n\r\n",
        ": heartbeat\n\n",
        'id: 3\nevent: status\ndata:{"x":1}\n\n',
        "event: delta\ndata: d\n\n",  # no id line: the last id stays 3
        "data: c\rdata:  two spaces\r\r",
        "data\n\n",  # a field without a colon: data is the empty string
        "id: 4\n\n",  # no data: nothing dispatched, but the id is taken
        "id: 5\0\nretry: 250\nretry: soon\n\n",
        "data: cut off",
    ]
    expected = [
        {"type": "message", "data": "a\nb", "lastEventId": ""},
        {"type": "status", "data": '{"x":1}', "lastEventId": "3"},
        {"type": "delta", "data": "d", "lastEventId": "3"},
        {"type": "message", "data": "c\n two spaces", "lastEventId": "3"},
        {"type": "message", "data": "", "lastEventId": "3"},
    ]
    with stream_server() as server, browser_page() as (page, problems):
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        result = page.evaluate(PARSE, chunks)
        assert result == {"events": expected, "retryMs": 250, "lastEventId": "4"}
        assert problems.seen == []


FOLLOW = """async () => {
  const { followStream } = await import("/event_stream.js");
  const events = [];
  const states = [];
  let attempt = 0;
  return await new Promise((resolve) => {
    followStream("/stream", {
      headers: () => ({ Authorization: `Bearer key-${++attempt}` }),
      on: {
        tick: (data, event) => events.push([data.n, event.lastEventId]),
        end: (data, event) => events.push([data.reason, event.lastEventId]),
      },
      onState: (state) => states.push(state),
      onRefused: (status, error) => resolve({ events, states, status, error }),
    });
  });
}"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_follow_stream_resumes_with_last_event_id_and_stops_on_a_4xx() -> None:
    """After a drop, a 503, a frame cut in half and an ``end`` frame, every new attempt
    sends the last complete event's id as ``Last-Event-ID`` and the headers of that moment;
    the 401 stops the stream and reaches the caller with the error body."""
    require_chromium()
    with stream_server() as server, browser_page(expected=frozenset({401, 503})) as (page, _):
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        result = page.evaluate(FOLLOW)
        assert result["events"] == [[1, "7"], [2, "7"], [3, "8"], ["slow_consumer", "8"]]
        assert result["status"] == 401
        assert result["error"] == {"code": "unauthorized", "message": "the API key is not valid"}
        # live, dropped; 503; live, dropped mid-frame; live, ended (not a drop); refused
        live, again = "live", "reconnecting"
        assert result["states"] == [live, again, again, live, again, live]
        assert server.seen == [
            ("Bearer key-1", None),
            ("Bearer key-2", "7"),
            ("Bearer key-3", "7"),
            ("Bearer key-4", "8"),
            ("Bearer key-5", "8"),
        ]
