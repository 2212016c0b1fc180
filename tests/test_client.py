"""The synchronous client (``app.client.TrellisClient``) against a real server.

Each test serves the app on Hypercorn (127.0.0.1, port 0) in the test's Trio loop and runs
the blocking client in a worker thread (``trio.to_thread.run_sync``), as any script would
run it next to a server. Runs are held mid-step with ``app.testing`` gates, never by sleeps.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio

from app.client import (
    APIError,
    ClientError,
    Conflict,
    Forbidden,
    NotFound,
    QueueFull,
    TrellisClient,
    TrellisConnectionError,
    Unauthorized,
    UnprocessableEntity,
    WaitTimedOut,
)
from app.events import MessagePayload
from app.settings import Settings
from app.testing import Gates
from tests.client_server import ALICE, KEYS, ROOT, gated, script, serving
from tests.test_dashboard_browser import readme_blocks

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")


async def blocking(function: Callable[..., T], *args: Any) -> T:
    """Run the sync client's code in a worker thread, as a script next to the server."""
    return await trio.to_thread.run_sync(function, *args)


def settings_for(tmp_path: Path, **more: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", max_concurrent_runs=2, max_queued_runs=3, **more)


async def test_client_conversation_lifecycle(tmp_path: Path, gates: Gates) -> None:
    """Create with a run, wait for it, read it back, its runs and events, then delete it."""
    async with serving(settings_for(tmp_path), gates) as (_, base_url):

        def converse() -> None:
            with TrellisClient(base_url) as client:
                agent = script({"say": "one"}, {"finish": "two"})
                created = client.create_conversation(
                    agent, title="t", initial_message="count", run=True
                )
                assert created.title == "t" and created.run is not None
                ended = client.wait_run(created.id, created.run.id, timeout=10)
                assert (ended.status, ended.id) == ("finished", created.run.id)
                again = client.get_conversation(created.id)
                assert (again.status, again.agent) == ("finished", agent)
                assert client.get_run(created.id, ended.id) == ended
                assert client.list_runs(created.id).items == [ended]

                messages = client.search_events(created.id, kind="message")
                texts = [
                    e.payload.text for e in messages.items if isinstance(e.payload, MessagePayload)
                ]
                assert texts == ["count", "one", "two"]
                assert client.count_events(created.id, kind="message") == 3
                assert client.count_events(created.id, source="user") == 1
                newest = client.search_events(created.id, order="desc", limit=1)
                assert newest.next_before_seq == newest.items[0].seq
                first = messages.items[0]
                assert client.get_event(created.id, first.id) == first

                client.delete_conversation(created.id)
                with pytest.raises(NotFound) as caught:
                    client.get_conversation(created.id)
                assert (caught.value.status, caught.value.code) == (404, "not_found")
                assert str(caught.value) == f"not_found: {caught.value.message}"

        await blocking(converse)


async def test_client_lists_conversations_page_by_page(tmp_path: Path, gates: Gates) -> None:
    """``list_conversations`` gives one page and a cursor; ``iter_conversations`` follows it."""
    async with serving(settings_for(tmp_path), gates) as (_, base_url):

        def pages() -> None:
            with TrellisClient(base_url) as client:
                made = [client.create_conversation(script({"say": "x"})).id for _ in range(3)]
                page = client.list_conversations(limit=2)
                assert [item.id for item in page.items] == made[::-1][:2]
                assert page.next_cursor is not None
                assert [item.id for item in client.iter_conversations()] == made[::-1]
                assert list(client.iter_conversations(status="running")) == []

        await blocking(pages)


async def test_client_pause_interrupt_and_busy(tmp_path: Path, gates: Gates) -> None:
    """A held run: a second start is 409 conversation_busy; pause stops it at the step's
    end; a new run resumes; interrupt stops that one mid-step."""
    async with serving(settings_for(tmp_path), gates) as (_, base_url):
        client = await blocking(TrellisClient, base_url)
        with client:
            created = await blocking(lambda: client.create_conversation(gated("a", "b"), run=True))
            await gates["a"].wait_entered()
            with pytest.raises(Conflict) as busy:
                await blocking(client.start_run, created.id)
            assert busy.value.code == "conversation_busy"
            pausing = await blocking(client.pause, created.id)
            assert pausing.status == "pausing"
            gates["a"].release()
            assert created.run is not None
            paused = await blocking(client.wait_run, created.id, created.run.id)
            assert (paused.status, paused.reason) == ("paused", "pause")

            second = await blocking(client.start_run, created.id)
            await gates["b"].wait_entered()
            stopped = await blocking(client.interrupt, created.id)
            assert (stopped.id, stopped.status, stopped.reason) == (
                second.id,
                "paused",
                "interrupt",
            )


async def test_client_wait_run_times_out_with_408(tmp_path: Path, gates: Gates) -> None:
    """``wait_run`` on a run that is held past its timeout raises WaitTimedOut (408)."""
    async with serving(settings_for(tmp_path), gates) as (_, base_url):
        with await blocking(TrellisClient, base_url) as client:
            created = await blocking(lambda: client.create_conversation(gated("a"), run=True))
            await gates["a"].wait_entered()
            assert created.run is not None
            with pytest.raises(WaitTimedOut) as caught:
                await blocking(lambda: client.wait_run(created.id, created.run.id, timeout=0.2))
            assert (caught.value.status, caught.value.code) == (408, "timeout")
            gates["a"].release()
            ended = await blocking(lambda: client.wait_run(created.id, created.run.id, timeout=10))
            assert ended.status == "finished"


async def test_client_server_runs_limits_and_statistics(tmp_path: Path, gates: Gates) -> None:
    """Closing admission queues a run (``server_runs`` shows its position, ``server_info``
    counts it); reopening starts it. ``health`` and ``ready`` say the server is up."""
    async with serving(settings_for(tmp_path), gates) as (server, base_url):
        with await blocking(TrellisClient, base_url) as client:
            assert await blocking(client.health) and await blocking(client.ready)
            limits = await blocking(lambda: client.set_limits(max_concurrent_runs=0))
            assert (limits.max_concurrent_runs, limits.max_queued_runs) == (0, 3)
            created = await blocking(lambda: client.create_conversation(gated("a"), run=True))
            queued = await blocking(lambda: client.server_runs(status="queued"))
            assert [(r.conversation_id, r.queue_position) for r in queued] == [(created.id, 1)]
            info = await blocking(client.server_info)
            assert (info.statistics.queued, info.limits.max_concurrent_runs) == (1, 0)
            assert info.settings.max_concurrent_runs == 0  # the effective settings
            assert info.version and info.sandbox in ("bwrap", "none")

            limits = await blocking(lambda: client.set_limits(max_concurrent_runs=1))
            assert limits.max_concurrent_runs == 1 == server.supervisor.run_limiter.total_tokens
            await gates["a"].wait_entered()
            running = await blocking(client.server_runs)
            assert [(r.id, r.status) for r in running] == [(created.run.id, "running")]  # type: ignore[union-attr]
            gates["a"].release()


async def test_client_errors_carry_status_code_and_detail(tmp_path: Path, gates: Gates) -> None:
    """Each error status raises its class, with the server's code, message and detail."""
    async with serving(settings_for(tmp_path), gates) as (_, base_url):
        with await blocking(TrellisClient, base_url) as client:
            with pytest.raises(UnprocessableEntity) as invalid:
                await blocking(lambda: client.create_conversation({"kind": "nope"}))
            assert invalid.value.code == "validation_error"
            assert any(d["loc"][:2] == ["body", "agent"] for d in invalid.value.detail)
            with pytest.raises(UnprocessableEntity):
                await blocking(lambda: client.search_events("x", limit=0))
            with pytest.raises(NotFound):
                await blocking(client.pause, "no-such-conversation")
            created = await blocking(lambda: client.create_conversation(script({"say": "x"})))
            with pytest.raises(Conflict) as idle:
                await blocking(client.interrupt, created.id)
            assert isinstance(idle.value, APIError) and isinstance(idle.value, ClientError)
            assert idle.value.status == 409 and idle.value.retry_after is None


async def test_client_unreachable_server_raises_connection_error() -> None:
    """Nothing listening: TrellisConnectionError (a ClientError), the httpx error as cause."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused

        def call() -> None:
            with TrellisClient(f"http://127.0.0.1:{port}", timeout=5) as client:
                client.get_conversation("x")

        with pytest.raises(TrellisConnectionError) as caught:
            await blocking(call)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_client_api_keys_and_tenants(tmp_path: Path, gates: Gates) -> None:
    """With keys: none or a wrong one is 401; a tenant's key works on its conversations but
    not on server details (403); another tenant's conversation is 404; admin keys see all."""
    settings = settings_for(tmp_path, api_keys=KEYS)
    async with serving(settings, gates) as (_, base_url):

        def keyed() -> None:
            for key in (None, "wrong-key-0123456789abcdef"):
                with TrellisClient(base_url, api_key=key) as anonymous, pytest.raises(Unauthorized):
                    anonymous.list_conversations()
            with (
                TrellisClient(base_url, api_key=ALICE) as alice,
                TrellisClient(base_url, api_key=ROOT) as root,
            ):
                mine = alice.create_conversation(script({"say": "x"}))
                assert mine.tenant == "alice"
                assert [c.id for c in alice.iter_conversations()] == [mine.id]
                with pytest.raises(Forbidden) as forbidden:
                    alice.server_info()
                assert forbidden.value.code == "forbidden"
                theirs = root.create_conversation(script({"say": "y"}))
                with pytest.raises(NotFound):
                    alice.get_conversation(theirs.id)
                assert root.get_conversation(mine.id).tenant == "alice"
                assert root.server_info().limits.max_concurrent_runs == 2
                assert "alice-key" not in repr(alice)

        await blocking(keyed)


class RecordingTransport(httpx.HTTPTransport):
    """httpx's own transport, noting each request's method, Idempotency-Key and answer
    status; ``on_answer`` runs before the client sees an answer."""

    def __init__(self, on_answer: Callable[[httpx.Response], None]) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None, int]] = []
        self.on_answer = on_answer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append(
            (request.method, request.headers.get("Idempotency-Key"), response.status_code)
        )
        self.on_answer(response)
        return response


