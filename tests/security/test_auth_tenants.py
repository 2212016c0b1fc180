"""Tenants: another tenant's conversation does not exist for you; admins see every tenant.

Real HTTP (Hypercorn on port 0, httpx and a wsproto client) with two tenants' keys and an
admin key: every per-conversation route of tenant A's conversation answers tenant B with the
same 404 as an unknown id, and A's conversation and runs are absent from B's lists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from app.settings import Settings
from app.testing import Gates, gated_registry
from tests.live import LiveServer, live_server
from tests.test_streams_ws import Closed, ws

pytestmark = pytest.mark.timeout(30)

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef000"
ROOT = "root-key-0123456789abcdef00"
KEYS = [
    {"key": ALICE, "tenant": "alice"},
    {"key": BOB, "tenant": "bob"},
    {"key": ROOT, "tenant": "ops", "admin": True},
]


def keyed(settings: Settings, **more: Any) -> Settings:
    return settings.model_copy(update={"api_keys": Settings(api_keys=KEYS).api_keys, **more})


@asynccontextmanager
async def client_of(server: LiveServer, key: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``server`` that sends ``key`` with every request."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=server.client.base_url, headers=headers, timeout=10
    ) as client:
        yield client


async def start_gated(client: httpx.AsyncClient, *steps: str) -> dict[str, Any]:
    """A conversation whose run waits at its gates (it stays active)."""
    body = {"agent": {"kind": "gated", "steps": list(steps)}, "run": True, "initial_message": "x"}
    created = await client.post("/api/conversations", json=body)
    assert created.status_code == 201, created.text
    record: dict[str, Any] = created.json()
    return record


def not_found(response: httpx.Response, conversation_id: str) -> bool:
    """The 404 of an unknown conversation, word for word."""
    unknown = {"code": "not_found", "message": f"no conversation with id {conversation_id}"}
    error = response.json().get("error", {}) if response.content else {}
    return response.status_code == 404 and {k: error.get(k) for k in unknown} == unknown


def per_conversation_requests(cid: str, run_id: str, event_id: str) -> list[tuple[str, str, Any]]:
    """Every per-conversation route (method, path, JSON body)."""
    base = f"/api/conversations/{cid}"
    return [
        ("GET", base, None),
        ("GET", f"{base}/events", None),
        ("GET", f"{base}/events?q=x", None),
        ("GET", f"{base}/events/count", None),
        ("GET", f"{base}/events/{event_id}", None),
        ("GET", f"{base}/events/stream", None),
        ("GET", f"{base}/runs", None),
        ("GET", f"{base}/runs/{run_id}", None),
        ("GET", f"{base}/runs/{run_id}/wait?timeout=0", None),
        ("POST", f"{base}/runs", {"if_busy": "enqueue"}),
        ("POST", f"{base}/messages", {"content": "hi", "run": True}),
        ("POST", f"{base}/pause", None),
        ("POST", f"{base}/interrupt", None),
        ("DELETE", base, None),
    ]


async def test_a_tenant_cannot_see_or_touch_another_tenants_conversation(
    settings: Settings, gates: Gates
) -> None:
    """Bob gets the unknown-id 404 on every route of Alice's conversation (get, events,
    search, count, one event, SSE and WebSocket streams, runs, wait, start, messages,
    pause, interrupt, delete), finds it in no list and none of its runs in /api/runs; it is
    left untouched. Alice and the admin see it; the admin sees both tenants'."""
    with trio.fail_after(25):
        async with (
            live_server(keyed(settings), gated_registry(gates)) as server,
            client_of(server, ALICE) as alice,
            client_of(server, BOB) as bob,
            client_of(server, ROOT) as root,
        ):
            record = await start_gated(alice, "a")
            cid, run_id = record["id"], record["run"]["id"]
            assert record["tenant"] == "alice"
            bobs = await start_gated(bob, "b")
            await gates["a"].wait_entered()
            await gates["b"].wait_entered()
            events = await alice.get(f"/api/conversations/{cid}/events")
            event_id = events.json()["items"][0]["id"]

            for method, path, body in per_conversation_requests(cid, run_id, event_id):
                answer = await bob.request(method, path, json=body)
                assert not_found(answer, cid), (method, path, answer.text)
            async with ws(server, cid, headers={"Authorization": f"Bearer {BOB}"}) as client:
                assert (await client.frame())["error"]["code"] == "not_found"
                assert await client.closed() == Closed(4404, "not_found")

            def ids(page: httpx.Response, key: str = "id") -> list[str]:
                assert page.status_code == 200, page.text
                return [item[key] for item in page.json()["items"]]

            assert ids(await bob.get("/api/conversations")) == [bobs["id"]]
            assert ids(await alice.get("/api/conversations")) == [cid]
            assert ids(await root.get("/api/conversations")) == [bobs["id"], cid]
            assert ids(await bob.get("/api/runs")) == [bobs["run"]["id"]]
            assert ids(await alice.get("/api/runs")) == [run_id]
            assert sorted(ids(await root.get("/api/runs"))) == sorted([run_id, bobs["run"]["id"]])

            mine = await alice.get(f"/api/conversations/{cid}")  # untouched by Bob
            assert mine.status_code == 200
            assert mine.json()["run"]["status"] == "running"
            assert mine.json()["event_count"] == events.json()["items"][-1]["seq"]
            seen = await root.get(f"/api/conversations/{bobs['id']}/events/count")
            assert seen.status_code == 200, seen.text
            gates.release_all()


async def test_only_admin_keys_read_server_details(settings: Settings) -> None:
    """GET /api/server and /api/cluster, PATCH /api/server/limits and the server-wide stream are 403
    forbidden for a tenant's key (nothing changed) and answer an admin key."""
    with trio.fail_after(20):
        async with (
            live_server(keyed(settings)) as server,
            client_of(server, ALICE) as alice,
            client_of(server, ROOT) as root,
        ):
            for method, path, body in [
                ("GET", "/api/server", None),
                ("GET", "/api/cluster", None),
                ("PATCH", "/api/server/limits", {"max_concurrent_runs": 7}),
                ("GET", "/api/events/stream", None),
            ]:
                answer = await alice.request(method, path, json=body)
                assert answer.status_code == 403, answer.text
                assert answer.json()["error"]["code"] == "forbidden"
            info = await root.get("/api/server")
            assert info.status_code == 200, info.text
            assert (await root.get("/api/cluster")).status_code == 200
            assert info.json()["limits"]["max_concurrent_runs"] == settings.max_concurrent_runs
            patched = await root.patch("/api/server/limits", json={"max_concurrent_runs": 7})
            assert patched.status_code == 200, patched.text
            async with root.stream("GET", "/api/events/stream") as stream:
                assert stream.status_code == 200


async def test_open_mode_is_one_admin_tenant(settings: Settings) -> None:
    """Without keys every request acts as the admin of tenant 'default': conversations are
    created in it and server details are readable, as before tenants existed."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            body = {"agent": {"kind": "script", "steps": [{"say": "x"}]}}
            created = await server.client.post("/api/conversations", json=body)
            assert created.json()["tenant"] == "default"
            assert (await server.client.get("/api/server")).status_code == 200
