"""The conversation stream over a WebSocket, on a real server: the same events as SSE, as
JSON frames; a close code and reason for every way it ends; pings; guards; no leftovers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from app.events import Event as StoredEvent
from app.live.feed import Delta
from app.settings import Settings
from app.testing import Gates, gated_registry
from tests.live import LiveServer, live_server
from tests.test_streams import count, start_gated, stream

pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Closed:
    """The server's close frame."""

    code: int
    reason: str


class Refused(Exception):
    """The server answered the handshake with an HTTP error instead of accepting it."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = json.loads(body) if body else None


class WsClient:
    """A WebSocket client (wsproto over a Trio socket): JSON frames in, frames out.

    :meth:`next` returns the next JSON frame, or :class:`Closed` once the server closed
    (after answering its close); protocol-level pongs are collected in ``pongs``."""

    def __init__(self, sock: trio.SocketStream, connection: WSConnection) -> None:
        self.sock = sock
        self.connection = connection
        self.pending: list[Event] = []
        self.text = ""
        self.pongs: list[bytes] = []

    async def event(self) -> Event:
        while not self.pending:
            data = await self.sock.receive_some(65536)
            if not data:
                raise AssertionError("the connection ended without a close frame")
            self.connection.receive_data(data)
            self.pending.extend(self.connection.events())
        return self.pending.pop(0)

    async def next(self) -> dict[str, Any] | Closed:
        while True:
            event = await self.event()
            if isinstance(event, TextMessage):
                self.text += event.data
                if event.message_finished:
                    frame: dict[str, Any] = json.loads(self.text)
                    self.text = ""
                    return frame
            elif isinstance(event, CloseConnection):
                await self.sock.send_all(self.connection.send(event.response()))
                return Closed(event.code, event.reason)
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def frame(self) -> dict[str, Any]:
        frame = await self.next()
        assert isinstance(frame, dict), frame
        return frame

    async def send(self, frame: dict[str, Any]) -> None:
        await self.sock.send_all(self.connection.send(TextMessage(data=json.dumps(frame))))

    async def ping(self, payload: bytes) -> None:
        await self.sock.send_all(self.connection.send(Ping(payload=payload)))

    async def events_until(self, seq: int) -> list[dict[str, Any]]:
        """Event frames up to and including ``seq`` (any other frame fails the test)."""
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["event"]["seq"] < seq:
            frame = await self.frame()
            assert frame["type"] == "event", frame
            frames.append(frame)
        return frames

    async def closed(self) -> Closed:
        """Skip frames up to the close."""
        while not isinstance(frame := await self.next(), Closed):
            pass
        return frame


def port_of(server: LiveServer) -> int:
    return int(str(server.client.base_url).rsplit(":", 1)[1].rstrip("/"))


@asynccontextmanager
async def ws(
    server: LiveServer,
    conversation_id: str,
    headers: dict[str, str] | None = None,
    path: str | None = None,
    **params: Any,
) -> AsyncIterator[WsClient]:
    """Open the conversation's WebSocket stream (``Refused`` if the handshake is refused).
    Leaving the block drops the TCP connection without a close frame."""
    query = urlencode(params)
    target = path or f"/api/conversations/{conversation_id}/events/ws"
    target += f"?{query}" if query else ""
    headers = {"Host": "127.0.0.1"} | (headers or {})
    sock = await trio.open_tcp_stream("127.0.0.1", port_of(server))
    async with sock:
        connection = WSConnection(ConnectionType.CLIENT)
        extra = [(k.encode(), v.encode()) for k, v in headers.items() if k != "Host"]
        request = Request(host=headers["Host"], target=target, extra_headers=extra)
        await sock.send_all(connection.send(request))
        client = WsClient(sock, connection)
        answer = await client.event()
        if isinstance(answer, RejectConnection):
            body = b""
            while answer.has_body:
                data = await client.event()
                assert isinstance(data, RejectData)
                body += data.data
                if data.body_finished:
                    break
            raise Refused(answer.status_code, body)
        assert isinstance(answer, AcceptConnection), answer
        yield client


async def create(server: LiveServer) -> str:
    """A conversation whose one event (seq 1) is a user message."""
    body = {"agent": {"kind": "script", "steps": [{"say": "x"}]}, "initial_message": "hi"}
    created = await server.client.post("/api/conversations", json=body)
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["id"]
    return conversation_id


def task_count() -> int:
    """Tasks alive in this Trio run (the server's and the test's)."""

    def tree(task: trio.lowlevel.Task) -> int:
        return 1 + sum(tree(t) for n in task.child_nurseries for t in n.child_tasks)

    return tree(trio.lowlevel.current_root_task())


async def test_ws_resumes_with_exactly_the_remaining_events(
    settings: Settings, gates: Gates
) -> None:
    """Read part of a run's events, disconnect, let the run go on, reconnect with
    ``after_seq``: exactly the events after it arrive, then live ones — no gap, no
    duplicate — each the same JSON as the events list."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "a", "b", "c")
            await gates["a"].wait_entered()
            held = await count(server, conversation_id)
            async with ws(server, conversation_id) as client:
                first = await client.events_until(held)
            assert [f["event"]["seq"] for f in first] == list(range(1, held + 1))
            listed = await server.client.get(f"/api/conversations/{conversation_id}/events")
            assert [f["event"] for f in first] == listed.json()["items"]
            gates["a"].release()
            await gates["b"].wait_entered()
            async with ws(server, conversation_id, after_seq=2) as client:
                resumed = await client.events_until(await count(server, conversation_id))
                gates["b"].release()
                await gates["c"].wait_entered()
                live = await client.events_until(await count(server, conversation_id))
            seqs = [f["event"]["seq"] for f in resumed + live]
            assert seqs == list(range(3, seqs[-1] + 1))
            texts = [f["event"]["payload"].get("text") for f in resumed + live]
            assert "gate b" in texts and "gate c" in texts
            gates["c"].release()


