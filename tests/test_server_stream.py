"""The server-wide stream over real HTTP: snapshot, numbered changes, resume, steps, ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from app.live.server_feed import ServerFeed
from app.settings import Settings
from app.testing import Gates, gated_registry
from tests.live import LiveServer, live_server
from tests.test_streams import Frames, sse

pytestmark = pytest.mark.timeout(30)

PATH = "/api/events/stream"


def server_stream(server: LiveServer, **params: Any) -> AbstractAsyncContextManager[Frames]:
    return sse(server, PATH, **params)


async def numbered(frames: Frames, count: int, *, skip: tuple[str, ...] = ()) -> list[Any]:
    """The next ``count`` frames with an ``id`` (ephemeral ones and types in ``skip``
    are read and left out)."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        frame = await frames.next()
        if "id" in frame and frame.get("event") not in skip:
            found.append(frame)
    return found


async def create(server: LiveServer, *steps: str, run: bool = True) -> str:
    """A gated conversation (with ``run``: started at once); its id."""
    agent = {"kind": "gated", "steps": list(steps)}
    created = await server.client.post("/api/conversations", json={"agent": agent, "run": run})
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["id"]
    return conversation_id


@asynccontextmanager
async def serving(settings: Settings, gates: Gates) -> AsyncIterator[LiveServer]:
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            yield server


def status_view(frame: dict[str, Any]) -> tuple[Any, ...]:
    data = frame["data"]
    return (data["conversation_id"], data["status"], data["position"], data["counts"])


async def test_server_stream_snapshot_shows_limits_running_and_the_queue_in_order(
    settings: Settings, gates: Gates
) -> None:
    """A first connection starts with a snapshot: the limits, the statistics, the runs
    holding the two slots, and the two waiting runs in start order with their positions."""
    async with serving(settings, gates) as server:
        first, second = await create(server, "a"), await create(server, "b")
        await gates["a"].wait_entered()
        await gates["b"].wait_entered()
        third, fourth = await create(server, "c"), await create(server, "d")
        async with server_stream(server) as frames:
            snapshot = await frames.next()
        data = snapshot["data"]
        assert snapshot["event"] == "snapshot" and int(snapshot["id"]) == data["seq"] > 0
        assert data["limits"] == {
            "max_concurrent_runs": 2,
            "max_queued_runs": 3,
            "io_threads": settings.io_threads,
            "tool_threads": settings.tool_threads,
        }
        assert (data["statistics"]["running"], data["statistics"]["queued"]) == (2, 2)
        assert data["server_started_at"]
        running = sorted((r["conversation_id"], r["steps"]) for r in data["running"])
        assert running == sorted([(first, 0), (second, 0)])
        assert all(r["started_at"] and r["run_id"] for r in data["running"])
        queued = [(q["conversation_id"], q["position"]) for q in data["queued"]]
        assert queued == [(third, 1), (fourth, 2)]
        assert all(q["queued_at"] and q["run_id"] for q in data["queued"])


async def test_server_stream_status_frames_carry_positions_and_counts(
    settings: Settings, gates: Gates
) -> None:
    """Each stored status change of any conversation is one numbered ``status`` frame, in
    order, with the queue position of a waiting run and the counts right after the change;
    the run that waited starts when a slot frees up."""
    async with serving(settings, gates) as server:
        async with server_stream(server) as frames:
            start = int((await frames.next())["id"])
            first = await create(server, "a")
            await gates["a"].wait_entered()
            second = await create(server, "b")
            await gates["b"].wait_entered()
            third = await create(server, "c")
            before = await numbered(frames, 5, skip=("conversation",))
            gates["a"].release()
            await gates["c"].wait_entered()
            after = await numbered(frames, 2, skip=("conversation",))
        assert [status_view(f) for f in before + after] == [
            (first, "queued", None, {"running": 1, "queued": 0}),
            (first, "running", None, {"running": 1, "queued": 0}),
            (second, "queued", None, {"running": 2, "queued": 0}),
            (second, "running", None, {"running": 2, "queued": 0}),
            (third, "queued", 1, {"running": 2, "queued": 1}),
            (first, "finished", None, {"running": 2, "queued": 1}),
            (third, "running", None, {"running": 2, "queued": 0}),
        ]
        finished = after[0]["data"]
        assert (finished["previous"], finished["reason"]) == ("running", "agent_finished")
        assert finished["event_seq"] > 0 and finished["run_id"] and finished["time"]
        seqs = [int(f["id"]) for f in before + after]
        assert seqs == sorted(seqs) and seqs[0] > start
        assert all(f["data"]["seq"] == int(f["id"]) for f in before + after)


