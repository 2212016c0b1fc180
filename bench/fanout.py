"""Fan-out: how fast a committed event reaches its stream subscribers, and how many events
per second one stream carries. Standalone: ``.venv/bin/python bench/fanout.py`` (15-25 s on
a 2-core machine); ``bench/run.py`` runs it too and adds its rows (``F ...``) to its table.

The server is the real one as a subprocess (``server_process.TrellisServer``); the
subscribers are raw HTTP/1.1 SSE connections (h11 over Trio sockets) in this process.

1. Latency commit -> receipt, with 1 and with 100 SSE subscribers on one conversation:
   ``MESSAGES`` user messages are posted one every ``PACE_SECONDS`` (a paced producer, so
   the figure is latency, not queueing behind a burst). Each sample is the client's wall
   clock when the bytes carrying the frame arrived minus the event's ``timestamp`` (the
   server's wall clock inside the store's write transaction, just before the commit; same
   machine, same clock). It includes the commit, the hop to the Trio thread, rendering,
   loopback, and this process's own work for the other subscribers: with 100 of them the
   client shares the machine's 2 cores with the server.
2. Events/s on a single stream: (a) *replay*: a fresh SSE stream reads ``STORED_EVENTS``
   stored events from ``after_seq=0`` (store pages -> frames -> socket, as fast as the
   client reads); the same over the WebSocket stream for comparison; (b) *live*: one
   subscriber while ``PRODUCERS`` connections post ``STORED_EVENTS`` messages as fast as
   the server takes them: the rate is the producers' (each post is a commit), the lag
   p99 shows whether the stream kept up (a stream that could not would be dropped as
   ``slow_consumer`` and the scenario would fail).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import h11
import trio
from raw_client import RawClient
from report import Row, format_table
from server_process import TrellisServer
from workload import log, summarize_ms
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WsRequest

SUBSCRIBER_COUNTS = (1, 100)  # the figures
MESSAGES = 200  # per latency scenario: 200 samples x subscribers; p99 rests on >= 2 per sub
PACE_SECONDS = 0.01  # between posted messages: ~100 events/s, far below what a stream carries
STORED_EVENTS = 4000  # for the throughput figures: a couple of seconds of posting
PRODUCERS = 4  # connections posting at once: enough to keep the server's writer busy
SCENARIO_TIMEOUT_SECONDS = 60.0  # every scenario finishes in a few seconds; a hard stop
RECV_BYTES = 65_536


@dataclass
class Subscriber:
    """One SSE connection: receipt lag per event (ns) and the highest seq seen."""

    lags_ns: list[int] = field(default_factory=list)
    last_seq: int = 0
    received: int = 0
    first_ns: int = 0
    last_ns: int = 0


async def open_sse(port: int, path: str) -> tuple[trio.SocketStream, h11.Connection]:
    """A raw SSE request; returns once the 200 response head arrived."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("Host", "127.0.0.1")])
    await sock.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await sock.receive_some(RECV_BYTES))
    if not isinstance(event, h11.Response) or event.status_code != 200:
        raise RuntimeError(f"stream refused: {event!r}")
    return sock, connection


async def follow_sse(
    port: int, path: str, until_seq: int, sub: Subscriber, ready: Callable[[], None]
) -> None:
    """Read the stream until ``until_seq``; stamp each chunk as it arrives. ``ready`` is
    called once the first event (the replayed seq 1) arrived: from then on the
    subscription is live."""
    sock, connection = await open_sse(port, path)
    async with sock:
        buffer, arrived_ns = b"", time.time_ns()
        while sub.last_seq < until_seq:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await sock.receive_some(RECV_BYTES)
                arrived_ns = time.time_ns()
                connection.receive_data(data)
                continue
            if not isinstance(event, h11.Data):
                raise RuntimeError(f"the stream ended: {event!r}")
            buffer += bytes(event.data)
            *frames, buffer = buffer.split(b"\n\n")
            first = sub.received == 0
            for frame in frames:
                record(frame, arrived_ns, sub)
            if first and sub.received:
                ready()


