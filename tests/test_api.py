"""The HTTP API through ``app.test_app()``: shapes, status codes, errors, no side effects.

Every test runs the real app lifecycle (``before_serving`` opens the store and starts the
supervisor; ``after_serving`` drains it) against a real SQLite file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from quart.testing import QuartClient

from app.settings import Settings
from app.supervisor import RunSupervisor
from app.testing import Gates, gated_registry
from app.web import create_app
from tests.conftest import assert_all_returned, gated, script

pytestmark = pytest.mark.timeout(30)

CONVERSATION_KEYS = {
    "id", "title", "status", "agent", "max_iterations", "workspace", "created_at",
    "updated_at", "event_count", "usage", "run", "webhook", "tenant",
}  # fmt: skip
RUN_KEYS = {
    "id", "conversation_id", "status", "reason", "queue_position", "queued_at", "started_at",
    "finished_at", "steps", "error", "node",
}  # fmt: skip


class Api:
    """A thin helper over the test client: JSON in, (status, JSON) out."""

    def __init__(self, client: QuartClient, supervisor: RunSupervisor) -> None:
        self.client = client
        self.supervisor = supervisor

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = await getattr(self.client, method)(path, **kwargs)
        body = await response.get_data()
        self.headers = response.headers
        return response.status_code, (await response.get_json()) if body else None

    async def create(self, agent: dict[str, Any], **fields: Any) -> dict[str, Any]:
        status, body = await self.call(
            "post", "/api/conversations", json={"agent": agent, **fields}
        )
        assert status == 201, body
        return body  # type: ignore[no-any-return]

    async def wait(self, conversation_id: str, run_id: str) -> dict[str, Any]:
        path = f"/api/conversations/{conversation_id}/runs/{run_id}/wait?timeout=5"
        status, body = await self.call("get", path)
        assert status == 200, body
        return body  # type: ignore[no-any-return]


@pytest.fixture
async def api(settings: Settings, gates: Gates) -> AsyncIterator[Api]:
    app = create_app(settings, registry=gated_registry(gates))
    async with app.test_app() as test_app:
        yield Api(test_app.test_client(), app.extensions["trellis.supervisor"])
    assert_all_returned(app.extensions["trellis.supervisor"])


def assert_error(status: int, body: Any, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "detail"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_create_conversation_returns_the_documented_shape(api: Api) -> None:
    """POST /api/conversations → 201 with every field, a Location, and the first message."""
    body = await api.create(script({"say": "hi"}), title="demo", initial_message="hello")
    assert set(body) == CONVERSATION_KEYS
    assert (body["status"], body["title"], body["event_count"], body["run"]) == (
        "idle", "demo", 1, None,
    )  # fmt: skip
    assert body["created_at"].endswith("Z")
    assert api.headers["Location"] == f"/api/conversations/{body['id']}"
    status, events = await api.call("get", f"/api/conversations/{body['id']}/events")
    assert status == 200
    assert [(e["seq"], e["source"], e["payload"]) for e in events["items"]] == [
        (1, "user", {"kind": "message", "text": "hello"})
    ]


async def test_create_with_run_queues_and_runs_to_the_end(api: Api) -> None:
    """``run: true`` starts a run at once; it finishes and its events are searchable."""
    body = await api.create(script({"say": "hi"}, {"finish": "bye"}), run=True)
    assert body["status"] in {"queued", "running", "finished"}  # it may already be done
    assert set(body["run"]) == RUN_KEYS
    run = await api.wait(body["id"], body["run"]["id"])
    assert (run["status"], run["reason"], run["steps"]) == ("finished", "agent_finished", 2)
    _, events = await api.call("get", f"/api/conversations/{body['id']}/events?kind=status")
    assert [e["payload"]["status"] for e in events["items"]] == ["queued", "running", "finished"]


async def test_idempotency_key_replays_and_refuses_reuse(api: Api) -> None:
    """The same key and body return the same conversation; another body gets 422."""
    request = {"agent": script({"say": "x"}), "title": "once"}
    headers = {"Idempotency-Key": "k-1"}
    first = await api.call("post", "/api/conversations", json=request, headers=headers)
    again = await api.call("post", "/api/conversations", json=request, headers=headers)
    assert first[0] == again[0] == 201
    assert first[1]["id"] == again[1]["id"]
    assert api.headers["Idempotent-Replayed"] == "true"
    other = {**request, "title": "twice"}
    assert_error(*await api.call("post", "/api/conversations", json=other, headers=headers), 422,
                 "idempotency_key_reused")  # fmt: skip
    _, listing = await api.call("get", "/api/conversations")
    assert [item["id"] for item in listing["items"]] == [first[1]["id"]]


async def test_list_conversations_filters_and_pages(api: Api) -> None:
    """The list is newest first, filtered by status, and pages with next_cursor."""
    ids = [(await api.create(script({"say": str(i)})))["id"] for i in range(5)]
    finished = await api.create(script({"say": "x"}), run=True)
    await api.wait(finished["id"], finished["run"]["id"])
    seen, cursor = [], ""
    while True:
        status, page = await api.call("get", f"/api/conversations?status=idle&limit=2{cursor}")
        assert status == 200
        seen += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == ids[::-1]
    status, page = await api.call("get", "/api/conversations?status=finished")
    assert [item["id"] for item in page["items"]] == [finished["id"]]


async def test_messages_append_and_optionally_enqueue_a_run(api: Api, gates: Gates) -> None:
    """A message is accepted in any state; with run=true it queues behind the active run."""
    conversation = await api.create(gated("a"), run=True)
    cid = conversation["id"]
    await gates["a"].wait_entered()
    status, body = await api.call(
        "post", f"/api/conversations/{cid}/messages", json={"content": "more", "run": True}
    )
    assert status == 202
    assert body["event"]["payload"] == {"kind": "message", "text": "more"}
    assert body["run"]["status"] == "queued"
    gates["a"].release()
    run = await api.wait(cid, body["run"]["id"])
    assert run["status"] == "finished"


async def test_start_run_busy_rules(api: Api, gates: Gates) -> None:
    """POST /runs: 202 + Location; 409 when busy; if_busy=interrupt replaces the run."""
    conversation = await api.create(gated("a"))
    cid = conversation["id"]
    status, run = await api.call("post", f"/api/conversations/{cid}/runs")
    assert status == 202
    assert api.headers["Location"] == f"/api/conversations/{cid}/runs/{run['id']}"
    await gates["a"].wait_entered()
    assert_error(
        *await api.call("post", f"/api/conversations/{cid}/runs"), 409, "conversation_busy"
    )
    bad = await api.call("post", f"/api/conversations/{cid}/runs", json={"if_busy": "sometimes"})
    assert_error(*bad, 422, "validation_error")
    status, second = await api.call(
        "post", f"/api/conversations/{cid}/runs", json={"if_busy": "interrupt"}
    )
    assert status == 202
    first = await api.wait(cid, run["id"])
    assert (first["status"], first["reason"]) == ("paused", "interrupt")
    await gates["a"].wait_entered(2)
    gates["a"].release()
    assert (await api.wait(cid, second["id"]))["status"] == "finished"
    status, runs = await api.call("get", f"/api/conversations/{cid}/runs")
    assert [r["id"] for r in runs["items"]] == [run["id"], second["id"]]


async def test_pause_and_interrupt_over_http(api: Api, gates: Gates) -> None:
    """pause → pausing until the step ends; interrupt → paused at once; idle → 409."""
    conversation = await api.create(gated("a", "b"), run=True)
    cid = conversation["id"]
    await gates["a"].wait_entered()
    status, run = await api.call("post", f"/api/conversations/{cid}/pause")
    assert (status, run["status"]) == (202, "pausing")
    status, info = await api.call("get", f"/api/conversations/{cid}")
    assert info["status"] == "pausing"
    status, run = await api.call("post", f"/api/conversations/{cid}/interrupt")
    assert (status, run["status"], run["reason"]) == (202, "paused", "interrupt")
    assert_error(*await api.call("post", f"/api/conversations/{cid}/pause"), 409,
                 "illegal_transition")  # fmt: skip
    assert_error(*await api.call("post", f"/api/conversations/{cid}/interrupt"), 409,
                 "illegal_transition")  # fmt: skip


async def test_wait_times_out_with_408(api: Api, gates: Gates) -> None:
    """/wait answers 408 when the run is still going at the timeout."""
    conversation = await api.create(gated("a"), run=True)
    path = f"/api/conversations/{conversation['id']}/runs/{conversation['run']['id']}/wait"
    assert_error(*await api.call("get", f"{path}?timeout=0.05"), 408, "timeout")
    assert_error(*await api.call("get", f"{path}?timeout=-1"), 422, "validation_error")


async def test_server_runs_lists_queue_in_start_order_and_limits_patch(
    api: Api, gates: Gates
) -> None:
    """/api/runs shows running then queued in order; PATCH limits starts the queued."""
    created = [await api.create(gated(f"g{i}"), run=True) for i in range(4)]
    await gates["g0"].wait_entered()
    await gates["g1"].wait_entered()
    status, queued = await api.call("get", "/api/runs?status=queued")
    assert [(r["id"], r["queue_position"]) for r in queued["items"]] == [
        (created[2]["run"]["id"], 1),
        (created[3]["run"]["id"], 2),
    ]
    status, running = await api.call("get", "/api/runs?status=running")
    assert {r["id"] for r in running["items"]} == {c["run"]["id"] for c in created[:2]}
    status, server = await api.call("patch", "/api/server/limits", json={"max_concurrent_runs": 4})
    assert status == 200
    assert server["limits"]["max_concurrent_runs"] == 4
    await gates["g3"].wait_entered()
    status, server = await api.call("get", "/api/server")
    assert (server["statistics"]["running"], server["statistics"]["queued"]) == (4, 0)
    assert_error(*await api.call("patch", "/api/server/limits", json={"max_concurrent_runs": -1}),
                 422, "validation_error")  # fmt: skip


async def test_queue_full_is_429_with_retry_after(api: Api, gates: Gates) -> None:
    """Past max_queued_runs a run is refused with 429, Retry-After and the limit named."""
    for i in range(5):  # settings fixture: 2 slots + 3 queued
        await api.create(gated(f"g{i}"), run=True)
    conversation = await api.create(gated("late"))
    status, body = await api.call("post", f"/api/conversations/{conversation['id']}/runs")
    assert_error(status, body, 429, "run_queue_full")
    assert "max_queued_runs" in body["error"]["message"]
    assert api.headers["Retry-After"] == "5"
    status, body = await api.call(
        "post", "/api/conversations", json={"agent": gated("x"), "run": True}
    )
    assert_error(status, body, 429, "run_queue_full")
    status, listing = await api.call("get", "/api/conversations?limit=100")
    assert len(listing["items"]) == 6  # the refused create made nothing


async def test_events_search_count_and_get(api: Api) -> None:
    """Search pages both ways with the documented cursors; count and get agree."""
    steps = [{"say": f"m{i}"} for i in range(5)]
    conversation = await api.create(script(*steps), run=True)
    cid = conversation["id"]
    await api.wait(cid, conversation["run"]["id"])
    base = f"/api/conversations/{cid}/events"
    status, page = await api.call("get", f"{base}?kind=message&limit=3")
    assert [e["payload"]["text"] for e in page["items"]] == ["m0", "m1", "m2"]
    status, rest = await api.call("get", f"{base}?kind=message&after_seq={page['next_after_seq']}")
    assert [e["payload"]["text"] for e in rest["items"]] == ["m3", "m4"]
    assert rest["next_after_seq"] is None
    status, desc = await api.call("get", f"{base}?order=desc&limit=2&source=agent")
    assert [e["payload"]["text"] for e in desc["items"]] == ["m4", "m3"]
    assert desc["next_before_seq"] == desc["items"][-1]["seq"]
    status, count = await api.call("get", f"{base}/count?kind=message&q=M3")
    assert (status, count) == (200, {"count": 1})
    event = page["items"][0]
    status, one = await api.call("get", f"{base}/{event['id']}")
    assert (status, one) == (200, event)
    assert_error(*await api.call("get", f"{base}/no-such-event"), 404, "not_found")


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("limit=0", id="limit-zero"),
        pytest.param("limit=1001", id="limit-too-big"),
        pytest.param("limit=ten", id="limit-not-int"),
        pytest.param("kind=banana", id="unknown-kind"),
        pytest.param("source=robot", id="unknown-source"),
        pytest.param("order=sideways", id="bad-order"),
        pytest.param("after_seq=-1", id="negative-cursor"),
        pytest.param("colour=red", id="unknown-parameter"),
        pytest.param("limit=1&limit=2", id="repeated-parameter"),
    ],
)
async def test_events_search_rejects_bad_queries(api: Api, query: str) -> None:
    """Every bad search parameter is a 422 naming the parameter."""
    conversation = await api.create(script({"say": "x"}))
    status, body = await api.call("get", f"/api/conversations/{conversation['id']}/events?{query}")
    assert_error(status, body, 422, "validation_error")
    assert body["error"]["detail"][0]["loc"][:2] == ["query", query.split("=")[0]]


def raw_json(data: bytes) -> dict[str, Any]:
    """Test-client arguments sending ``data`` as a JSON body."""
    return {"data": data, "headers": {"Content-Type": "application/json"}}


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        pytest.param(
            "post", "/api/conversations", raw_json(b"{nope"), 400, "bad_request", id="bad-json"
        ),
        pytest.param(
            "post", "/api/conversations", raw_json(b"[1]"), 400, "bad_request", id="not-object"
        ),
        pytest.param("post", "/api/conversations", {"data": b""}, 400, "bad_request", id="empty"),
        pytest.param(
            "post", "/api/conversations", {"json": {}}, 422, "validation_error", id="no-agent"
        ),
        pytest.param(
            "post",
            "/api/conversations",
            {"json": {"agent": {"kind": "nope"}}},
            422,
            "validation_error",
            id="unknown-kind",
        ),
        pytest.param(
            "post",
            "/api/conversations",
            {"json": {"agent": {"kind": "script", "steps": [{"sleep": "x"}]}}},
            422,
            "validation_error",
            id="bad-step",
        ),
        pytest.param(
            "post",
            "/api/conversations",
            {"json": {"agent": {"kind": "script", "steps": [{"dance": 1}]}}},
            422,
            "validation_error",
            id="unknown-step",
        ),
        pytest.param(
            "post",
            "/api/conversations",
            {"json": {"agent": {"kind": "script", "steps": [{"say": "x"}]}, "extra": 1}},
            422,
            "validation_error",
            id="unknown-field",
        ),
        pytest.param(
            "post",
            "/api/conversations",
            raw_json(b"{" + b" " * 2_000_000 + b"}"),
            413,
            "payload_too_large",
            id="too-large",
        ),
        pytest.param(
            "post",
            "/api/conversations",
            {"json": {"agent": {"kind": "llm", "tools": ["terminal", "teleport"]}}},
            422,
            "validation_error",
            id="unknown-llm-tool",
        ),
        pytest.param("get", "/api/conversations/nope", {}, 404, "not_found", id="unknown-id"),
        pytest.param(
            "post", "/api/conversations/nope/runs", {}, 404, "not_found", id="run-unknown"
        ),
        pytest.param(
            "delete", "/api/conversations/nope", {}, 404, "not_found", id="delete-unknown"
        ),
        pytest.param(
            "get", "/api/conversations?status=lost", {}, 422, "validation_error", id="status"
        ),
        pytest.param(
            "get", "/api/conversations?cursor=abc", {}, 422, "validation_error", id="cursor"
        ),
        pytest.param("get", "/api/nowhere", {}, 404, "not_found", id="unknown-route"),
        pytest.param("put", "/api/conversations", {}, 405, "method_not_allowed", id="bad-method"),
        pytest.param(
            "patch", "/api/server/limits", {"json": {}}, 422, "validation_error", id="limits"
        ),
    ],
)
async def test_bad_input_gets_one_error_shape_and_changes_nothing(
    api: Api, method: str, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    """Bad input is a clear 4xx in the one JSON shape, and no conversation appears."""
    assert_error(*await api.call(method, path, **kwargs), status, code)
    _, listing = await api.call("get", "/api/conversations")
    assert listing["items"] == []


async def test_delete_conversation_stops_run_and_forgets_it(api: Api, gates: Gates) -> None:
    """DELETE stops the running run and then 404s everywhere."""
    conversation = await api.create(gated("a"), run=True)
    cid = conversation["id"]
    await gates["a"].wait_entered()
    status, _ = await api.call("delete", f"/api/conversations/{cid}")
    assert status == 204
    assert_error(*await api.call("get", f"/api/conversations/{cid}"), 404, "not_found")
    assert_error(*await api.call("get", f"/api/conversations/{cid}/events"), 404, "not_found")
    assert api.supervisor.statistics().run_threads_alive == 0


async def test_health_ready_and_draining(api: Api, gates: Gates) -> None:
    """/ready turns 503 and new runs get 503 shutting_down once the server drains."""
    conversation = await api.create(gated("a"), run=True)
    await gates["a"].wait_entered()
    assert await api.call("get", "/health") == (200, {"status": "ok"})
    status, ready = await api.call("get", "/ready")
    assert (status, ready["status"], ready["sandbox"] in ("bwrap", "none")) == (200, "ready", True)
    with trio.fail_after(5):
        await api.supervisor.drain("shutdown")
    assert_error(*await api.call("get", "/ready"), 503, "shutting_down")
    assert (await api.call("get", "/health"))[0] == 200
    cid = conversation["id"]
    assert_error(*await api.call("post", f"/api/conversations/{cid}/runs"), 503, "shutting_down")
    _, info = await api.call("get", f"/api/conversations/{cid}")
    assert (info["status"], info["run"]["reason"]) == ("paused", "shutdown")


async def test_create_refuses_an_agent_naming_a_tool_that_does_not_exist(api: Api) -> None:
    """An llm agent's tools must exist: the 422 names the offending entry."""
    agent = {"kind": "llm", "tools": ["terminal", "teleport"]}
    status, body = await api.call("post", "/api/conversations", json={"agent": agent})
    assert_error(status, body, 422, "validation_error")
    assert [d["loc"] for d in body["error"]["detail"]] == [["body", "agent", "tools", 1]]
    agent["tools"] = ["terminal", "finish"]
    assert (await api.call("post", "/api/conversations", json={"agent": agent}))[0] == 201