async def test_server_stream_announces_limits_and_conversations(
    settings: Settings, gates: Gates
) -> None:
    """Creating a conversation, changing the limits and deleting the conversation are one
    numbered frame each, with consecutive seqs."""
    async with serving(settings, gates) as server:
        async with server_stream(server) as frames:
            start = int((await frames.next())["id"])
            conversation_id = await create(server, "x", run=False)
            patched = await server.client.patch("/api/server/limits", json={"max_queued_runs": 7})
            assert patched.status_code == 200
            deleted = await server.client.delete(f"/api/conversations/{conversation_id}")
            assert deleted.status_code == 204
            created, limits, gone = await numbered(frames, 3)
        assert [int(f["id"]) for f in (created, limits, gone)] == [start + 1, start + 2, start + 3]
        assert created["event"] == "conversation" and created["data"]["change"] == "created"
        assert gone["event"] == "conversation" and gone["data"]["change"] == "deleted"
        assert created["data"]["conversation_id"] == gone["data"]["conversation_id"]
        assert created["data"]["conversation_id"] == conversation_id
        assert limits["event"] == "limits"
        assert (limits["data"]["max_concurrent_runs"], limits["data"]["max_queued_runs"]) == (2, 7)
        assert limits["data"]["type"] == "limits" and limits["data"]["time"]


async def test_server_stream_resumes_with_exactly_the_missed_frames(
    settings: Settings, gates: Gates
) -> None:
    """A client that reconnects with Last-Event-ID (or after_seq) gets exactly the frames
    it missed — the same ones a client that stayed connected got — and no snapshot."""
    async with serving(settings, gates) as server:
        sup = server.supervisor
        async with server_stream(server) as steady:
            start = int((await steady.next())["id"])
            for limit in (4, 5, 6):
                sup.set_limits(max_queued_runs=limit)
            seen = await numbered(steady, 3)
            for limit in (7, 8):
                sup.set_limits(max_queued_runs=limit)
            await create(server, "r", run=False)
            reference = await numbered(steady, 3)
            last = seen[1]["id"]  # the client saw two frames, then lost its connection
            async with server_stream(server, headers={"Last-Event-ID": last}) as frames:
                by_header = await numbered(frames, 4)
            async with server_stream(server, after_seq=last) as frames:
                by_query = await numbered(frames, 4)
        expected = [seen[2], *reference]
        assert by_header == expected and by_query == expected
        assert [int(f["id"]) for f in expected] == list(range(start + 3, start + 7))


@pytest.mark.parametrize(
    ("retain", "resume_from"),
    [
        pytest.param(2, "old", id="older-than-the-ring"),
        pytest.param(0, "old", id="nothing-retained"),
        pytest.param(10, "future", id="from-another-process"),
        pytest.param(10, "zero", id="zero"),
    ],
)
async def test_server_stream_sends_a_snapshot_when_it_cannot_replay(
    settings: Settings, gates: Gates, retain: int, resume_from: str
) -> None:
    """A resume point whose frames are no longer all retained, or that this process never
    reached (a restart), or 0, gets a snapshot of the current state instead."""
    settings = settings.model_copy(update={"server_stream_retain_events": retain})
    async with serving(settings, gates) as server:
        for limit in range(4, 9):
            server.supervisor.set_limits(max_queued_runs=limit)
        current = server.supervisor.server_feed.seq
        last = {"old": current - 3, "future": current + 100, "zero": 0}[resume_from]
        async with server_stream(server, headers={"Last-Event-ID": str(last)}) as frames:
            first = await frames.next()
        assert first["event"] == "snapshot" and int(first["id"]) == current
        assert first["data"]["limits"]["max_queued_runs"] == 8


async def test_server_stream_refuses_bad_resume_points(settings: Settings, gates: Gates) -> None:
    """A resume point that is no seq is a 422, and leaves no subscription behind."""
    async with serving(settings, gates) as server:
        for params, headers in [
            ({"after_seq": -1}, {}),
            ({"after_seq": 2**63}, {}),
            ({"after_seq": "x"}, {}),
            ({"nope": 1}, {}),
            ({}, {"Last-Event-ID": "abc"}),
            ({}, {"Last-Event-ID": str(2**63)}),
        ]:
            answer = await server.client.get(PATH, params=params, headers=headers)
            assert answer.status_code == 422, (params, headers, answer.text)
            assert answer.json()["error"]["code"] == "validation_error"
        assert len(server.supervisor.server_feed) == 0


async def test_server_stream_sends_step_frames_without_an_id(
    settings: Settings, gates: Gates
) -> None:
    """While a client is connected, each completed step of a run is an ephemeral ``step``
    frame (no id: it does not move the client's resume point)."""
    async with serving(settings, gates) as server:
        async with server_stream(server) as frames:
            await frames.next()
            conversation_id = await create(server, "s1", "s2")
            gates["s1"].release()
            gates["s2"].release()
            steps = []
            while len(steps) < 2:
                frame = await frames.next()
                if frame.get("event") == "step":
                    steps.append(frame)
        assert all("id" not in frame for frame in steps)
        assert [f["data"]["steps"] for f in steps] == [1, 2]
        assert all(f["data"]["conversation_id"] == conversation_id for f in steps)
        assert all(f["data"]["run_id"] for f in steps)


