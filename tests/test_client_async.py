"""The async client (``app.client.AsyncTrellisClient``) under Trio and under asyncio.

Each scenario below is one loop-agnostic coroutine (the client is all it awaits), run twice:
by pytest-trio against a server in the test's own loop, and by ``asyncio.run`` in a plain
test against the same server running in a thread with its own ``trio.run``. Runs are held
by the script agent's ``sleep`` step (interruptible), so no scenario needs Trio's gates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from app.client import AsyncTrellisClient, Delta, NotFound, QueueFull, UnprocessableEntity
from app.events import Event, MessagePayload, StatusPayload
from app.settings import Settings
from app.testing import Gates
from tests.client_server import script, server_in_thread, serving

pytestmark = pytest.mark.timeout(30)

HOLD = script({"sleep": 30})  # a run that holds its slot until interrupted
Scenario = Callable[[str], Awaitable[None]]


def settings_for(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        max_concurrent_runs=1,
        max_queued_runs=1,
        queue_full_retry_after_seconds=1,
    )


async def lifecycle(base_url: str) -> None:
    """Create and run, wait, read back, page, search, count, delete."""
    async with AsyncTrellisClient(base_url) as client:
        created = await client.create_conversation(
            script({"say": "one"}, {"finish": "two"}), initial_message="go", run=True
        )
        assert created.run is not None
        ended = await client.wait_run(created.id, created.run.id, timeout=10)
        assert ended.status == "finished"
        assert (await client.get_conversation(created.id)).status == "finished"
        assert (await client.list_runs(created.id)).items == [ended]
        listed = [item.id async for item in client.iter_conversations()]
        assert listed == [created.id]
        found = await client.search_events(created.id, kind="message", q="two")
        assert [e.payload for e in found.items] == [MessagePayload(text="two")]
        assert await client.count_events(created.id, kind="status") >= 3
        with pytest.raises(UnprocessableEntity):
            await client.search_events(created.id, order="sideways")
        await client.delete_conversation(created.id)
        with pytest.raises(NotFound):
            await client.get_run(created.id, ended.id)


async def retry_on_429(base_url: str) -> None:
    """A create refused with 429 (the line is full) is retried after Retry-After with the
    same Idempotency-Key, once the held runs have been interrupted meanwhile."""
    async with AsyncTrellisClient(base_url) as setup:
        held = [await setup.create_conversation(HOLD, run=True) for _ in range(2)]
        with pytest.raises(QueueFull) as refused:
            await setup.create_conversation(script({"say": "x"}), run=True)
        assert refused.value.retry_after == 1.0

        async def free_the_line(response: httpx.Response) -> None:
            if response.status_code == 429:
                for conversation in held:
                    await setup.interrupt(conversation.id)

        transport = RecordingTransport(free_the_line)
        async with AsyncTrellisClient(base_url, retries_on_429=2, transport=transport) as client:
            created = await client.create_conversation(script({"say": "x"}), run=True)
        (_, key, first), (_, again, second) = transport.seen
        assert (first, second) == (429, 201) and key is not None and key == again
        ids = [item.id async for item in setup.iter_conversations()]
        assert sorted(ids) == sorted([*(c.id for c in held), created.id])


async def follow(base_url: str) -> None:
    """A stream replays the stored events, then follows live ones in seq order; deleting the
    conversation ends the iteration by itself."""
    async with AsyncTrellisClient(base_url) as client:
        created = await client.create_conversation(
            script({"say": "one"}, {"say": "two"}), initial_message="go", run=True
        )
        seen: list[Event | Delta] = []
        async for item in client.stream(created.id):
            seen.append(item)
            assert isinstance(item, Event)
            if isinstance(item.payload, StatusPayload) and item.payload.status == "finished":
                await client.delete_conversation(created.id)  # the stream then ends
        seqs = [item.seq for item in seen if isinstance(item, Event)]
        assert seqs == list(range(1, len(seqs) + 1))
        texts = [i.payload.text for i in seen if isinstance(i, Event) and i.kind == "message"]
        assert texts == ["go", "one", "two"]


async def filters(base_url: str) -> None:
    """``kinds`` keeps only those kinds; ``after_seq`` starts after that event; leaving a
    live stream early closes it (no generator left behind: warnings are errors)."""
    async with AsyncTrellisClient(base_url) as client:
        created = await client.create_conversation(script({"say": "a"}), initial_message="q")
        run = await client.start_run(created.id)
        await client.wait_run(created.id, run.id)
        events = (await client.search_events(created.id)).items
        messages = [e for e in events if e.kind == "message"]
        assert len(messages) == 2 and len(events) > 2
        assert await first(client, created.id, 2, kinds=["message"]) == messages
        assert await first(client, created.id, 1, after_seq=events[-2].seq) == events[-1:]


SCENARIOS = [
    pytest.param(lifecycle, id="lifecycle"),
    pytest.param(retry_on_429, id="retry-429"),
    pytest.param(follow, id="stream"),
    pytest.param(filters, id="stream-filters"),
]


class RecordingTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, noting each request's method, Idempotency-Key and answer
    status; ``on_answer`` is awaited before the client sees an answer."""

    def __init__(self, on_answer: Callable[[httpx.Response], Awaitable[None]]) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None, int]] = []
        self.on_answer = on_answer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        key = request.headers.get("Idempotency-Key")
        self.seen.append((request.method, key, response.status_code))
        await self.on_answer(response)
        return response


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_async_client_under_trio(scenario: Scenario, tmp_path: Path, gates: Gates) -> None:
    """The scenario passes with the client in the server's own Trio loop."""
    async with serving(settings_for(tmp_path), gates) as (_, base_url):
        with trio.fail_after(20):
            await scenario(base_url)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_async_client_under_asyncio(scenario: Scenario, tmp_path: Path, gates: Gates) -> None:
    """The scenario passes with the client in ``asyncio.run``, the server in a thread."""
    with server_in_thread(settings_for(tmp_path), gates) as base_url:
        asyncio.run(asyncio.wait_for(scenario(base_url), 20))


async def first(
    client: AsyncTrellisClient, conversation_id: str, count: int, **options: Any
) -> list[Event | Delta]:
    """The first ``count`` items of a stream; its connection is closed on the way out."""
    items: list[Event | Delta] = []
    async with aclosing(client.stream(conversation_id, **options)) as stream:
        async for item in stream:
            items.append(item)
            if len(items) == count:
                break
    return items
