"""A stalled stream reader over real HTTP: dropped, never waited for, resumable.

A client opens the SSE stream and then reads nothing while a run commits far more than the
loopback socket buffers and the subscriber's buffer can hold. The run must finish at its
own pace all the same; the stalled client, when it finally reads, finds what was buffered
and then ``end`` / ``slow_consumer`` with the seq to resume from, and a reconnect with
``Last-Event-ID`` gets exactly the rest.
"""

from __future__ import annotations

import socket
from typing import Any, Literal

import h11
import pytest
import trio
from pydantic import BaseModel

from app.agents.base import StepContext, StepResult, finish
from app.agents.registry import default_registry
from app.events import MessagePayload
from app.settings import Settings
from tests.live import LiveServer, live_server
from tests.test_streams import Frames, count, stream

pytestmark = pytest.mark.timeout(60)

MESSAGES = 160
MESSAGE_BYTES = 256 * 1024  # 40 MiB in all: far past loopback's socket buffers


class ChattySpec(BaseModel):
    kind: Literal["chatty"]


class ChattyAgent:
    """Commits MESSAGES large messages in one step, as fast as the store takes them."""

    def __init__(self, spec: ChattySpec) -> None:
        del spec

    def step(self, ctx: StepContext) -> StepResult:
        for i in range(MESSAGES):
            ctx.emit(MessagePayload(text=f"{i:04d}" + "x" * MESSAGE_BYTES))
        return finish()


async def open_stalled_stream(server: LiveServer, conversation_id: str) -> Frames:
    """Send the stream request on a socket with a small receive buffer, read only the
    response head, and return the reader (the caller reads nothing more for now)."""
    port = int(str(server.client.base_url).rsplit(":", 1)[1].rstrip("/"))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock = trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    await sock.socket.connect(("127.0.0.1", port))
    connection = h11.Connection(h11.CLIENT)
    target = f"/api/conversations/{conversation_id}/events/stream"
    request = h11.Request(method="GET", target=target, headers=[("Host", "127.0.0.1")])
    await sock.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await sock.receive_some(65536))
    assert isinstance(event, h11.Response) and event.status_code == 200, event
    return Frames(sock, connection)


async def test_a_stalled_reader_is_dropped_while_the_run_keeps_its_pace(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"stream_buffer_events": 8})
    registry = default_registry()
    registry.register("chatty", ChattySpec, ChattyAgent)
    with trio.fail_after(50):
        async with live_server(settings, registry) as server:
            sup = server.supervisor
            created = await server.client.post(
                "/api/conversations", json={"agent": {"kind": "chatty"}}
            )
            conversation_id = created.json()["id"]
            stalled = await open_stalled_stream(server, conversation_id)
            async with stalled.sock:
                run = await sup.start_run(conversation_id)
                ended = await sup.wait_run(conversation_id, run.id, timeout_seconds=40)
                assert ended is not None and ended.status.value == "finished"
                assert len(sup.feed) == 0  # dropped, not waited for
                received: list[dict[str, Any]] = []
                while (frame := await stalled.next()).get("event") != "end":
                    received.append(frame)
            last = frame["data"]["last_seq"]
            assert frame["data"]["reason"] == "slow_consumer"
            seqs = [int(f["id"]) for f in received]
            assert seqs == list(range(1, last + 1))  # in order, none missing before the end
            total = await count(server, conversation_id)
            assert last < total
            async with stream(
                server, conversation_id, headers={"Last-Event-ID": str(last)}
            ) as rest:
                resumed = await rest.events_until(total)
            assert [int(f["id"]) for f in resumed] == list(range(last + 1, total + 1))
            assert resumed[-1]["data"]["payload"]["status"] == "finished"