async def test_server_stream_drops_a_slow_consumer_and_it_resumes(
    settings: Settings, gates: Gates
) -> None:
    """A client ``stream_buffer_events`` frames behind is dropped with ``slow_consumer``
    and the last seq it got; publishing never waited. Resuming from that seq gives the
    rest."""
    settings = settings.model_copy(update={"stream_buffer_events": 3})
    async with serving(settings, gates) as server:
        sup = server.supervisor
        async with server_stream(server) as frames:
            start = int((await frames.next())["id"])
            await trio.testing.wait_all_tasks_blocked()  # the stream waits for its next frame
            for limit in range(4, 14):  # ten frames in one step: nobody reads meanwhile
                sup.set_limits(max_queued_runs=limit)
            kept = await numbered(frames, 4)  # the one it was waiting for, then three buffered
            end = await frames.next()
        assert [int(f["id"]) for f in kept] == [start + 1, start + 2, start + 3, start + 4]
        assert end == {"event": "end", "data": {"reason": "slow_consumer", "last_seq": start + 4}}
        assert len(sup.server_feed) == 0
        async with server_stream(server, after_seq=start + 4) as frames:
            rest = await numbered(frames, 6)
        assert [f["data"]["max_queued_runs"] for f in rest] == [8, 9, 10, 11, 12, 13]


async def test_server_stream_ends_with_shutdown_after_the_final_statuses(
    settings: Settings, gates: Gates
) -> None:
    """A drain delivers every run's final status, then ends the stream with ``shutdown``."""
    async with serving(settings, gates) as server:
        conversation_id = await create(server, "w")
        await gates["w"].wait_entered()
        async with server_stream(server) as frames:
            snapshot = await frames.next()
            await server.supervisor.drain("shutdown")
            status = await frames.next()
            end = await frames.next()
        assert status["event"] == "status"
        assert (status["data"]["conversation_id"], status["data"]["status"]) == (
            conversation_id,
            "paused",
        )
        assert status["data"]["reason"] == "shutdown"
        assert end == {
            "event": "end",
            "data": {"reason": "shutdown", "last_seq": int(status["id"])},
        }
        assert int(status["id"]) == int(snapshot["id"]) + 1


async def test_server_stream_a_disconnected_client_leaves_no_subscription(
    settings: Settings, gates: Gates
) -> None:
    """When the client goes away, its subscription is closed (idle, or between frames)."""
    settings = settings.model_copy(update={"stream_heartbeat_seconds": 0.05})
    async with serving(settings, gates) as server:
        feed = server.supervisor.server_feed
        async with server_stream(server) as frames:
            await frames.next()
            assert len(feed) == 1
            assert await frames.next() == {"comments": [": heartbeat"]}
        while len(feed):
            await trio.testing.wait_all_tasks_blocked(0.01)
            await trio.sleep(0.01)


class _NoRuns:
    def queue_position(self, run_id: str) -> int | None:
        raise AssertionError("no status events here")

    def statistics(self) -> Any:
        raise AssertionError("no limits frames here")


@pytest.mark.parametrize(
    ("retain", "made", "after", "expected"),
    [
        pytest.param(3, 5, 0, None, id="first-connection"),
        pytest.param(3, 5, 5, [], id="up-to-date"),
        pytest.param(3, 5, 2, [3, 4, 5], id="whole-ring"),
        pytest.param(3, 5, 1, None, id="one-too-old"),
        pytest.param(3, 5, 6, None, id="future"),
        pytest.param(0, 5, 5, [], id="no-ring-up-to-date"),
        pytest.param(0, 5, 4, None, id="no-ring-behind"),
        pytest.param(3, 0, 0, None, id="nothing-made"),
    ],
)
def test_server_feed_retained_after(
    retain: int, made: int, after: int, expected: list[int] | None
) -> None:
    """``retained_after`` gives exactly the frames after a seq, or ``None`` (snapshot)."""
    feed = ServerFeed(_NoRuns(), buffer_events=10, retain_events=retain)
    for _ in range(made):
        feed.conversation_changed("c", "created")
    frames = feed.retained_after(after)
    assert (None if frames is None else [f.seq for f in frames]) == expected


async def test_server_stream_shows_the_place_of_a_run_enqueued_behind_its_conversation(
    settings: Settings, gates: Gates
) -> None:
    """A run enqueued behind its conversation's active run takes its place in the line when
    that run ends: its ``queued`` status frame says where (behind the run that got the
    freed slot first)."""
    async with serving(settings, gates) as server:
        first = await create(server, "a")
        await gates["a"].wait_entered()
        await create(server, "b")
        await gates["b"].wait_entered()
        third = await create(server, "c")
        again = await server.client.post(
            f"/api/conversations/{first}/runs", json={"if_busy": "enqueue"}
        )
        assert again.status_code == 202, again.text
        async with server_stream(server) as frames:
            await frames.next()
            gates["a"].release()
            statuses = [status_view(f) for f in await numbered(frames, 3)]
        assert (first, "finished", None, {"running": 2, "queued": 2}) in statuses
        assert (third, "running", None, {"running": 2, "queued": 1}) in statuses
        assert (first, "queued", 1, {"running": 2, "queued": 1}) in statuses
