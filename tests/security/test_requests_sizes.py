"""Sizes and lists: summaries, a byte budget per page, an agent spec limit, and rows that
cannot be rendered never breaking a list. Real HTTP, a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
import uuid
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from app.settings import Settings
from app.store.queries import MAX_LIST_PAGE_BYTES
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

SCRIPT = {"kind": "script", "steps": [{"say": "hi"}]}


class SQL(str):
    """A value written as an SQL expression instead of a parameter."""


def insert_conversations(database: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Write conversation rows (and a run per row with ``run_error``) straight into SQLite,
    bypassing every check of the API and the store; returns their ids, oldest first."""
    now = datetime.now(UTC).isoformat()
    ids = []
    with closing(sqlite3.connect(database, timeout=10)) as conn:
        for fields in rows:
            row = {
                "id": str(uuid.uuid4()),
                "title": None,
                "status": "idle",
                "agent": json.dumps(SCRIPT),
                "max_iterations": 10,
                "created_at": now,
                "updated_at": now,
            } | {k: v for k, v in fields.items() if k != "run_error"}
            if "run_error" in fields:
                run_id = str(uuid.uuid4())
                row |= {"status": "error", "current_run_id": run_id}
            columns = ", ".join(row)
            marks = ", ".join(
                f"{value}" if isinstance(value, SQL) else "?" for value in row.values()
            )
            conn.execute(
                f"INSERT INTO conversations ({columns}) VALUES ({marks})",
                [value for value in row.values() if not isinstance(value, SQL)],
            )
            if "run_error" in fields:
                conn.execute(
                    "INSERT INTO runs (id, conversation_id, status, reason, queued_at, steps,"
                    " error) VALUES (?, ?, 'error', 'agent_error', ?, 0, ?)",
                    (run_id, row["id"], now, fields["run_error"]),
                )
            ids.append(row["id"])
        conn.commit()
    return ids


async def list_all(server: LiveServer) -> tuple[list[dict[str, Any]], list[int]]:
    """Every item, following next_cursor; with the byte size of each page."""
    items: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor = ""
    while True:
        response = await server.client.get(f"/api/conversations?limit=1000{cursor}")
        assert response.status_code == 200, response.text
        sizes.append(len(response.content))
        page = response.json()
        items += page["items"]
        if page["next_cursor"] is None:
            return items, sizes
        cursor = f"&cursor={page['next_cursor']}"


async def test_list_returns_summaries_not_agent_specs(settings: Settings) -> None:
    """Conversations with large scripts list as small summaries (agent_kind, no agent);
    GET of one conversation still returns its full spec."""
    big = {"kind": "script", "steps": [{"say": "x" * 1000} for _ in range(60)]}
    with trio.fail_after(20):
        async with live_server(settings) as server:
            for _ in range(20):
                created = await server.client.post("/api/conversations", json={"agent": big})
                assert created.status_code == 201, created.text
            response = await server.client.get("/api/conversations")
            assert response.status_code == 200
            assert len(response.content) < 20 * 1024
            items = response.json()["items"]
            assert len(items) == 20
            assert all(item["agent_kind"] == "script" and "agent" not in item for item in items)
            one = await server.client.get(f"/api/conversations/{items[0]['id']}")
            assert one.json()["agent"] == big


async def test_list_page_stays_under_the_byte_budget(settings: Settings) -> None:
    """A page never passes MAX_LIST_PAGE_BYTES, however long the stored texts: it ends early
    with a next_cursor, and following the cursors lists every conversation exactly once."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            ids = insert_conversations(
                settings.database_path,
                [{"title": "\x01" * 200, "run_error": "\x01" * 50_000} for _ in range(300)],
            )
            items, sizes = await list_all(server)
    assert [item["id"] for item in items] == ids[::-1]
    assert len(sizes) > 1
    assert max(sizes) <= MAX_LIST_PAGE_BYTES
    assert all(len(item["run"]["error"]) < 50_000 for item in items)


async def test_rows_that_cannot_be_rendered_are_listed_as_stubs(settings: Settings) -> None:
    """Hostile rows written straight into SQLite never break the list: a row that cannot be
    rendered is a stub with an error marker, every other row is listed in full."""
    deep: Any = 0
    for _ in range(255):
        deep = {"a": deep}
    deep_agent = {"kind": "script", "steps": [{"tool": "finish", "args": deep}]}
    with trio.fail_after(20):
        async with live_server(settings) as server:
            good = (await server.client.post("/api/conversations", json={"agent": SCRIPT})).json()
            rendered = insert_conversations(
                settings.database_path,
                [{"agent": json.dumps(deep_agent)}, {"title": SQL("CAST(X'C328' AS TEXT)")}],
            )
            broken = insert_conversations(
                settings.database_path,
                [
                    {"agent": "{nope"},
                    {"agent": "[1, 2]"},
                    {"status": "zombie"},
                    {"created_at": "yesterday"},
                    {"max_iterations": "many"},
                    {"title": b"\xff\xfe"},
                ],
            )
            items, _ = await list_all(server)
            again = await server.client.get("/api/server")
            assert again.status_code == 200
    by_id = {item["id"]: item for item in items}
    assert [item["id"] for item in items] == [*broken[::-1], *rendered[::-1], good["id"]]
    for conversation_id in broken:
        assert set(by_id[conversation_id]) == {"id", "error"}
        assert by_id[conversation_id]["error"]
    assert by_id[rendered[0]]["agent_kind"] == "script"
    assert "\ufffd" in by_id[rendered[1]]["title"]
    assert by_id[good["id"]]["agent_kind"] == "script"


async def test_agent_spec_over_max_agent_spec_bytes_is_413(settings: Settings) -> None:
    """An agent spec larger than max_agent_spec_bytes is 413 stating the limit, and
    nothing is stored."""
    limited = settings.model_copy(update={"max_agent_spec_bytes": 2048})
    agent = {"kind": "script", "steps": [{"say": "x" * 3000}]}
    with trio.fail_after(20):
        async with live_server(limited) as server:
            response = await server.client.post("/api/conversations", json={"agent": agent})
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["code"] == "payload_too_large"
            assert "max_agent_spec_bytes" in error["message"]
            assert "2048" in error["message"]
            listing = await server.client.get("/api/conversations")
            assert listing.json()["items"] == []
            small = {"kind": "script", "steps": [{"say": "x" * 1000}]}
            ok = await server.client.post("/api/conversations", json={"agent": small})
            assert ok.status_code == 201, ok.text


async def test_openapi_documents_summaries_and_request_errors(settings: Settings) -> None:
    """/openapi.json lists summaries and the 403/415/421 answers every operation may give."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            document = (await server.client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert "agent_kind" in schemas["ConversationSummary"]["properties"]
    assert "agent" not in schemas["ConversationSummary"]["properties"]
    items = schemas["ConversationList"]["properties"]["items"]["items"]
    refs = {option["$ref"].rsplit("/", 1)[1] for option in items["anyOf"]}
    assert refs == {"ConversationSummary", "UnreadableConversation"}
    create = document["paths"]["/api/conversations"]["post"]["responses"]
    assert {"400", "403", "413", "415", "421", "422"} <= set(create)
    server_info = document["paths"]["/api/server"]["get"]["responses"]
    assert {"403", "421"} <= set(server_info)
    assert "415" not in server_info
    assert "421" not in document["paths"]["/health"]["get"]["responses"]
