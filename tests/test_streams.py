"""Event streams over real HTTP: replay then live, resumable, filtered, ended with a reason."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import h11
import pytest
import trio
import trio.testing

from app.events import MessagePayload, Source
from app.live import follow
from app.live.feed import Delta, StreamEnd
from app.settings import Settings
from app.supervisor import RunSupervisor
from app.testing import Gates, gated_registry
from tests.conftest import gated, new_conversation
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)


class Frames:
    """Reads Server-Sent Events from a raw HTTP/1.1 connection (h11 over a Trio socket),
    one frame at a time. (httpx would do, but leaves an unexhausted generator behind when a
    test stops reading an endless stream.)"""

    def __init__(self, sock: trio.SocketStream, connection: h11.Connection) -> None:
        self.sock = sock
        self.connection = connection
        self.buffer = b""

    async def _line(self) -> str:
        while b"\n" not in self.buffer:
            event = self.connection.next_event()
            if event is h11.NEED_DATA:
                self.connection.receive_data(await self.sock.receive_some(65536))
            elif isinstance(event, h11.Data):
                self.buffer += bytes(event.data)
            else:
                raise AssertionError(f"the stream ended: {event!r}")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    async def next(self) -> dict[str, Any]:
        frame: dict[str, Any] = {}
        while True:
            line = await self._line()
            if line == "":
                if frame:
                    return frame
                continue
            if line.startswith(":"):
                frame.setdefault("comments", []).append(line)
                continue
            field, _, value = line.partition(": ")
            frame[field] = json.loads(value) if field == "data" else value

    async def events_until(self, seq: int) -> list[dict[str, Any]]:
        """Frames (events) up to and including ``seq``."""
        frames: list[dict[str, Any]] = []
        while not frames or int(frames[-1]["id"]) < seq:
            frame = await self.next()
            assert "id" in frame, frame
            frames.append(frame)
        return frames


def stream(
    server: LiveServer, conversation_id: str, **params: Any
) -> AbstractAsyncContextManager[Frames]:
    """The conversation's event stream (see :func:`sse`)."""
    return sse(server, f"/api/conversations/{conversation_id}/events/stream", **params)


@asynccontextmanager
async def sse(server: LiveServer, path: str, **params: Any) -> AsyncIterator[Frames]:
    """GET ``path`` (with ``params`` as its query, ``headers=`` as extra headers) and read
    its Server-Sent Events once the 200 text/event-stream response has begun."""
    headers = [("Host", "127.0.0.1"), *params.pop("headers", {}).items()]
    query = urlencode(params)
    target = path + (f"?{query}" if query else "")
    port = int(str(server.client.base_url).rsplit(":", 1)[1].rstrip("/"))
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        connection = h11.Connection(h11.CLIENT)
        await sock.send_all(
            connection.send(h11.Request(method="GET", target=target, headers=headers))
        )
        await sock.send_all(connection.send(h11.EndOfMessage()))
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await sock.receive_some(65536))
                continue
            break
        assert isinstance(event, h11.Response) and event.status_code == 200, event
        content_type = dict(event.headers)[b"content-type"]
        assert content_type.startswith(b"text/event-stream")
        yield Frames(sock, connection)


async def count(server: LiveServer, conversation_id: str) -> int:
    response = await server.client.get(f"/api/conversations/{conversation_id}/events/count")
    value: int = response.json()["count"]
    return value


async def start_gated(server: LiveServer, *steps: str) -> str:
    created = await server.client.post(
        "/api/conversations", json={"agent": {"kind": "gated", "steps": list(steps)}, "run": True}
    )
    conversation_id: str = created.json()["id"]
    return conversation_id


