"""``Idempotency-Key`` as draft-ietf-httpapi-idempotency-key-header describes it, over real
HTTP: 409 while the first request is in flight (and the key released however that request
ends), 422 for another request with the key, 400 for a malformed key, and keys that expire
after ``idempotency_key_retention_hours`` (purged at start-up, and on lookup).

A request is held in flight without sleeping: the test takes the supervisor's only I/O
thread token (``io_threads=1``), so a keyed request waits at its first store call, with its
key claimed, until the test gives the token back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from app.api.idempotency import HEADER, MAX_KEY_CHARS, keys_in_flight
from app.principal import DEFAULT_TENANT
from app.settings import Settings
from app.store.idempotency import scoped_key
from tests.conftest import script
from tests.live import LiveServer, live_server
from tests.security.test_auth_tenants import ALICE, BOB, client_of, keyed

pytestmark = pytest.mark.timeout(30)

CREATE = {"agent": script({"say": "hi"}), "title": "once"}
EXPIRED = "2000-01-01T00:00:00+00:00"


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


@pytest.fixture
def one_io_thread(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", io_threads=1)


@asynccontextmanager
async def io_held(server: LiveServer) -> AsyncIterator[None]:
    """Hold the supervisor's only I/O token for the block: store calls wait meanwhile."""
    limiter = server.supervisor.io_limiter
    assert limiter.total_tokens == 1
    holder = object()
    await limiter.acquire_on_behalf_of(holder)
    try:
        yield
    finally:
        limiter.release_on_behalf_of(holder)


def in_flight(server: LiveServer, key: str) -> bool:
    return scoped_key(DEFAULT_TENANT, key) in keys_in_flight(server.app)


async def test_a_key_in_flight_is_409_then_the_first_answer_replays(
    one_io_thread: Settings,
) -> None:
    """While the first request with a key waits, a second one (even with another body) is
    409 ``idempotency_key_in_flight``; once the first has answered, a retry replays it."""
    headers = {HEADER: "k-1"}
    async with live_server(one_io_thread) as server:
        first: list[httpx.Response] = []

        async def send_first() -> None:
            first.append(
                await server.client.post("/api/conversations", json=CREATE, headers=headers)
            )

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery, io_held(server):
                nursery.start_soon(send_first)
                await trio.testing.wait_all_tasks_blocked()
                assert in_flight(server, "k-1")
                for body in (CREATE, {**CREATE, "title": "other"}):
                    second = await server.client.post(
                        "/api/conversations", json=body, headers=headers
                    )
                    assert_error(second, 409, "idempotency_key_in_flight")
                    assert second.json()["error"]["detail"] == {"idempotency_key": "k-1"}
            assert first[0].status_code == 201, first[0].text
            assert not in_flight(server, "k-1")
            again = await server.client.post("/api/conversations", json=CREATE, headers=headers)
        assert (again.status_code, again.content) == (201, first[0].content)
        assert again.headers["Idempotent-Replayed"] == "true"
        other = await server.client.post(
            "/api/conversations", json={**CREATE, "title": "other"}, headers=headers
        )
        assert_error(other, 422, "idempotency_key_reused")


async def test_a_cancelled_request_releases_its_key(one_io_thread: Settings) -> None:
    """A client that disconnects while its keyed request waits: the handler is cancelled,
    the key is released, and the same key then works."""
    headers = {HEADER: "k-2"}
    async with live_server(one_io_thread) as server:
        with trio.fail_after(10):
            async with io_held(server):  # held until the release is seen: the handler
                # must not get the token (and finish) before it sees the disconnect
                async with trio.open_nursery() as nursery:

                    async def send_and_give_up() -> None:
                        async with httpx.AsyncClient(base_url=server.client.base_url) as client:
                            await client.post("/api/conversations", json=CREATE, headers=headers)

                    nursery.start_soon(send_and_give_up)
                    await trio.testing.wait_all_tasks_blocked()
                    assert in_flight(server, "k-2")
                    nursery.cancel_scope.cancel()  # closes the client's connection
                await trio.testing.wait_all_tasks_blocked()
                assert not in_flight(server, "k-2")
            created = await server.client.post("/api/conversations", json=CREATE, headers=headers)
        assert created.status_code == 201, created.text


