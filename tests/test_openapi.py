"""/openapi.json: complete (every route documented) and self-consistent (every $ref resolves)."""

from __future__ import annotations

import json
import re
from typing import Any

from app.api.openapi import view_doc
from app.settings import Settings
from app.web import create_app


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
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/openapi.json")
        assert response.status_code == 200
        document = json.loads(await response.get_data())
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
    assert (
        document["paths"]["/api/conversations/{conversation_id}/runs"]["post"]["requestBody"][
            "required"
        ]
        is False
    )
    search = document["paths"]["/api/conversations/{conversation_id}/events"]["get"]
    assert {p["name"] for p in search["parameters"]} == {
        "conversation_id", "kind", "source", "run_id", "q", "after_seq", "before_seq", "order",
        "limit",
    }  # fmt: skip