async def test_client_retries_a_429_with_one_idempotency_key(tmp_path: Path, gates: Gates) -> None:
    """With ``retries_on_429``, a create refused with 429 is sent again after Retry-After
    with the same (generated) Idempotency-Key, and creates exactly one conversation."""
    settings = settings_for(tmp_path, queue_full_retry_after_seconds=1).model_copy(
        update={"max_concurrent_runs": 1, "max_queued_runs": 1}
    )
    async with serving(settings, gates) as (server, base_url):
        with await blocking(TrellisClient, base_url) as setup:
            held = [  # one runs, one waits: the line is full
                await blocking(lambda: setup.create_conversation(gated("hold"), run=True))
                for _ in range(2)
            ]
            await gates["hold"].wait_entered()

            async def both_ended() -> None:
                for conversation in held:
                    assert conversation.run is not None
                    await server.supervisor.wait_run(conversation.id, conversation.run.id, 10)

            def free_the_line(response: httpx.Response) -> None:
                if response.status_code == 429:  # let both runs end before the retry
                    gates["hold"].release()
                    trio.from_thread.run(both_ended)

            transport = RecordingTransport(free_the_line)

            def create() -> Any:
                with TrellisClient(base_url, retries_on_429=1, transport=transport) as client:
                    return client.create_conversation(script({"say": "x"}), run=True)

            began = trio.current_time()
            created = await blocking(create)
            assert trio.current_time() - began >= 1.0  # it slept Retry-After: 1
            (_, key, refused), (_, again, answered) = transport.seen
            assert (refused, answered) == (429, 201)
            assert key is not None and key == again
            everything = await blocking(lambda: list(setup.iter_conversations()))
            assert [c.id for c in everything].count(created.id) == 1 and len(everything) == 3