async def test_keys_are_scoped_per_tenant(one_io_thread: Settings) -> None:
    """With API keys, the same Idempotency-Key from two tenants is two keys: each creates
    its own conversation, each replays its own answer, neither sees the other's in flight,
    and the 422 of one tenant's key echoes the key, never the tenant."""
    headers = {HEADER: "shared"}
    async with (
        live_server(keyed(one_io_thread)) as server,
        client_of(server, ALICE) as alice,
        client_of(server, BOB) as bob,
    ):
        answers: dict[str, httpx.Response] = {}

        async def create_as(name: str, client: httpx.AsyncClient) -> None:
            answers[name] = await client.post("/api/conversations", json=CREATE, headers=headers)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery, io_held(server):
                nursery.start_soon(create_as, "alice", alice)
                nursery.start_soon(create_as, "bob", bob)
                await trio.testing.wait_all_tasks_blocked()
                claimed = keys_in_flight(server.app)
                assert scoped_key("alice", "shared") in claimed
                assert scoped_key("bob", "shared") in claimed  # not a 409: another tenant's
        assert [answers[name].status_code for name in ("alice", "bob")] == [201, 201]
        a_id = answers["alice"].json()["id"]
        assert answers["bob"].json()["id"] != a_id
        a_again = await alice.post("/api/conversations", json=CREATE, headers=headers)
        assert (a_again.status_code, a_again.json()["id"]) == (201, a_id)
        other = await bob.post("/api/conversations", json={**CREATE, "title": "x"}, headers=headers)
        assert_error(other, 422, "idempotency_key_reused")
        assert other.json()["error"]["detail"] == {"idempotency_key": "shared"}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        pytest.param("/api/conversations/nope/messages", {"content": "x"}, 404, id="404"),
        pytest.param("/api/conversations", {"agent": {"kind": "none"}}, 422, id="422"),
        pytest.param("/api/conversations/nope/runs", {}, 404, id="runs-404"),
    ],
)
async def test_a_request_that_fails_releases_its_key(
    settings: Settings, path: str, body: dict[str, Any], status: int
) -> None:
    """An error answer releases the key: the same request again gets the same error,
    not 409 (and stores no key: a failed request may be retried with its key)."""
    async with live_server(settings) as server:
        for _ in range(2):
            response = await server.client.post(path, json=body, headers={HEADER: "k-3"})
            assert response.status_code == status, response.text
        assert not in_flight(server, "k-3")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * (MAX_KEY_CHARS + 1), id="too-long"),
        pytest.param("a b", id="space"),
        pytest.param(b"caf\xe9", id="non-ascii"),
        pytest.param("a\x7fb", id="control"),
    ],
)
async def test_a_malformed_key_is_400_and_stores_nothing(settings: Settings, key: Any) -> None:
    async with live_server(settings) as server:
        response = await server.client.post(
            "/api/conversations", json=CREATE, headers={HEADER: key}
        )
        assert_error(response, 400, "bad_request")
        assert HEADER in response.json()["error"]["message"]
        listing = await server.client.get("/api/conversations")
        assert listing.json()["items"] == []


async def test_a_key_of_255_visible_characters_is_accepted(settings: Settings) -> None:
    key = "~!" + "k" * (MAX_KEY_CHARS - 2)
    async with live_server(settings) as server:
        created = await server.client.post("/api/conversations", json=CREATE, headers={HEADER: key})
        assert created.status_code == 201, created.text


def age_keys(database: Path) -> None:
    """Make every stored key older than any retention."""
    with closing(sqlite3.connect(database, timeout=10)) as conn, conn:
        conn.execute("UPDATE idempotency_keys SET created_at = ?", (EXPIRED,))


def stored_keys(database: Path) -> list[str]:
    with closing(sqlite3.connect(database, timeout=10)) as conn:
        return [row[0] for row in conn.execute("SELECT key FROM idempotency_keys")]


async def test_an_expired_key_is_a_new_key(settings: Settings) -> None:
    """Past the retention, the same key with another body creates (no 422), and with
    the same body creates again (no replay): the old key was purged on lookup."""
    headers = {HEADER: "k-4"}
    async with live_server(settings) as server:
        first = await server.client.post("/api/conversations", json=CREATE, headers=headers)
        assert first.status_code == 201
        age_keys(settings.database_path)
        other = await server.client.post(
            "/api/conversations", json={**CREATE, "title": "new"}, headers=headers
        )
        assert other.status_code == 201, other.text
        assert "Idempotent-Replayed" not in other.headers
        assert other.json()["id"] != first.json()["id"]


async def test_expired_keys_are_purged_at_start_up(settings: Settings) -> None:
    """Keys survive a restart within the retention; expired ones are deleted when the
    supervisor starts (before it serves), their conversations kept."""
    headers = {HEADER: "k-5"}
    async with live_server(settings) as server:
        first = await server.client.post("/api/conversations", json=CREATE, headers=headers)
    async with live_server(settings) as server:
        assert stored_keys(settings.database_path) == [scoped_key(DEFAULT_TENANT, "k-5")]
        again = await server.client.post("/api/conversations", json=CREATE, headers=headers)
        assert (again.status_code, again.content) == (201, first.content)
    age_keys(settings.database_path)
    async with live_server(settings) as server:
        assert stored_keys(settings.database_path) == []
        kept = await server.client.get(f"/api/conversations/{first.json()['id']}")
        assert kept.status_code == 200