async def test_ws_kinds_filter(settings: Settings, gates: Gates) -> None:
    """``kinds=message`` sends only messages."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "k")
            await gates["k"].wait_entered()
            async with ws(server, conversation_id, kinds="message") as client:
                frame = await client.frame()
            assert frame["event"]["payload"] == {"kind": "message", "text": "gate k"}
            gates["k"].release()


async def test_ws_ends_with_deleted_and_close_1000(settings: Settings, gates: Gates) -> None:
    """Deleting the conversation sends the final status, an ``end`` frame (``deleted``,
    the last seq), then closes with 1000 ``deleted``."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "d")
            await gates["d"].wait_entered()
            async with ws(server, conversation_id) as client:
                await client.events_until(await count(server, conversation_id))
                await server.client.delete(f"/api/conversations/{conversation_id}")
                frame = await client.frame()
                while frame["type"] == "event":  # the run's final status
                    last_seq = frame["event"]["seq"]
                    frame = await client.frame()
                closed = await client.next()
            assert frame == {"type": "end", "reason": "deleted", "last_seq": last_seq}
            assert closed == Closed(1000, "deleted")


async def test_ws_ends_with_the_final_status_and_1001_when_the_server_drains(
    settings: Settings, gates: Gates
) -> None:
    """A drain delivers the run's final status, then ``end`` (``shutdown``) and 1001."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "s")
            await gates["s"].wait_entered()
            async with ws(server, conversation_id) as client:
                await client.events_until(await count(server, conversation_id))
                await server.supervisor.drain("shutdown")
                status, end, closed = (
                    await client.frame(),
                    await client.frame(),
                    await client.next(),
                )
            assert status["event"]["payload"]["status"] == "paused"
            assert status["event"]["payload"]["reason"] == "shutdown"
            assert end == {"type": "end", "reason": "shutdown", "last_seq": status["event"]["seq"]}
            assert closed == Closed(1001, "shutdown")


async def test_ws_slow_consumer_is_closed_with_1008(settings: Settings, gates: Gates) -> None:
    """Past ``stream_buffer_events`` undelivered events (ten published in one go, which the
    stream cannot read in between) the stream ends with ``slow_consumer`` and 1008, after
    the events it had taken."""
    settings = settings.model_copy(update={"stream_buffer_events": 3})
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            sup = server.supervisor
            conversation_id = await start_gated(server, "slow")
            await gates["slow"].wait_entered()
            last = await count(server, conversation_id)
            async with ws(server, conversation_id) as client:
                (stored,) = (await client.events_until(last))[-1:]
                await trio.testing.wait_all_tasks_blocked()
                template = StoredEvent.model_validate(stored["event"])
                burst = [template.model_copy(update={"seq": last + i}) for i in range(1, 11)]
                sup.feed.publish(burst)
                # the waiting stream takes the first at once; three more fill its buffer
                buffered = [await client.frame() for _ in range(4)]
                end, closed = await client.frame(), await client.next()
            assert [f["event"]["seq"] for f in buffered] == [last + i for i in range(1, 5)]
            assert end == {"type": "end", "reason": "slow_consumer", "last_seq": last + 4}
            assert closed == Closed(1008, "slow_consumer")
            gates["slow"].release()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({"after_seq": -1}, "after_seq", id="negative-after-seq"),
        pytest.param({"after_seq": 2**63}, "after_seq", id="after-seq-past-int64"),
        pytest.param({"kinds": "nope"}, "kinds", id="unknown-kind"),
        pytest.param({"colour": "red"}, "colour", id="unknown-parameter"),
    ],
)
async def test_ws_bad_query_is_an_error_frame_and_close_4422(
    settings: Settings, params: dict[str, Any], field: str
) -> None:
    """A bad query parameter: an ``error`` frame naming it, then close 4422."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            conversation_id = await create(server)
            async with ws(server, conversation_id, **params) as client:
                error, closed = await client.frame(), await client.next()
    assert error["type"] == "error" and error["error"]["code"] == "validation_error"
    assert error["error"]["detail"][0]["loc"] == ["query", field]
    assert closed == Closed(4422, "validation_error")