def record(frame: bytes, arrived_ns: int, sub: Subscriber) -> None:
    """Note one SSE frame (events only; heartbeats and deltas are not samples)."""
    if not frame.startswith(b"id: "):
        return
    data = json.loads(frame.split(b"\ndata: ", 1)[1])
    sent_ns = int(datetime.fromisoformat(data["timestamp"]).timestamp() * 1e9)
    sub.lags_ns.append(arrived_ns - sent_ns)
    sub.last_seq = data["seq"]
    sub.received += 1
    sub.first_ns = sub.first_ns or arrived_ns
    sub.last_ns = arrived_ns


def create(client: RawClient, agent: dict[str, Any]) -> str:
    """A conversation whose seq 1 is a user message (a subscriber's replay shows it)."""
    steps = len(agent["steps"])
    body = {"agent": agent, "initial_message": "fan-out", "max_iterations": steps + 1}
    conversation_id: str = client.call("POST", "/api/conversations", body, 201)["id"]
    return conversation_id


def stream_path(conversation_id: str, transport: str = "stream") -> str:
    return f"/api/conversations/{conversation_id}/events/{transport}"


async def latency(port: int, subscribers: int) -> dict[str, Any]:
    """Scenario 1 for ``subscribers`` SSE connections."""
    with RawClient(port) as client:
        conversation_id = create(client, {"kind": "script", "steps": [{"say": "x"}]})
        subs = [Subscriber() for _ in range(subscribers)]
        connected = trio.Semaphore(0)
        last_seq = 1 + MESSAGES  # the initial message, then the posted ones
        async with trio.open_nursery() as nursery:
            for sub in subs:
                path = stream_path(conversation_id)
                nursery.start_soon(follow_sse, port, path, last_seq, sub, connected.release)
            for _ in subs:
                await connected.acquire()
            path = f"/api/conversations/{conversation_id}/messages"
            for i in range(MESSAGES):
                await trio.to_thread.run_sync(client.call, "POST", path, {"content": f"m{i}"}, 202)
                await trio.sleep(PACE_SECONDS)
    lags = [lag for sub in subs for lag in sub.lags_ns[1:]]  # seq 1 was a replay
    return summarize_ms(lags) | {"subscribers": subscribers, "events": MESSAGES}


async def replay_sse(port: int, conversation_id: str, total: int) -> dict[str, Any]:
    """Scenario 2a over SSE: read ``total`` stored events from the start."""
    sub = Subscriber()
    started = time.perf_counter()
    await follow_sse(port, stream_path(conversation_id), total, sub, lambda: None)
    seconds = time.perf_counter() - started
    return {"events": sub.received, "seconds": seconds, "events_per_s": sub.received / seconds}


async def replay_ws(port: int, conversation_id: str, total: int) -> dict[str, Any]:
    """Scenario 2a over the WebSocket stream (JSON frames)."""
    started = time.perf_counter()
    received = 0
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        ws = WSConnection(ConnectionType.CLIENT)
        path = stream_path(conversation_id, "ws")
        await sock.send_all(ws.send(WsRequest(host="127.0.0.1", target=path)))
        last_seq, text = 0, ""
        while last_seq < total:
            ws.receive_data(await sock.receive_some(RECV_BYTES))
            for event in ws.events():
                if isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        frame, text = json.loads(text), ""
                        if frame["type"] == "event":
                            last_seq, received = frame["event"]["seq"], received + 1
                elif not isinstance(event, AcceptConnection):
                    raise RuntimeError(f"unexpected {event!r}")
    seconds = time.perf_counter() - started
    return {"events": received, "seconds": seconds, "events_per_s": received / seconds}


def post_messages(port: int, conversation_id: str, count: int) -> None:
    """Post ``count`` user messages on one keep-alive connection, back to back (a thread)."""
    path = f"/api/conversations/{conversation_id}/messages"
    with RawClient(port) as client:
        for i in range(count):
            client.call("POST", path, {"content": f"m{i}"}, 202)


