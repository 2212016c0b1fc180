"""/openapi.json: complete, self-consistent and typed; /docs: the page, served offline.

The document must describe every route (operationId, parameters, headers, security, every
error status with the error schema) and type the agent spec of a create body as the
registered kinds' union — including a kind an embedder registered on its own registry.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal

import pytest
import trio
from playwright.sync_api import expect
from pydantic import BaseModel

from app.agents.registry import default_registry
from app.api.docs_page import DOCS_POLICY
from app.api.openapi import view_doc
from app.settings import ApiKeySetting, Settings
from app.web import create_app
from tests.live import live_server
from tests.test_dashboard_browser import browser_page, require_chromium

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
WRITES_WITH_KEYS = {"create_conversation", "post_message", "start_run"}
SSE_STREAMS = {"stream_events", "stream_server_events"}
OPEN_PATHS = {"/health", "/ready", "/openapi.json", "/docs", "/docs/{name}", "/", "/static/{name}"}


class EchoSpec(BaseModel):
    """An embedder's own kind (as in examples/embed.py)."""

    kind: Literal["echo"]
    times: int = 1


async def _document(settings: Settings, **app_options: Any) -> dict[str, Any]:
    app = create_app(settings, **app_options)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/openapi.json")
        assert response.status_code == 200
        document: dict[str, Any] = json.loads(await response.get_data())
    return document