async def test_client_without_retries_raises_queue_full(tmp_path: Path, gates: Gates) -> None:
    """By default a 429 is raised at once as QueueFull with ``retry_after``, and no
    Idempotency-Key is made up for a request that will not be retried."""
    settings = settings_for(tmp_path, queue_full_retry_after_seconds=7).model_copy(
        update={"max_concurrent_runs": 1, "max_queued_runs": 1}
    )
    async with serving(settings, gates) as (_, base_url):
        transport = RecordingTransport(lambda _: None)
        with await blocking(lambda: TrellisClient(base_url, transport=transport)) as client:
            for _ in range(2):  # one runs, one waits: the line is full
                await blocking(lambda: client.create_conversation(gated("hold"), run=True))
            await gates["hold"].wait_entered()
            with pytest.raises(QueueFull) as caught:
                await blocking(lambda: client.create_conversation(script({"say": "x"}), run=True))
            assert (caught.value.code, caught.value.retry_after) == ("run_queue_full", 7.0)
            assert [key for _, key, _ in transport.seen] == [None, None, None]
            listed = await blocking(client.list_conversations)
            assert len(listed.items) == 2  # the refused create stored nothing


async def test_client_readme_section_runs_as_written(tmp_path: Path, gates: Gates) -> None:
    """The README's Client examples run in order against a live server (its URL put in for
    the documented one), and print what their comments say."""
    blocks = readme_blocks("## Client", "python")
    assert len(blocks) == 4
    printed: list[str] = []
    namespace: dict[str, Any] = {"print": lambda *args: printed.append(" ".join(map(str, args)))}
    async with serving(settings_for(tmp_path), gates) as (_, base_url):

        def run_examples() -> None:
            for block in blocks:
                code = block.replace("http://127.0.0.1:8000", base_url)
                exec(compile(code, "README.md", "exec"), namespace)

        await blocking(run_examples)
    assert printed[:4] == ["finished", "1 user Count to two.", "4 agent one", "5 agent two"]
    assert printed[4] == "finished"  # the async example
    streamed = printed[5:-1]
    assert streamed[0] == "1 message" and streamed[-1] == f"{len(streamed)} status"
    assert printed[-1] == "404 not_found"
