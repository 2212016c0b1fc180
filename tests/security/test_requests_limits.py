"""Every input limit answers a clear 4xx in the error shape, over real HTTP: body size
(413 stating ``max_request_bytes``), title and message length, script steps, sleep bounds,
page ``limit``, header size (431 from Hypercorn, configured by ``max_header_bytes``) and
malformed ids (404) — never a 500, and never a path on disk in the answer.

The server runs on Hypercorn with :func:`app.cli.serving.hypercorn_config`, the
configuration ``python -m app serve`` uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import hypercorn.trio
import pytest
import trio

from app.agents.script import MAX_SLEEP_SECONDS
from app.api.schemas import MAX_TEXT_CHARS
from app.cli.serving import hypercorn_config
from app.settings import Settings
from app.store.base import MAX_PAGE_SIZE
from app.web import create_app
from tests.conftest import script

pytestmark = pytest.mark.timeout(30)

MAX_REQUEST_BYTES = 4096
MAX_HEADER_BYTES = 2048
MAX_STEPS = 10_000
TITLE_CHARS = 200


@asynccontextmanager
async def configured_server(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app on Hypercorn configured as ``serve`` configures it, on 127.0.0.1:0."""
    app = create_app(settings)
    config = hypercorn_config(settings.model_copy(update={"host": "127.0.0.1", "port": 0}))
    config.graceful_timeout = 1.0
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
        )
        try:
            async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
                yield client
        finally:
            stop.set()


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        max_request_bytes=MAX_REQUEST_BYTES,
        max_header_bytes=MAX_HEADER_BYTES,
    )
    async with configured_server(settings) as served:
        yield served


async def conversation(client: httpx.AsyncClient) -> str:
    created = await client.post("/api/conversations", json={"agent": script({"say": "hi"})})
    assert created.status_code == 201, created.text
    conversation_id: str = created.json()["id"]
    return conversation_id


def assert_clear_error(response: httpx.Response, status: int, data_dir: Path) -> dict[str, Any]:
    """The status, in the error shape, with a message, and nothing about the disk."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] and error["message"]
    assert str(data_dir) not in response.text and "sqlite" not in response.text.lower()
    return error


def create(agent: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"agent": agent or script({"say": "hi"}), **fields}


BODIES = [
    pytest.param(create(title="t" * (TITLE_CHARS + 1)), "title", id="title"),
    pytest.param(create(initial_message="m" * (MAX_TEXT_CHARS + 1)), "initial_message", id="msg"),
    pytest.param(
        create({"kind": "script", "steps": [{"say": "x"}] * (MAX_STEPS + 1)}),
        "steps",
        id="steps",
    ),
    pytest.param(create(script()), "steps", id="no-steps"),
    pytest.param(create(script({"sleep": MAX_SLEEP_SECONDS * 2})), "sleep", id="sleep-long"),
    pytest.param(create(script({"sleep": -1})), "sleep", id="sleep-negative"),
    pytest.param(create(max_iterations=0), "max_iterations", id="iterations"),
]


@pytest.mark.parametrize(("body", "field"), BODIES)
async def test_fields_beyond_their_limits_are_422_naming_the_field(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    """Bounded fields (with byte limits generous enough that only the field's own limit
    can refuse them): 422 ``validation_error`` whose detail names the field."""
    roomy = Settings(
        data_dir=tmp_path / "data", max_request_bytes=4 << 20, max_agent_spec_bytes=4 << 20
    )
    async with configured_server(roomy) as served:
        response = await served.post("/api/conversations", json=body)
        error = assert_clear_error(response, 422, tmp_path)
        assert error["code"] == "validation_error"
        assert any(field in map(str, item["loc"]) for item in error["detail"]), error
        assert (await served.get("/api/conversations")).json()["items"] == []


async def test_a_message_beyond_its_limit_is_422(tmp_path: Path) -> None:
    async with configured_server(Settings(data_dir=tmp_path / "data")) as served:
        path = f"/api/conversations/{await conversation(served)}/messages"
        response = await served.post(path, json={"content": "m" * (MAX_TEXT_CHARS + 1)})
        error = assert_clear_error(response, 422, tmp_path)
        assert error["detail"][0]["loc"] == ["body", "content"]


async def test_a_body_beyond_max_request_bytes_is_413_stating_the_limit(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    response = await client.post("/api/conversations", json=create(title="t" * MAX_REQUEST_BYTES))
    error = assert_clear_error(response, 413, tmp_path)
    assert error["code"] == "payload_too_large"
    assert str(MAX_REQUEST_BYTES) in error["message"] and "max_request_bytes" in error["message"]


PAGES = [
    "/api/conversations?limit={limit}",
    "/api/conversations/{id}/runs?limit={limit}",
    "/api/conversations/{id}/events?limit={limit}",
    "/api/runs?limit={limit}",
]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1, "x"])
async def test_page_limit_out_of_range_is_422(
    client: httpx.AsyncClient, tmp_path: Path, page: str, limit: Any
) -> None:
    path = page.format(id=await conversation(client), limit=limit)
    error = assert_clear_error(await client.get(path), 422, tmp_path)
    assert error["detail"][0]["loc"] == ["query", "limit"]


async def test_page_limit_at_its_maximum_is_accepted(client: httpx.AsyncClient) -> None:
    for page in PAGES:
        path = page.format(id=await conversation(client), limit=MAX_PAGE_SIZE)
        assert (await client.get(path)).status_code == 200, path


async def test_a_request_head_beyond_max_header_bytes_is_431(client: httpx.AsyncClient) -> None:
    """A request head still incomplete past ``max_header_bytes`` (here 3 KiB of headers
    without their end, below Hypercorn's 16 KiB default) is refused by Hypercorn: 431 (no
    JSON: the app never sees it), the connection closed, and the server goes on serving."""
    url = client.base_url
    assert url.host and url.port
    head = f"GET /health HTTP/1.1\r\nHost: {url.host}\r\nX-Big: {'h' * 3072}\r\n"
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(url.host, url.port) as stream:
            await stream.send_all(head.encode())  # no blank line: the head goes on
            answer = b""
            while chunk := await stream.receive_some(65_536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert (await client.get("/health", headers={"X-Fits": "h" * 1024})).status_code == 200


BAD_IDS = [
    "not-a-uuid",
    "x" * 1000,
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "caf%C3%A9",
    "%27%20OR%201%3D1%20--",
]
ID_ROUTES = [
    ("GET", "/api/conversations/{bad}"),
    ("DELETE", "/api/conversations/{bad}"),
    ("GET", "/api/conversations/{bad}/events"),
    ("GET", "/api/conversations/{bad}/events/count"),
    ("GET", "/api/conversations/{bad}/runs"),
    ("POST", "/api/conversations/{bad}/pause"),
    ("GET", "/api/conversations/{id}/runs/{bad}"),
    ("GET", "/api/conversations/{id}/runs/{bad}/wait?timeout=0"),
    ("GET", "/api/conversations/{id}/events/{bad}"),
]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_malformed_ids_are_404(client: httpx.AsyncClient, tmp_path: Path, bad: str) -> None:
    """Every route taking an id answers 404 in the error shape for a malformed one."""
    conversation_id = await conversation(client)
    for method, route in ID_ROUTES:
        path = route.format(bad=bad, id=conversation_id)
        response = await client.request(method, path)
        assert_clear_error(response, 404, tmp_path)
