"""Admission over real HTTP: exact under a burst, atomic with its write, idempotent.

A real Hypercorn server on port 0 and httpx; runs are held with gates, so "running" and
"queued" are asserted at known points.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
import trio.testing

from app.settings import Settings
from app.testing import Gates, gated_registry
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

SLOTS, PLACES, BURST = 4, 4, 16


@pytest.fixture
def burst_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_concurrent_runs": SLOTS, "max_queued_runs": PLACES})


async def create(server: LiveServer, agent: dict[str, Any], **fields: Any) -> dict[str, Any]:
    response = await server.client.post("/api/conversations", json={"agent": agent, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def event_count(server: LiveServer, conversation_id: str) -> int:
    response = await server.client.get(f"/api/conversations/{conversation_id}/events/count")
    count: int = response.json()["count"]
    return count


async def send_all(
    server: LiveServer, requests: list[tuple[str, str, dict[str, Any]]]
) -> list[httpx.Response]:
    """Send the requests concurrently; answers in request order."""
    answers: list[httpx.Response | None] = [None] * len(requests)

    async def send(index: int, method: str, path: str, body: dict[str, Any]) -> None:
        answers[index] = await server.client.request(method, path, json=body)

    async with trio.open_nursery() as nursery:
        for index, (method, path, body) in enumerate(requests):
            nursery.start_soon(send, index, method, path, body)
    return [answer for answer in answers if answer is not None]


async def test_admission_burst_is_exact(burst_settings: Settings, gates: Gates) -> None:
    """16 concurrent message+run requests against 4 slots and 4 places: exactly 8 runs are
    admitted (4 seated without a position, 4 queued at positions 1-4), the 8 refused store
    nothing, and the queued runs start in the order of their positions."""
    with trio.fail_after(20):
        async with live_server(burst_settings, gated_registry(gates)) as server:
            conversations = [
                await create(server, {"kind": "gated", "steps": [f"q{i}"]}) for i in range(BURST)
            ]
            requests = [
                ("POST", f"/api/conversations/{c['id']}/messages", {"content": "go", "run": True})
                for c in conversations
            ]
            answers = await send_all(server, requests)

            accepted = [a.json() for a in answers if a.status_code == 202]
            refused = [
                (c, a) for c, a in zip(conversations, answers, strict=True) if a.status_code == 429
            ]
            assert (len(accepted), len(refused)) == (SLOTS + PLACES, BURST - SLOTS - PLACES)
            positions = sorted(
                (body["run"]["queue_position"] is None, body["run"]["queue_position"] or 0)
                for body in accepted
            )
            assert [p for seated, p in positions if not seated] == [1, 2, 3, 4]
            assert sum(seated for seated, _ in positions) == SLOTS
            for conversation, answer in refused:
                assert answer.headers["Retry-After"]
                assert answer.json()["error"]["detail"]["queued"] == PLACES
                assert await event_count(server, conversation["id"]) == 0  # no message
            stats = server.supervisor.statistics()
            assert (stats.running, stats.queued) == (SLOTS, PLACES)

            # The queued runs start in the order of their positions.
            by_position = {
                body["run"]["queue_position"]: body
                for body in accepted
                if body["run"]["queue_position"]
            }
            started = []
            seated = [b for b in accepted if b["run"]["queue_position"] is None]
            for body in seated:
                gates[_gate_of(conversations, body)].release()
            for position in (1, 2, 3, 4):
                body = by_position[position]
                gate = gates[_gate_of(conversations, body)]
                await gate.wait_entered()
                started.append(position)
                gate.release()
            assert started == [1, 2, 3, 4]


def _gate_of(conversations: list[dict[str, Any]], accepted: dict[str, Any]) -> str:
    conversation_id = accepted["run"]["conversation_id"]
    (conversation,) = [c for c in conversations if c["id"] == conversation_id]
    gate: str = conversation["agent"]["steps"][0]
    return gate


async def fill_the_queue(server: LiveServer) -> None:
    """Hold every slot and every place with gated runs (the gate "full" is never opened)."""
    stats = server.supervisor.statistics()
    for _ in range(SLOTS + PLACES - stats.running - stats.queued):
        await create(server, {"kind": "gated", "steps": ["full"]}, run=True)
    stats = server.supervisor.statistics()
    assert (stats.running, stats.queued) == (SLOTS, PLACES)


async def conversation_ids(server: LiveServer) -> list[str]:
    listed = await server.client.get("/api/conversations")
    return [item["id"] for item in listed.json()["items"]]


async def test_refused_create_with_run_stores_nothing(
    burst_settings: Settings, gates: Gates
) -> None:
    """A create with run=true refused with 429 (or 503 while draining) leaves no
    conversation behind, and its message is not stored either."""
    with trio.fail_after(20):
        async with live_server(burst_settings, gated_registry(gates)) as server:
            await fill_the_queue(server)
            before = await conversation_ids(server)
            body = {"agent": {"kind": "gated", "steps": ["x"]}, "initial_message": "hi"}
            refused = await server.client.post("/api/conversations", json={**body, "run": True})
            assert refused.status_code == 429
            assert await conversation_ids(server) == before

            await server.supervisor.drain("shutdown", grace_seconds=5)
            refused = await server.client.post("/api/conversations", json={**body, "run": True})
            assert refused.status_code == 503
            assert await conversation_ids(server) == before


async def test_refused_message_with_run_stores_no_message(
    burst_settings: Settings, gates: Gates
) -> None:
    """A message with run=true refused with 429 or 409 (if_busy=reject) is not stored."""
    with trio.fail_after(20):
        async with live_server(burst_settings, gated_registry(gates)) as server:
            busy = await create(server, {"kind": "gated", "steps": ["busy"]}, run=True)
            idle = await create(server, {"kind": "gated", "steps": ["idle"]})
            await fill_the_queue(server)
            await gates["busy"].wait_entered()
            events_before = await event_count(server, busy["id"])
            path = f"/api/conversations/{busy['id']}/messages"
            conflict = await server.client.post(
                path, json={"content": "x", "run": True, "if_busy": "reject"}
            )
            assert conflict.status_code == 409
            assert await event_count(server, busy["id"]) == events_before
            path = f"/api/conversations/{idle['id']}/messages"
            full = await server.client.post(path, json={"content": "x", "run": True})
            assert full.status_code == 429
            assert await event_count(server, idle["id"]) == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(
            "/api/conversations",
            {"agent": {"kind": "gated", "steps": ["a"]}, "run": "yes"},
            id="create-run-string",
        ),
        pytest.param(
            "/api/conversations",
            {"agent": {"kind": "gated", "steps": ["a"]}, "run": 1},
            id="create-run-int",
        ),
        pytest.param(
            "/api/conversations",
            {"agent": {"kind": "gated", "steps": ["a"]}, "max_iterations": "5"},
            id="create-max-iterations",
        ),
        pytest.param("/messages", {"content": "x", "run": "true"}, id="message-run-string"),
    ],
)
async def test_booleans_and_integers_in_bodies_are_strict(
    settings: Settings, gates: Gates, path: str, body: dict[str, Any]
) -> None:
    """``"run": "yes"`` (or ``1``, or ``"5"`` for an integer) is a 422, and stores nothing."""
    with trio.fail_after(10):
        async with live_server(settings, gated_registry(gates)) as server:
            target = await create(server, {"kind": "gated", "steps": ["t"]})
            if path == "/messages":
                path = f"/api/conversations/{target['id']}/messages"
            answer = await server.client.post(path, json=body)
            assert answer.status_code == 422, answer.text
            assert await conversation_ids(server) == [target["id"]]
            assert await event_count(server, target["id"]) == 0


async def test_limits_refuse_true_as_a_number(settings: Settings, gates: Gates) -> None:
    """``PATCH /api/server/limits`` with ``true`` is a 422 and changes nothing."""
    with trio.fail_after(10):
        async with live_server(settings, gated_registry(gates)) as server:
            answer = await server.client.patch(
                "/api/server/limits", json={"max_concurrent_runs": True}
            )
            assert answer.status_code == 422
            assert server.supervisor.statistics().max_concurrent_runs == 2


async def test_idempotent_create_replays_exactly_the_first_answer(
    burst_settings: Settings, gates: Gates
) -> None:
    """A replayed create answers byte for byte what the first one did — even after its run
    started and the queue filled up — and a new body with the same key is a 422."""
    with trio.fail_after(20):
        async with live_server(burst_settings, gated_registry(gates)) as server:
            body = {"agent": {"kind": "gated", "steps": ["k"]}, "run": True, "title": "t"}
            headers = {"Idempotency-Key": "create-1"}
            first = await server.client.post("/api/conversations", json=body, headers=headers)
            assert first.status_code == 201
            await gates["k"].wait_entered()  # its status and event count have changed since
            await fill_the_queue(server)
            again = await server.client.post("/api/conversations", json=body, headers=headers)
            assert (again.status_code, again.content) == (201, first.content)
            assert again.headers["Location"] == first.headers["Location"]
            assert again.headers["Idempotent-Replayed"] == "true"
            assert len(await conversation_ids(server)) == 1 + SLOTS + PLACES - 1
            other = await server.client.post(
                "/api/conversations", json={**body, "title": "u"}, headers=headers
            )
            assert other.status_code == 422
            assert other.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("route", ["messages", "runs"])
async def test_idempotent_message_and_run_replay_the_first_answer(
    settings: Settings, gates: Gates, route: str
) -> None:
    """``Idempotency-Key`` on ``/messages`` and ``/runs``: a retry stores nothing new and
    answers the first answer again."""
    with trio.fail_after(20):
        async with live_server(settings, gated_registry(gates)) as server:
            conversation = await create(server, {"kind": "gated", "steps": ["m"]})
            path = f"/api/conversations/{conversation['id']}/{route}"
            body = {"content": "hello", "run": True} if route == "messages" else {}
            headers = {"Idempotency-Key": f"{route}-1"}
            first = await server.client.post(path, json=body, headers=headers)
            assert first.status_code == 202, first.text
            await gates["m"].wait_entered()
            count = await event_count(server, conversation["id"])
            again = await server.client.post(path, json=body, headers=headers)
            assert (again.status_code, again.content) == (202, first.content)
            assert again.headers["Idempotent-Replayed"] == "true"
            assert await event_count(server, conversation["id"]) == count
            runs = await server.client.get(f"/api/conversations/{conversation['id']}/runs")
            assert len(runs.json()["items"]) == 1


async def test_server_runs_pages_the_queue_in_start_order(
    burst_settings: Settings, gates: Gates
) -> None:
    """``GET /api/runs?status=queued&limit=2`` answers the first two queued runs in the
    order they will start, with their positions."""
    with trio.fail_after(20):
        async with live_server(burst_settings, gated_registry(gates)) as server:
            await fill_the_queue(server)
            queued = await server.client.get("/api/runs", params={"status": "queued", "limit": 2})
            items = queued.json()["items"]
            assert [item["queue_position"] for item in items] == [1, 2]
            running = await server.client.get("/api/runs", params={"status": "running"})
            assert len(running.json()["items"]) == SLOTS
            assert all(item["status"] in ("queued", "running") for item in running.json()["items"])