async def test_stream_resumes_with_exactly_the_remaining_events(
    settings: Settings, gates: Gates
) -> None:
    """Read part of a run's events, disconnect, let the run go on, reconnect with
    Last-Event-ID: exactly the events after it arrive, then live ones — no gap, no
    duplicate — and the seqs are the store's."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "a", "b", "c")
            await gates["a"].wait_entered()
            held = await count(server, conversation_id)
            async with stream(server, conversation_id) as frames:
                first = await frames.events_until(held)
            assert [int(f["id"]) for f in first] == list(range(1, held + 1))
            gates["a"].release()
            await gates["b"].wait_entered()
            async with stream(server, conversation_id, headers={"Last-Event-ID": "2"}) as frames:
                resumed = await frames.events_until(await count(server, conversation_id))
                gates["b"].release()
                await gates["c"].wait_entered()
                live = await frames.events_until(await count(server, conversation_id))
            seqs = [int(f["id"]) for f in resumed + live]
            assert seqs == list(range(3, seqs[-1] + 1))
            assert all(f["data"]["seq"] == int(f["id"]) for f in resumed + live)
            texts = [f["data"]["payload"].get("text") for f in resumed + live]
            assert "gate b" in texts and "gate c" in texts
            gates["c"].release()


async def test_stream_kinds_filter_and_after_seq(settings: Settings, gates: Gates) -> None:
    """``kinds=message`` sends only messages; ``after_seq`` starts after that seq."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "k")
            await gates["k"].wait_entered()
            gates["k"].release()
            done = await server.client.get(f"/api/conversations/{conversation_id}")
            run_id = done.json()["run"]["id"]
            await server.client.get(f"/api/conversations/{conversation_id}/runs/{run_id}/wait")
            total = await count(server, conversation_id)
            async with stream(server, conversation_id, kinds="message", after_seq=1) as frames:
                (message,) = await frames.events_until(3)  # the gate message is seq 3
            assert message["data"]["payload"] == {"kind": "message", "text": "gate k"}
            bad = await server.client.get(
                f"/api/conversations/{conversation_id}/events/stream", params={"kinds": "nope"}
            )
            assert bad.status_code == 422
            assert total > 3


async def test_stream_ends_when_the_conversation_is_deleted(
    settings: Settings, gates: Gates
) -> None:
    """Deleting the conversation ends its open streams with reason ``deleted``."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "d")
            await gates["d"].wait_entered()
            async with stream(server, conversation_id) as frames:
                await frames.events_until(await count(server, conversation_id))
                await server.client.delete(f"/api/conversations/{conversation_id}")
                frame = await frames.next()
                while "id" in frame:  # the run's final status, stopped by the delete
                    frame = await frames.next()
            assert frame["event"] == "end" and frame["data"]["reason"] == "deleted"


async def test_stream_ends_with_the_final_status_when_the_server_drains(
    settings: Settings, gates: Gates
) -> None:
    """A drain delivers each run's final status event, then ends the stream (shutdown)."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "s")
            await gates["s"].wait_entered()
            async with stream(server, conversation_id) as frames:
                await frames.events_until(await count(server, conversation_id))
                await server.supervisor.drain("shutdown")
                status = await frames.next()
                end = await frames.next()
            assert status["data"]["payload"]["status"] == "paused"
            assert status["data"]["payload"]["reason"] == "shutdown"
            assert end["event"] == "end" and end["data"]["reason"] == "shutdown"


