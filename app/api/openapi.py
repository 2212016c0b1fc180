"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the app itself.

Paths and methods come from the app's URL map; bodies, query parameters and responses come
from the pydantic models each view declares with :func:`documented`. A view without a
declaration is a test failure (``tests/test_openapi.py``), so the document stays complete.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from quart import Blueprint, Quart, Response, current_app

from app.api.guards import BODY_METHODS, OPEN_TO_ANY_HOST
from app.api.http import json_response
from app.api.schemas import ErrorBody

F = TypeVar("F", bound=Callable[..., Any])

blueprint = Blueprint("openapi", __name__)

_DOC_ATTRIBUTE = "__trellis_doc__"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class Doc:
    summary: str
    status: int
    response: type[BaseModel] | None
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    errors: tuple[int, ...]


def documented(
    summary: str,
    *,
    status: int = 200,
    response: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
) -> Callable[[F], F]:
    """Declare what a view takes and returns, for the OpenAPI document."""

    def mark(view: F) -> F:
        setattr(view, _DOC_ATTRIBUTE, Doc(summary, status, response, body, query, errors))
        return view

    return mark


def view_doc(view: Callable[..., Any]) -> Doc | None:
    return getattr(view, _DOC_ATTRIBUTE, None)


@blueprint.get("/openapi.json")
@documented("This OpenAPI document.")
async def openapi() -> Response:
    return json_response(build_openapi(current_app))


def build_openapi(app: Quart) -> dict[str, Any]:
    """The whole document for ``app`` (every rule whose view is :func:`documented`)."""
    from app import __version__

    routes = [
        (rule, method, doc)
        for rule in app.url_map.iter_rules()
        for method in sorted(rule.methods or ())
        if method not in {"HEAD", "OPTIONS"}
        if (doc := view_doc(app.view_functions[rule.endpoint])) is not None
    ]
    models = {ErrorBody} | {m for _, _, d in routes for m in (d.response, d.body) if m}
    _, definitions = models_json_schema(
        [(model, "serialization") for model in sorted(models, key=lambda m: m.__name__)],
        ref_template=_REF,
    )
    components: dict[str, Any] = dict(definitions.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for rule, method, doc in routes:
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        operation = _operation(doc, sorted(rule.arguments), components)
        operation["responses"] |= _error_responses(doc, method, rule.rule)
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Trellis", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _operation(doc: Doc, path_parameters: list[str], components: dict[str, Any]) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path_parameters
    ]
    if doc.query is not None:
        schema = doc.query.model_json_schema(ref_template=_REF)
        components.update(schema.get("$defs", {}))  # enums used by query fields
        for name, field_schema in schema.get("properties", {}).items():
            parameters.append({"name": name, "in": "query", "schema": field_schema})
    operation: dict[str, Any] = {"summary": doc.summary, "parameters": parameters}
    if doc.body is not None:
        operation["requestBody"] = {
            "content": {"application/json": {"schema": _ref(doc.body)}},
            "required": any(field.is_required() for field in doc.body.model_fields.values()),
        }
    success: dict[str, Any] = {"description": "WebSocket" if doc.status == 101 else "OK"}
    if doc.response is not None:
        success["content"] = {"application/json": {"schema": _ref(doc.response)}}
    operation["responses"] = {str(doc.status): success}
    return operation


def _error_responses(doc: Doc, method: str, path: str) -> dict[str, Any]:
    """The view's own errors, plus those of every request of its kind: the guards' 403
    and 421 (``app/api/guards.py``), 415 for a method that may carry a body, 400 and 422
    for a view that parses one."""
    statuses = {*doc.errors, 403}
    if path not in OPEN_TO_ANY_HOST:
        statuses.add(421)
    if method in BODY_METHODS:
        statuses.add(415)
    if doc.body is not None:
        statuses |= {400, 422}
    error = {"description": "Error", "content": {"application/json": {"schema": _ref(ErrorBody)}}}
    return {str(status): error for status in sorted(statuses)}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}