async def test_ws_repeated_parameter_is_4422(settings: Settings) -> None:
    """A parameter given twice is refused like any bad value."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            path = f"/api/conversations/{await create(server)}/events/ws?after_seq=1&after_seq=2"
            async with ws(server, "", path=path) as client:
                error, closed = await client.frame(), await client.next()
    assert error["error"]["detail"][0]["loc"][:2] == ["query", "after_seq"]
    assert closed == Closed(4422, "validation_error")


async def test_ws_unknown_conversation_is_an_error_frame_and_close_4404(
    settings: Settings,
) -> None:
    """An unknown conversation: an ``error`` frame (``not_found``), then close 4404."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            async with ws(server, "nope") as client:
                error, closed = await client.frame(), await client.next()
            assert len(server.supervisor.feed) == 0
    assert error["type"] == "error" and error["error"]["code"] == "not_found"
    assert closed == Closed(4404, "not_found")


async def test_ws_server_failure_is_an_error_frame_and_close_1011(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the handshake (here the store, mid replay) is an ``error`` frame
    that tells nothing of the cause, then close 1011; the subscription is gone."""

    def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    with trio.fail_after(20):
        async with live_server(settings) as server:
            conversation_id = await create(server)
            monkeypatch.setattr(server.supervisor.store, "search_events", broken)
            async with ws(server, conversation_id) as client:
                error, closed = await client.frame(), await client.next()
            assert len(server.supervisor.feed) == 0
    assert error == {
        "type": "error",
        "error": {
            "code": "internal_error",
            "message": "the stream failed; see the server log",
            "detail": None,
        },
    }
    assert closed == Closed(1011, "internal_error")


async def test_ws_answers_pings(settings: Settings, gates: Gates) -> None:
    """A client frame ``{"type": "ping"}`` is answered with ``{"type": "pong"}`` (between
    event frames, whole); a protocol-level ping gets its pong from Hypercorn; any other
    client frame is ignored."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "p")
            await gates["p"].wait_entered()
            async with ws(server, conversation_id) as client:
                await client.events_until(await count(server, conversation_id))
                await client.send({"type": "hello"})
                await client.sock.send_all(client.connection.send(TextMessage(data="not json")))
                await client.send({"type": "ping"})
                assert await client.frame() == {"type": "pong"}
                await client.ping(b"are you there")
                await client.send({"type": "ping"})
                assert await client.frame() == {"type": "pong"}
                assert client.pongs == [b"are you there"]
            gates["p"].release()


async def test_ws_heartbeat_frame_while_idle(settings: Settings, gates: Gates) -> None:
    """With nothing new to send, the stream sends ``{"type": "heartbeat"}``."""
    settings = settings.model_copy(update={"stream_heartbeat_seconds": 0.05})
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "h")
            await gates["h"].wait_entered()
            async with ws(server, conversation_id) as client:
                await client.events_until(await count(server, conversation_id))
                assert await client.frame() == {"type": "heartbeat"}
            gates["h"].release()


