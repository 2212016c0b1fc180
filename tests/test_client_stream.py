"""``stream()`` of both clients: resumption after real dropped connections, the end of a
stream, backoff that gives up, and token deltas.

The client talks to the server through :class:`~tests.client_server.CuttableProxy`, a
loopback TCP proxy that the test cuts at chosen moments: between two frames, and in the
middle of one. Runs advance only when the test opens their gates, so what the server sends
while the client is disconnected is decided, not hoped for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from app.client import Delta, NotFound, TrellisClient, TrellisConnectionError
from app.client._sse import RECONNECT_MAX_SECONDS, Follow
from app.events import Event, MessagePayload, StatusPayload
from app.settings import LLMSettings, Settings
from app.testing import Gates
from app.testing_llm import FakeChatServer, text_reply
from tests.client_server import CuttableProxy, async_client, gated, serving
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)


def settings_for(tmp_path: Path, **more: Any) -> Settings:
    # No heartbeat during a test: the proxy's mid-chunk cut must meet an event's frame.
    return Settings(data_dir=tmp_path / "data", stream_heartbeat_seconds=3600, **more)


@asynccontextmanager
async def proxied(tmp_path: Path, gates: Gates) -> AsyncIterator[tuple[LiveServer, CuttableProxy]]:
    """A live server with the gated kind, behind a proxy the test can cut."""
    async with serving(settings_for(tmp_path), gates) as (server, base_url):
        proxy = CuttableProxy(int(base_url.rsplit(":", 1)[1]))
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            yield server, proxy
            nursery.cancel_scope.cancel()


async def create(server: LiveServer, agent: dict[str, Any]) -> str:
    """A conversation with a run, created directly (not through the proxy: the proxy's
    connections are then the stream's own)."""
    created = await server.client.post("/api/conversations", json={"agent": agent, "run": True})
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["id"]
    return conversation_id


def text_of(event: Event) -> str | None:
    return event.payload.text if isinstance(event.payload, MessagePayload) else None


@dataclasses.dataclass
class Cuts:
    """What the test does as the client yields events of a run with gates a, b, c.

    After ``gate a``: cut the connection, open gate a and wait until step b has said
    ``gate b`` — committed while the client is away. After ``gate b``: arm a cut of the
    next frame the server sends just before its closing blank line, open gate b (the
    client then holds every line of the ``gate c`` frame, never completed). After
    ``gate c``: open it; when the run has finished, note the stored events and delete the
    conversation (which ends the stream).
    """

    server: LiveServer
    proxy: CuttableProxy
    gates: Gates
    conversation_id: str
    stored: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resumed_after: dict[str, int] = dataclasses.field(default_factory=dict)

    async def on_event(self, event: Event) -> None:
        text = text_of(event)
        if text == "gate a":
            self.resumed_after["a"] = event.seq
            self.proxy.cut()
            self.gates["a"].release()
            await self.gates["b"].wait_entered()
        elif text == "gate b":
            self.resumed_after["b"] = event.seq
            self.proxy.cut_mid_frame()
            self.gates["b"].release()
            await self.gates["c"].wait_entered()
        elif text == "gate c":
            self.gates["c"].release()
        elif isinstance(event.payload, StatusPayload) and event.payload.status == "finished":
            path = f"/api/conversations/{self.conversation_id}"
            self.stored = (await self.server.client.get(f"{path}/events")).json()["items"]
            assert (await self.server.client.delete(path)).status_code == 204

    def check(self, yielded: list[Event | Delta]) -> None:
        """Every stored event exactly once, in order; three connections, each resuming
        after the last event the client had."""
        assert [e.id for e in yielded if isinstance(e, Event)] == [e["id"] for e in self.stored]
        assert [e.seq for e in yielded if isinstance(e, Event)] == list(range(1, len(yielded) + 1))
        assert self.proxy.connections == 3
        heads = [request.decode("latin-1").lower() for request in self.proxy.requests]
        assert "last-event-id: 0\r\n" in heads[0]
        assert f"last-event-id: {self.resumed_after['a']}\r\n" in heads[1]
        assert f"last-event-id: {self.resumed_after['b']}\r\n" in heads[2]
        forwarded = self.proxy.cut_forwarded  # every line of the frame, not its blank line
        assert b'"gate c"' in forwarded and forwarded.endswith(b"}\n")


async def test_async_stream_resumes_after_cuts_without_gap_or_duplicate(
    tmp_path: Path, gates: Gates
) -> None:
    """Cut between frames and in the middle of one: the async stream reconnects with
    Last-Event-ID and yields every event once, in order, until the deletion ends it."""
    async with proxied(tmp_path, gates) as (server, proxy), async_client(proxy.base_url) as client:
        cuts = Cuts(server, proxy, gates, await create(server, gated("a", "b", "c")))
        yielded: list[Event | Delta] = []
        with trio.fail_after(20):
            async with aclosing(client.stream(cuts.conversation_id)) as events:
                async for event in events:
                    yielded.append(event)
                    assert isinstance(event, Event)
                    await cuts.on_event(event)
        cuts.check(yielded)


async def test_sync_stream_resumes_after_cuts_without_gap_or_duplicate(
    tmp_path: Path, gates: Gates
) -> None:
    """The same cuts, with the sync client iterating in a worker thread."""
    async with proxied(tmp_path, gates) as (server, proxy):
        cuts = Cuts(server, proxy, gates, await create(server, gated("a", "b", "c")))

        def follow() -> list[Event | Delta]:
            yielded: list[Event | Delta] = []
            with TrellisClient(proxy.base_url) as client:
                for event in client.stream(cuts.conversation_id):
                    yielded.append(event)
                    assert isinstance(event, Event)
                    trio.from_thread.run(cuts.on_event, event)
            return yielded

        with trio.fail_after(20):
            yielded = await trio.to_thread.run_sync(follow)
        cuts.check(yielded)


async def test_stream_gives_up_after_reconnect_attempts(tmp_path: Path, gates: Gates) -> None:
    """When the server stays unreachable, the stream retries ``reconnect_attempts`` times
    with backoff, then raises TrellisConnectionError naming the last seq."""
    async with proxied(tmp_path, gates) as (server, proxy), async_client(proxy.base_url) as client:
        conversation_id = await create(server, gated("a"))
        await gates["a"].wait_entered()
        seen: list[int] = []

        async def follow() -> None:
            async with aclosing(client.stream(conversation_id, reconnect_attempts=2)) as events:
                async for event in events:
                    assert isinstance(event, Event)
                    seen.append(event.seq)
                    if text_of(event) == "gate a":
                        await proxy.stop_listening()
                        proxy.cut()

        with trio.fail_after(10), pytest.raises(TrellisConnectionError) as caught:
            await follow()
        last = seen[-1]
        assert f"the last seq received was {last}" in str(caught.value)
        assert "2 reconnections in a row" in str(caught.value)
        assert proxy.connections == 1


async def test_stream_of_unknown_conversation_raises_at_once(tmp_path: Path, gates: Gates) -> None:
    """A 404 when connecting is raised, not retried; so is an unreachable server."""
    async with proxied(tmp_path, gates) as (_, proxy), async_client(proxy.base_url) as client:

        async def follow() -> None:
            async with aclosing(client.stream("no-such-conversation")) as events:
                async for _ in events:
                    pass

        with pytest.raises(NotFound):
            await follow()
        assert proxy.connections == 1
        await proxy.stop_listening()
        proxy.cut()  # the pooled keep-alive connection too
        with pytest.raises(TrellisConnectionError):
            await follow()


ANSWER = "Deltas first, then the stored message."


@pytest.mark.parametrize("deltas", [True, False])
async def test_stream_yields_deltas_when_asked(tmp_path: Path, deltas: bool) -> None:
    """With ``deltas=True`` the text of an llm answer arrives as Delta items before the
    stored message and joins into it; without, only events arrive."""
    with FakeChatServer() as provider:
        provider.add(text_reply(ANSWER))
        settings = settings_for(tmp_path, llm=LLMSettings(base_url=provider.url))
        async with live_server(settings) as server:  # the default registry: llm as configured
            base_url = str(server.client.base_url).rstrip("/")
            async with async_client(base_url) as client:
                agent = {"kind": "llm", "model": "m", "stream": True}
                created = await client.create_conversation(agent, initial_message="hello")
                items: list[Event | Delta] = []
                with trio.fail_after(20):
                    async with aclosing(client.stream(created.id, deltas=deltas)) as stream:
                        async for item in stream:
                            items.append(item)
                            if isinstance(item, Event) and item.kind == "message":
                                if item.source == "user":  # following live: start the run
                                    await client.start_run(created.id)
                                else:
                                    break
    pieces = [item for item in items if isinstance(item, Delta)]
    assert isinstance(items[-1], Event) and text_of(items[-1]) == ANSWER
    if deltas:
        assert "".join(piece.text for piece in pieces) == ANSWER
        assert all(0 < piece.after_seq < items[-1].seq for piece in pieces)
    else:
        assert pieces == []


# -- the resume logic on its own (sans-IO: lines in, items out) ---------------------------


def frame_lines(seq: int, text: str, conversation_id: str = "c") -> list[str]:
    data = {"id": f"e{seq}", "conversation_id": conversation_id, "seq": seq, "run_id": None,
            "timestamp": "2026-01-01T00:00:00Z", "source": "agent",
            "payload": {"kind": "message", "text": text}}  # fmt: skip
    return [f"id: {seq}", f"data: {json.dumps(data)}", ""]


def feed(follow: Follow, lines: list[str]) -> list[Event | Delta]:
    items = [follow.feed(line) for line in lines]
    return [item for item in items if item is not None]


def test_follow_drops_events_it_already_yielded() -> None:
    """An event at or below the resume point is not yielded again (even if a server sent
    it), and the resume point moves with each event."""
    follow = Follow("c", after_seq=1)
    assert feed(follow, frame_lines(1, "old")) == []
    yielded = feed(follow, [*frame_lines(2, "new"), *frame_lines(2, "again")])
    assert [e.seq for e in yielded if isinstance(e, Event)] == [2]
    assert follow.call().headers["Last-Event-ID"] == "2"


def test_follow_parses_sse_comments_events_deltas_and_ends() -> None:
    """Comments and unknown fields are skipped; deltas only when asked; ``deleted`` ends the
    stream, ``slow_consumer`` is resumed at once."""
    delta = 'data: {"run_id": "r", "text": "to", "after_seq": 3}'
    for wanted, expected in ((True, [Delta("r", "to", 3)]), (False, [])):
        follow = Follow("c", deltas=wanted)
        assert feed(follow, [": heartbeat", "", "retry: 5", "event: delta", delta, ""]) == expected
    follow = Follow("c")
    follow.connected()
    feed(follow, ["event: end", 'data: {"reason": "slow_consumer", "last_seq": 4}', ""])
    assert not follow.ended and follow.dropped(None) == 0.0
    feed(follow, ["event: end", 'data: {"reason": "deleted", "last_seq": 4}', ""])
    assert follow.ended


def test_follow_backoff_is_bounded_and_gives_up() -> None:
    """Drops in a row: the first reconnect is immediate, later ones wait at most 5 s; one
    more than ``reconnect_attempts`` raises; an event in between starts the count again."""
    follow = Follow("c", reconnect_attempts=6)
    follow.connected()
    delays = [follow.dropped(None) for _ in range(6)]
    assert delays[0] == 0.0 and all(0 < d <= RECONNECT_MAX_SECONDS for d in delays[1:])
    with pytest.raises(TrellisConnectionError):
        follow.dropped(None)
    follow = Follow("c", reconnect_attempts=1)
    follow.connected()
    for seq in (1, 2):
        assert follow.dropped(None) == 0.0
        feed(follow, frame_lines(seq, "x"))