def _operations(document: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId → (path, method, operation)."""
    return {
        operation["operationId"]: (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_openapi_documents_every_route_with_resolvable_schemas(settings: Settings) -> None:
    """Each route and method of the app is in the document, and every $ref points somewhere."""
    app = create_app(settings)
    document = await _document(settings)
    routes = {
        (re.sub(r"<([^>]+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == routes
    assert all(view_doc(view) is not None for view in app.view_functions.values())
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    create = document["paths"]["/api/conversations"]["post"]
    assert create["requestBody"]["required"] is True
    start = document["paths"]["/api/conversations/{conversation_id}/runs"]["post"]
    assert start["requestBody"]["required"] is False
    search = document["paths"]["/api/conversations/{conversation_id}/events"]["get"]
    assert {p["name"] for p in search["parameters"]} == {
        "conversation_id", "kind", "source", "run_id", "q", "after_seq", "before_seq", "order",
        "limit",
    }  # fmt: skip


async def test_operation_ids_are_the_view_names_unique_and_snake_case(settings: Settings) -> None:
    """Every operation has an operationId: its view's name (stable), snake_case, unique."""
    app = create_app(settings)
    document = await _document(settings)
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", i) for i in ids), ids
    assert set(ids) == {endpoint.rpartition(".")[2] for endpoint in app.view_functions}


async def test_headers_security_and_every_error_status_are_documented(settings: Settings) -> None:
    """Idempotency-Key on the writes that take it, Last-Event-ID on the SSE streams; the
    bearer scheme on /api (optional in open mode); 401 (with WWW-Authenticate) and 503 on
    /api, 413/415/400/422 on bodies, 404 on path ids, 429 with Retry-After; every error
    answer is the error schema."""
    document = await _document(settings)
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    for operation_id, (path, method, operation) in _operations(document).items():
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        expected_headers = {"Idempotency-Key"} if operation_id in WRITES_WITH_KEYS else set()
        if operation_id in SSE_STREAMS:
            expected_headers = {"Last-Event-ID"}
            assert "text/event-stream" in operation["responses"]["200"]["content"]
        assert headers == expected_headers, operation_id
        responses = operation["responses"]
        errors = {int(s) for s in responses if int(s) >= 400}
        for status in errors:
            assert responses[str(status)]["content"]["application/json"]["schema"] == ERROR_REF
        if path.startswith("/api"):
            assert operation["security"] == [{"bearer": []}, {}], operation_id
            assert {401, 403, 421, 503} <= errors, operation_id
            assert "WWW-Authenticate" in responses["401"]["headers"]
        else:
            assert "security" not in operation and 401 not in errors, operation_id
            assert path in OPEN_PATHS | {"/metrics"}
        if method in {"post", "patch", "delete"}:
            assert {413, 415} <= errors, operation_id
        if "requestBody" in operation or headers:
            assert {400, 422} <= errors, operation_id
        if "{" in path:
            assert 404 in errors, operation_id
        if 429 in errors:
            assert responses["429"]["headers"]["Retry-After"]["required"] is True
    operations = _operations(document)
    assert {i for i, (_, _, op) in operations.items() if "429" in op["responses"]} == (
        WRITES_WITH_KEYS
    )
    assert 409 in {int(s) for s in operations["create_conversation"][2]["responses"]}


async def test_with_api_keys_the_api_requires_the_bearer_key(settings: Settings) -> None:
    """With keys, /api operations require the bearer scheme; /metrics too when
    metrics_require_key says so; /health, /ready, /docs and the dashboard stay open."""
    keys = [ApiKeySetting(key="k" * 32, tenant="a", admin=True)]
    keyed = settings.model_copy(update={"api_keys": keys, "metrics_require_key": True})
    operations = _operations(await _document(keyed))
    for operation_id, (path, _, operation) in operations.items():
        if path.startswith("/api") or path == "/metrics":
            assert operation["security"] == [{"bearer": []}], operation_id
            assert "401" in operation["responses"], operation_id
        else:
            assert "security" not in operation, operation_id
    open_metrics = settings.model_copy(update={"api_keys": keys})
    assert "security" not in _operations(await _document(open_metrics))["metrics"][2]


async def test_agent_spec_is_a_discriminated_union_of_the_registered_kinds(
    settings: Settings,
) -> None:
    """The create body's agent is oneOf the registry's spec models, discriminated on kind;
    an embedder's registry adds its kind (and another app's document is not affected)."""
    registry = default_registry(settings.llm)
    registry.register("echo", EchoSpec, lambda spec: None)  # type: ignore[arg-type,return-value]
    embedded = await _document(settings, registry=registry)
    default = await _document(settings)
    for document, kinds in [(default, {"llm", "script"}), (embedded, {"echo", "llm", "script"})]:
        schemas = document["components"]["schemas"]
        agent = schemas["CreateConversation"]["properties"]["agent"]
        assert agent["discriminator"]["propertyName"] == "kind"
        mapping = agent["discriminator"]["mapping"]
        assert set(mapping) == kinds
        assert sorted(agent["oneOf"], key=str) == sorted(
            ({"$ref": r} for r in mapping.values()), key=str
        )
        for kind, ref in mapping.items():
            spec = schemas[ref.removeprefix("#/components/schemas/")]
            assert spec["properties"]["kind"]["const"] == kind
            assert "kind" in spec["required"]
    echo = embedded["components"]["schemas"]["EchoSpec"]
    assert echo["properties"]["times"]["type"] == "integer"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        url = named.get("src") or named.get("href")
        if url is not None:
            self.urls.append(url)
        elif tag == "script":
            self.inline_scripts += 1


async def test_docs_page_is_served_offline_from_local_assets(settings: Settings) -> None:
    """GET /docs is HTML with a strict CSP that loads only /docs/ files (no CDN, no inline
    script); each file is 200 with its type; other names (and the page itself) are 404."""
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    app = create_app(settings)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        page = await client.get("/docs")
        assert page.status_code == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["Content-Security-Policy"] == DOCS_POLICY
        assert "default-src 'self'" in DOCS_POLICY and "unsafe" not in DOCS_POLICY
        links = _Links()
        links.feed((await page.get_data()).decode())
        assert links.inline_scripts == 0
        assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/docs-init.js"} <= set(
            links.urls
        )
        for url in links.urls:
            assert url.startswith("/docs/"), url
            asset = await client.get(url)
            assert asset.status_code == 200, url
            suffix = "." + url.rpartition(".")[2]
            assert asset.headers["Content-Type"].startswith(types[suffix]), url
            assert asset.headers["X-Content-Type-Options"] == "nosniff"
        init = (await (await client.get("/docs/docs-init.js")).get_data()).decode()
        assert '"/openapi.json"' in init
        for missing in ("/docs/docs.html", "/docs/index.html", "/docs/swagger-ui.js.map"):
            assert (await client.get(missing)).status_code == 404, missing


def _browse_docs(url: str, operations: int) -> list[str]:
    """Open /docs in chromium: Swagger UI lists the operations (by operationId), with no
    error, no CSP violation and no request leaving the server. The problems it saw."""
    with browser_page() as (page, problems):
        page.goto(f"{url}/docs")
        expect(page.locator("#operations-default-create_conversation")).to_be_visible()
        expect(page.locator(".opblock")).to_have_count(operations)
        page.locator("#operations-default-create_conversation .opblock-summary").click()
        expect(page.get_by_text("Idempotency-Key").first).to_be_visible()
    outside = [u for u in problems.urls if not u.startswith(url + "/")]
    return problems.seen + [f"request elsewhere: {u}" for u in outside]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_docs_page_renders_the_operations_in_a_browser(tmp_path: Path) -> None:
    """Debian's chromium shows the operations of /openapi.json on /docs, offline."""
    require_chromium()
    with trio.fail_after(50):
        async with live_server(Settings(data_dir=tmp_path / "data")) as server:
            url = str(server.client.base_url).rstrip("/")
            document = (await server.client.get("/openapi.json")).json()
            count = sum(len(item) for item in document["paths"].values())
            assert await trio.to_thread.run_sync(_browse_docs, url, count) == []
