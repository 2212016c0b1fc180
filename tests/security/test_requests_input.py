"""Every bad request is a clear 4xx, and nothing bad is stored.

Out-of-range integers, JSON the parser must not build (too deep, huge numbers, duplicate
keys, NaN) and agent specs that do not fit their kind's schema are refused before anything
is written — and nothing a request can send makes a later list fail. Real HTTP throughout.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from app.settings import Settings
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

INT64_MAX = 2**63 - 1
SCRIPT = {"kind": "script", "steps": [{"say": "hi"}]}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, response.text
    return error


async def listed(server: LiveServer) -> list[str]:
    response = await server.client.get("/api/conversations")
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def nested(depth: int) -> Any:
    """A value with ``depth`` levels of nesting: [[[...]]]."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def with_args(args_json: str) -> bytes:
    """A create request whose script step passes ``args_json`` (raw JSON text) to a tool."""
    return (
        '{"agent": {"kind": "script", "steps": [{"tool": "finish", "args": {"x": '
        + args_json
        + "}}]}}"
    ).encode()


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("events?after_seq={n}", id="after_seq"),
        pytest.param("events?before_seq={n}", id="before_seq"),
        pytest.param("events/count?after_seq={n}", id="count-after_seq"),
        pytest.param("events?order=desc&before_seq={n}", id="desc-before_seq"),
        pytest.param("runs?after={n}", id="runs-after"),
    ],
)
async def test_query_integers_beyond_int64_are_422(settings: Settings, path: str) -> None:
    """An integer query parameter of 2^63 or more is a 422 naming it, not a 500."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            created = await server.client.post("/api/conversations", json={"agent": SCRIPT})
            base = f"/api/conversations/{created.json()['id']}/"
            error = assert_error(
                await server.client.get(base + path.format(n=INT64_MAX + 1)),
                422,
                "validation_error",
            )
            assert error["detail"][0]["loc"][0] == "query"
            assert (await server.client.get(base + path.format(n=INT64_MAX))).status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(with_args(json.dumps(nested(70))), 400, id="depth-70"),
        pytest.param(with_args("[" * 100_000 + "]" * 100_000), 400, id="depth-100000"),
        pytest.param(with_args("9" * 5000), 400, id="5000-digits"),
        pytest.param(with_args("1" * 101), 400, id="101-digits"),
        pytest.param(with_args("0." + "1" * 200), 400, id="long-fraction"),
        pytest.param(with_args("1e400"), 400, id="float-overflow"),
        pytest.param(with_args("NaN"), 400, id="nan"),
        pytest.param(with_args("-Infinity"), 400, id="infinity"),
        pytest.param(with_args(str(INT64_MAX + 1)), 422, id="int64-overflow"),
        pytest.param(with_args(str(-(2**63) - 1)), 422, id="int64-underflow"),
        pytest.param(
            b'{"agent": {"kind": "script", "steps": [{"say": "a"}]}, "title": "x", "title": "y"}',
            400,
            id="duplicate-key",
        ),
        pytest.param(with_args('{"a": 1, "a": 2}'), 400, id="duplicate-nested-key"),
    ],
)
async def test_json_the_parser_refuses_stores_nothing(
    settings: Settings, body: bytes, status: int
) -> None:
    """Too deep, too long or non-finite numbers and duplicate keys are refused at parse
    time (400; 422 for an integer outside 64 bits) and nothing is stored."""
    code = "bad_request" if status == 400 else "validation_error"
    with trio.fail_after(20):
        async with live_server(settings) as server:
            response = await server.client.post(
                "/api/conversations", content=body, headers={"Content-Type": "application/json"}
            )
            assert_error(response, status, code)
            assert await listed(server) == []


async def test_tool_arguments_nested_255_deep_never_poison_the_list(settings: Settings) -> None:
    """Tool arguments nested 255 deep are a 4xx, nothing is stored, and the list (and the
    server after it) keep answering."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            response = await server.client.post(
                "/api/conversations",
                content=with_args(json.dumps(nested(255))),
                headers={"Content-Type": "application/json"},
            )
            assert 400 <= response.status_code < 500, response.text
            assert await listed(server) == []
            ok = await server.client.post("/api/conversations", json={"agent": SCRIPT})
            assert ok.status_code == 201, ok.text
            assert await listed(server) == [ok.json()["id"]]


@pytest.mark.parametrize(
    ("step", "field"),
    [
        pytest.param({"sleep": "5"}, "sleep", id="sleep-string"),
        pytest.param({"sleep": True}, "sleep", id="sleep-bool"),
        pytest.param({"tool": "teleport"}, "tool", id="unknown-tool"),
        pytest.param([{"tool": "finish"}, {"tool": "teleport"}], "tool", id="unknown-tool-in-list"),
    ],
)
async def test_script_spec_is_validated_strictly_before_it_is_stored(
    settings: Settings, step: Any, field: str
) -> None:
    """A script step of the wrong type or calling an unknown tool is a 422 naming the step's
    field, and nothing is stored."""
    agent = {"kind": "script", "steps": [{"say": "first"}, step]}
    with trio.fail_after(20):
        async with live_server(settings) as server:
            response = await server.client.post("/api/conversations", json={"agent": agent})
            error = assert_error(response, 422, "validation_error")
            locs = [item["loc"] for item in error["detail"]]
            assert any(
                loc[:4] == ["body", "agent", "steps", 1] and loc[-1] == field for loc in locs
            )
            assert await listed(server) == []