async def test_a_disconnected_client_leaves_no_subscription_behind(
    settings: Settings, gates: Gates
) -> None:
    """When the client goes away, the stream's subscription is closed."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "x")
            await gates["x"].wait_entered()
            async with stream(server, conversation_id) as frames:
                await frames.next()
                assert len(server.supervisor.feed) == 1
            while len(server.supervisor.feed):
                await trio.testing.wait_all_tasks_blocked(0.01)
                await trio.sleep(0.01)
            gates["x"].release()


async def test_heartbeat_keeps_an_idle_stream_alive(settings: Settings, gates: Gates) -> None:
    """With nothing new to send, the stream sends a heartbeat comment."""
    settings = settings.model_copy(update={"stream_heartbeat_seconds": 0.05})
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "h")
            await gates["h"].wait_entered()
            async with stream(server, conversation_id) as frames:
                await frames.events_until(await count(server, conversation_id))
                frame = await frames.next()
            assert frame == {"comments": [": heartbeat"]}
            gates["h"].release()


async def test_a_subscriber_that_falls_behind_is_dropped_not_waited_for(
    settings: Settings, gates: Gates
) -> None:
    """Past ``stream_buffer_events`` unread events the subscription ends with
    ``slow_consumer``; publishing never waited, so the run went on at its pace."""
    settings = settings.model_copy(update={"stream_buffer_events": 3})
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            sup = server.supervisor
            conversation_id = await start_gated(server, "slow")
            await gates["slow"].wait_entered()
            with sup.feed.subscribe(conversation_id) as subscription:
                for i in range(10):  # ten commits nobody reads
                    await sup.io(
                        sup.store.append_event,
                        conversation_id,
                        None,
                        Source.USER,
                        MessagePayload(text=f"m{i}"),
                    )
                await sup.feed.flush()
                received = [await subscription.receive() for _ in range(4)]
            assert [type(item) for item in received[:3]] == [type(received[0])] * 3
            assert received[3] == StreamEnd("slow_consumer")
            gates["slow"].release()


async def test_stream_refuses_bad_resume_points_and_unknown_conversations(
    settings: Settings, gates: Gates
) -> None:
    """A resume point that is no seq is a 422; an unknown conversation a 404."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation_id = await start_gated(server, "r")
            path = f"/api/conversations/{conversation_id}/events/stream"
            for params, headers in [
                ({"after_seq": 2**63}, {}),
                ({}, {"Last-Event-ID": "abc"}),
                ({}, {"Last-Event-ID": str(2**63)}),
            ]:
                answer = await server.client.get(path, params=params, headers=headers)
                assert answer.status_code == 422, (params, headers, answer.text)
            missing = await server.client.get("/api/conversations/nope/events/stream")
            assert missing.status_code == 404
            gates["r"].release()


async def test_fifty_subscribers_each_receive_every_event_in_order(settings: Settings) -> None:
    """50 streams on one busy conversation (a script run saying 30 things) each get every
    event, in seq order, once."""
    steps = [{"say": f"line {i}"} for i in range(30)]
    with trio.fail_after(30):
        async with live_server(settings) as server:
            created = await server.client.post(
                "/api/conversations", json={"agent": {"kind": "script", "steps": steps}}
            )
            conversation_id = created.json()["id"]
            received: list[list[int]] = []
            ready = trio.Semaphore(0)
            expected = 30 + 3  # the lines, then queued, running and finished

            async def subscriber() -> None:
                async with stream(server, conversation_id) as frames:
                    ready.release()
                    seqs = [int(f["id"]) for f in await frames.events_until(expected)]
                received.append(seqs)

            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(subscriber)
                for _ in range(50):
                    await ready.acquire()
                await server.client.post(f"/api/conversations/{conversation_id}/runs", json={})
            assert len(received) == 50
            assert all(seqs == list(range(1, expected + 1)) for seqs in received)


async def test_follower_drops_a_delta_the_replay_already_overtook(
    supervisor: RunSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta that the feed delivers before an event the replay already sent is stale (it
    may belong to a message the client has in full) and is dropped; once the feed has
    caught up, deltas pass, whatever their ``after_seq``; none moves the position."""
    monkeypatch.setattr(follow, "REPLAY_PAGE", 1)  # one store read per event: room to act
    sup = supervisor
    conversation = await new_conversation(sup, gated("f"))

    async def append(text: str) -> int:
        payload = MessagePayload(text=text)
        event = await sup.io(sup.store.append_event, conversation.id, None, Source.USER, payload)
        return event.seq

    def delta(text: str, after_seq: int) -> None:
        sup.feed.publish_delta(Delta(conversation.id, "run", text, after_seq))

    first = await append("one")
    second = await append("two")
    items = follow.follow_conversation(sup, conversation.id, first - 1, None)
    async with aclosing(items) as follower:
        assert [e.seq for e in await anext(follower)] == [first]  # subscribed; replaying
        delta("stale", after_seq=second)  # produced before the next event...
        third = await append("three")  # ...which the replay is about to read
        await sup.feed.flush()
        replayed = [await anext(follower), await anext(follower)]
        assert [event.seq for batch in replayed for event in batch] == [second, third]
        delta("in order", after_seq=second)  # the feed caught up: publishing order holds
        delta("fresh", after_seq=third)
        await sup.feed.flush()
        sup.feed.end_conversation(conversation.id, "deleted")
        rest = [item async for batch in follower for item in batch]
    assert [item.text for item in rest if isinstance(item, Delta)] == ["in order", "fresh"]
    assert rest[-1] == follow.End("deleted", third)
