"""Token deltas on the wire: an ``llm`` run's text reaches an SSE client before the stored
message, without moving the stream's position, and a resumed stream is still exact.

A real server, the fake provider streaming over real HTTP, and the raw SSE client of
``tests/test_streams.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio

from app.settings import LLMSettings, Settings
from app.testing_llm import FakeChatServer, StreamHold, text_reply
from tests.live import LiveServer, live_server
from tests.test_streams import Frames, count, stream

pytestmark = pytest.mark.timeout(30)

ANSWER = "Deltas arrive first, then the stored message."


async def create_llm_conversation(server: LiveServer, *, stream_spec: bool = True) -> str:
    agent = {"kind": "llm", "model": "m", "stream": stream_spec}
    body = {"agent": agent, "initial_message": "hello"}
    created = await server.client.post("/api/conversations", json=body)
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["id"]
    return conversation_id


async def frames_until_agent_message(frames: Frames) -> list[dict[str, Any]]:
    """Frames up to and including the agent's stored message."""
    received: list[dict[str, Any]] = []
    while True:
        frame = await frames.next()
        received.append(frame)
        data = frame.get("data", {})
        if data.get("kind") == "message" and data.get("source") == "agent":
            return received


async def test_deltas_reach_an_sse_client_before_the_stored_message(tmp_path: Path) -> None:
    """While the provider holds its stream after two chunks, the client already has those
    words as ``delta`` frames (no ``id``) and no agent message; after the release, more
    deltas, then the ``llm_call`` and ``message`` events with consecutive ids. The deltas
    joined are the stored text. A client resuming after the message's seq gets no deltas
    of the finished answer: they are not stored."""
    hold = StreamHold(after_chunks=3)  # the role chunk and two pieces of text
    with FakeChatServer() as provider:
        provider.add(dataclasses.replace(text_reply(ANSWER), hold=hold))
        settings = Settings(data_dir=tmp_path / "data", llm=LLMSettings(base_url=provider.url))
        with trio.fail_after(20):
            async with live_server(settings) as server:
                conversation_id = await create_llm_conversation(server)
                async with stream(server, conversation_id) as frames:
                    await frames.events_until(await count(server, conversation_id))
                    started = await server.client.post(f"/api/conversations/{conversation_id}/runs")
                    assert started.status_code in (201, 202), started.text
                    early: list[dict[str, Any]] = []
                    while len([f for f in early if f.get("event") == "delta"]) < 1:
                        early.append(await frames.next())
                    await hold.wait_reached()
                    assert not any(f.get("data", {}).get("source") == "agent" for f in early)
                    hold.release()
                    received = early + await frames_until_agent_message(frames)
                message_seq = int(received[-1]["id"])
                async with stream(server, conversation_id, after_seq=message_seq - 1) as resumed:
                    again = await resumed.next()
    deltas = [f for f in received if f.get("event") == "delta"]
    assert all("id" not in f for f in deltas)
    assert "".join(f["data"]["text"] for f in deltas) == ANSWER
    first_delta = received.index(deltas[0])
    kinds = [f.get("event") or f["data"]["kind"] for f in received[first_delta:]]
    assert kinds == ["delta"] * len(deltas) + ["llm_call", "message"]
    ids = [int(f["id"]) for f in received if "id" in f]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # deltas took no seq
    assert again["data"]["payload"]["text"] == ANSWER


async def test_stream_false_sends_no_deltas(tmp_path: Path) -> None:
    """An agent spec with ``"stream": false`` asks for a plain completion: the stream shows
    the stored message only."""
    with FakeChatServer() as provider:
        provider.add(text_reply(ANSWER))
        settings = Settings(data_dir=tmp_path / "data", llm=LLMSettings(base_url=provider.url))
        with trio.fail_after(20):
            async with live_server(settings) as server:
                conversation_id = await create_llm_conversation(server, stream_spec=False)
                async with stream(server, conversation_id) as frames:
                    started = await server.client.post(f"/api/conversations/{conversation_id}/runs")
                    assert started.status_code in (201, 202), started.text
                    received = await frames_until_agent_message(frames)
    assert not [f for f in received if f.get("event") == "delta"]
    assert received[-1]["data"]["payload"]["text"] == ANSWER
    assert "stream" not in provider.requests[0].body
