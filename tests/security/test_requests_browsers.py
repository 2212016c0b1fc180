"""Browsers cannot drive the API: JSON-only bodies, and Origin and Host checks.

A web page can send a "simple" cross-site request (``text/plain``, a form) without a CORS
preflight, and DNS rebinding lets it read the answers. Every test here talks to a real
server (Hypercorn on port 0, httpx) the way such a page would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from app.settings import Settings
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


async def listed(server: LiveServer) -> list[str]:
    response = await server.client.get("/api/conversations")
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def touching(marker: Path) -> dict[str, Any]:
    """A create request whose run would leave ``marker`` behind."""
    step = {"tool": "terminal", "args": {"command": f"touch {marker}"}}
    return {"agent": {"kind": "script", "steps": [step]}, "run": True}


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text-plain"),
        pytest.param("text/plain;charset=UTF-8", id="text-plain-charset"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("multipart/form-data; boundary=x", id="multipart"),
        pytest.param(None, id="missing"),
        pytest.param("application/json; charset=iso-8859-1", id="json-latin1"),
        pytest.param("application/json; charset=utf-16", id="json-utf16"),
    ],
)
async def test_non_json_body_is_415_before_anything_runs(
    settings: Settings, tmp_path: Path, content_type: str | None
) -> None:
    """A body that is not declared as UTF-8 JSON is 415 and creates and runs nothing."""
    marker = tmp_path / "ran"
    headers = {"Content-Type": content_type} if content_type else {}
    with trio.fail_after(20):
        async with live_server(settings) as server:
            content = json.dumps(touching(marker)).encode()
            response = await server.client.post(
                "/api/conversations", content=content, headers=headers
            )
            assert_error(response, 415, "unsupported_media_type")
            assert await listed(server) == []
    assert not marker.exists()


@pytest.mark.parametrize(
    "encoding",
    [
        pytest.param("utf-16", id="utf16-bom"),
        pytest.param("utf-16-le", id="utf16le-no-bom"),
        pytest.param("utf-8-sig", id="utf8-bom"),
        pytest.param("latin-1", id="latin1"),
    ],
)
async def test_json_body_that_is_not_utf8_is_415(settings: Settings, encoding: str) -> None:
    """A JSON body encoded as UTF-16, with a byte-order mark, or not UTF-8 at all is 415."""
    document = {"title": "caf\xe9", "agent": {"kind": "script", "steps": [{"say": "hi"}]}}
    body = json.dumps(document, ensure_ascii=False).encode(encoding)
    with trio.fail_after(20):
        async with live_server(settings) as server:
            response = await server.client.post(
                "/api/conversations", content=body, headers={"Content-Type": "application/json"}
            )
            assert_error(response, 415, "unsupported_media_type")
            assert await listed(server) == []


async def test_json_media_types_pass_and_a_declared_other_type_never_does(
    settings: Settings,
) -> None:
    """``application/json`` with a UTF-8 charset and ``+json`` types are accepted, a bodiless
    POST needs no type, but a POST that declares a non-JSON type is 415 even without a body."""
    body = json.dumps({"agent": {"kind": "script", "steps": [{"say": "hi"}]}}).encode()
    with trio.fail_after(20):
        async with live_server(settings) as server:
            for content_type in (
                "application/json; charset=UTF-8",
                "application/merge-patch+json",
                "application/vnd.trellis+json",
            ):
                response = await server.client.post(
                    "/api/conversations", content=body, headers={"Content-Type": content_type}
                )
                assert response.status_code == 201, (content_type, response.text)
            conversation_id = response.json()["id"]
            path = f"/api/conversations/{conversation_id}/runs"
            refused = await server.client.post(path, headers={"Content-Type": "text/plain"})
            assert_error(refused, 415, "unsupported_media_type")
            assert server.supervisor.statistics().running == 0
            started = await server.client.post(path)  # no body, no type
            assert started.status_code == 202, started.text


async def test_foreign_origin_is_403(settings: Settings) -> None:
    """A request carrying an Origin that is not in allowed_origins is 403 and stores nothing;
    an allowed origin passes."""
    allowed = settings.model_copy(update={"allowed_origins": ["https://ui.example.com"]})
    body = {"agent": {"kind": "script", "steps": [{"say": "hi"}]}}
    with trio.fail_after(20):
        async with live_server(allowed) as server:
            for origin in ("https://evil.example", "null", "https://ui.example.com.evil.example"):
                headers = {"Origin": origin}
                refused = await server.client.post("/api/conversations", json=body, headers=headers)
                assert_error(refused, 403, "forbidden_origin")
                assert_error(
                    await server.client.get("/api/server", headers=headers), 403, "forbidden_origin"
                )
            assert await listed(server) == []
            ok = await server.client.post(
                "/api/conversations", json=body, headers={"Origin": "https://UI.example.com"}
            )
            assert ok.status_code == 201, ok.text


async def test_foreign_host_is_421_in_open_mode(settings: Settings) -> None:
    """A Host header naming neither the bound address, a loopback name nor an allowed_hosts
    entry is 421 (DNS rebinding) and stores nothing; /health answers any Host."""
    allowed = settings.model_copy(update={"allowed_hosts": ["trellis.internal"]})
    body = {"agent": {"kind": "script", "steps": [{"say": "hi"}]}}
    with trio.fail_after(20):
        async with live_server(allowed) as server:
            for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example"):
                headers = {"Host": host}
                refused = await server.client.post("/api/conversations", json=body, headers=headers)
                assert_error(refused, 421, "misdirected_request")
                assert_error(
                    await server.client.get("/api/conversations", headers=headers),
                    421,
                    "misdirected_request",
                )
                health = await server.client.get("/health", headers=headers)
                assert health.status_code == 200, health.text
            assert await listed(server) == []
            for host in (
                "localhost",
                "localhost:1234",
                "127.0.0.1:9",
                "[::1]:8000",
                "trellis.internal",
            ):
                answer = await server.client.get("/api/server", headers={"Host": host})
                assert answer.status_code == 200, (host, answer.text)