async def test_deltas_reach_sse_and_ws_without_moving_the_position(
    settings: Settings, gates: Gates
) -> None:
    """A delta published while streams are connected arrives on SSE (``event: delta``, no
    ``id``) and WS (``{"type": "delta"}``) — not on a stream filtered to other kinds — and
    the next event still has the next seq."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            sup = server.supervisor
            conversation_id = await start_gated(server, "t")
            await gates["t"].wait_entered()
            last = await count(server, conversation_id)
            run_id = (await server.client.get(f"/api/conversations/{conversation_id}")).json()[
                "run"
            ]["id"]
            async with (
                stream(server, conversation_id) as sse,
                ws(server, conversation_id) as client,
                ws(server, conversation_id, kinds="status") as statuses,
            ):
                await sse.events_until(last)
                await client.events_until(last)
                await statuses.frame()  # queued
                await statuses.frame()  # running
                sup.feed.publish_delta(Delta(conversation_id, run_id, "Hel", after_seq=last))
                sup.feed.publish_delta(Delta(conversation_id, run_id, "lo", after_seq=last))
                sse_deltas = [await sse.next(), await sse.next()]
                ws_deltas = [await client.frame(), await client.frame()]
                gates["t"].release()  # the run finishes: its status is the next event
                sse_next, ws_next = await sse.next(), await client.frame()
                status_next = await statuses.frame()
    delta = {"run_id": run_id, "after_seq": last}
    assert sse_deltas == [
        {"event": "delta", "data": delta | {"text": "Hel"}},
        {"event": "delta", "data": delta | {"text": "lo"}},
    ]
    assert ws_deltas == [
        {"type": "delta", "text": "Hel"} | delta,
        {"type": "delta", "text": "lo"} | delta,
    ]
    assert int(sse_next["id"]) == sse_next["data"]["seq"] == last + 1
    assert ws_next["event"]["seq"] == last + 1
    assert status_next["type"] == "event" and status_next["event"]["seq"] == last + 1


async def test_ws_disconnect_leaves_no_subscription_and_no_task(
    settings: Settings, gates: Gates
) -> None:
    """A client that drops its connection mid-stream (no close frame) leaves no
    subscription and no task behind: the task tree is back to what it was before."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "x")
            await gates["x"].wait_entered()
            await trio.testing.wait_all_tasks_blocked()
            baseline = task_count()
            async with ws(server, conversation_id) as client:
                await client.frame()
                await trio.testing.wait_all_tasks_blocked()
                assert len(server.supervisor.feed) == 1
                assert task_count() > baseline
            while len(server.supervisor.feed) or task_count() != baseline:
                await trio.sleep(0.01)  # the server notices the closed socket by itself
                await trio.testing.wait_all_tasks_blocked()
            gates["x"].release()


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        pytest.param({"Origin": "https://evil.example"}, 403, "forbidden_origin", id="origin"),
        pytest.param({"Origin": "null"}, 403, "forbidden_origin", id="null-origin"),
        pytest.param({"Host": "attacker.example"}, 421, "misdirected_request", id="host"),
    ],
)
async def test_ws_handshake_from_a_foreign_page_is_refused_before_accept(
    settings: Settings, headers: dict[str, str], status: int, code: str
) -> None:
    """Cross-site WebSocket hijacking: a foreign Origin (403) or Host (421) gets the HTTP
    error instead of a WebSocket, and nothing subscribes."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            conversation_id = await create(server)
            with pytest.raises(Refused) as refused:
                async with ws(server, conversation_id, headers=headers):
                    pass
            assert len(server.supervisor.feed) == 0
    assert refused.value.status == status
    assert refused.value.body["error"]["code"] == code


async def test_ws_handshake_from_the_same_origin_or_no_origin_is_accepted(
    settings: Settings,
) -> None:
    """A page served by this server (Origin = its own scheme and Host) and a client
    without Origin both get the stream."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            conversation_id = await create(server)
            host = f"127.0.0.1:{port_of(server)}"
            for headers in ({"Host": host, "Origin": f"http://{host}"}, {}):
                async with ws(server, conversation_id, headers=headers) as client:
                    frame = await client.frame()
                assert frame["type"] == "event" and frame["event"]["seq"] == 1, headers