async def live_single(port: int) -> tuple[dict[str, Any], str, int]:
    """Scenario 2b: one subscriber while ``PRODUCERS`` connections post ``STORED_EVENTS``
    messages as fast as the server takes them. Returns the figures, the conversation and
    its event count (for the replays)."""
    with RawClient(port) as client:
        conversation_id = create(client, {"kind": "script", "steps": [{"say": "x"}]})
    total = 1 + STORED_EVENTS  # the initial message, then the posted ones
    sub = Subscriber()
    connected = trio.Event()
    async with trio.open_nursery() as nursery:
        path = stream_path(conversation_id)
        nursery.start_soon(follow_sse, port, path, total, sub, connected.set)
        await connected.wait()
        async with trio.open_nursery() as producers:
            for _ in range(PRODUCERS):
                share = STORED_EVENTS // PRODUCERS
                producers.start_soon(trio.to_thread.run_sync, post_messages, port,
                                     conversation_id, share)  # fmt: skip
    seconds = (sub.last_ns - sub.first_ns) / 1e9
    figures = summarize_ms(sub.lags_ns[1:]) | {
        "events": sub.received - 1,
        "seconds": seconds,
        "events_per_s": (sub.received - 1) / seconds,
    }
    return figures, conversation_id, total


async def measure_async(port: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with trio.fail_after(SCENARIO_TIMEOUT_SECONDS * 3):  # a hard stop for the whole set
        return await _scenarios(port, results)


async def _scenarios(port: int, results: dict[str, Any]) -> dict[str, Any]:
    for subscribers in SUBSCRIBER_COUNTS:
        log(f"fan-out latency, {subscribers} SSE subscriber(s)")
        results[f"latency_{subscribers}"] = await latency(port, subscribers)
    log(f"one stream, live: {PRODUCERS} connections posting {STORED_EVENTS} messages")
    results["live"], conversation_id, total = await live_single(port)
    log(f"one stream, replay of {total} stored events (SSE, then WebSocket)")
    results["replay_sse"] = await replay_sse(port, conversation_id, total)
    results["replay_ws"] = await replay_ws(port, conversation_id, total)
    return results


def measure() -> dict[str, Any]:
    """Every scenario on one fresh server; raw figures (see :func:`rows`)."""
    with TrellisServer() as server:
        results: dict[str, Any] = trio.run(measure_async, server.port)
    return results


def rows(r: dict[str, Any]) -> list[Row]:
    """Table rows in ``report.py``'s shape (no target in the issue: figures are info)."""
    one, many = r["latency_1"], r["latency_100"]
    live, sse, ws = r["live"], r["replay_sse"], r["replay_ws"]
    ratio = many["p99_ms"] / one["p99_ms"]
    return [
        Row("F commit -> SSE receipt, 1 subscriber", latency_ms(one), "-", "info",
            str(one["samples"]), "-"),
        Row("F commit -> SSE receipt, 100 subscribers", latency_ms(many), "-",
            f"info ({ratio:.1f}x p99 of 1)", str(many["samples"]), "-"),
        Row("F one SSE stream, replay from store", f"{sse['events_per_s']:,.0f} events/s", "-",
            "info", str(sse["events"]), "-"),
        Row("  ref: one WebSocket stream, replay", f"{ws['events_per_s']:,.0f} events/s", "-",
            "info", str(ws["events"]), "-"),
        Row(f"F one SSE stream, live ({PRODUCERS} posting clients)",
            f"{live['events_per_s']:,.0f} events/s", "-", "info", str(live["events"]), "-"),
        Row("  ref: its commit -> receipt", latency_ms(live), "-", "info",
            str(live["samples"]), "-"),
    ]  # fmt: skip


def latency_ms(summary: dict[str, Any]) -> str:
    return f"p50 {summary['p50_ms']:.2f} / p99 {summary['p99_ms']:.2f} ms"


def main() -> int:
    began = time.perf_counter()
    results = measure()
    print(format_table(rows(results)))
    print(f"\n{time.perf_counter() - began:.0f} s in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
