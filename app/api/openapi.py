"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the app itself.

Paths and methods come from the app's URL map; bodies, query parameters, headers and
responses come from the pydantic models each view declares with :func:`documented`. A view
without a declaration is a test failure (``tests/test_openapi.py``), so the document stays
complete. What every operation of a kind can answer is added here, once, rather than by
each view: the guards' 403 and 421, 415 and 413 on a method that carries a body, 400 and 422
on a view that parses a body or query, 401 (with ``WWW-Authenticate``) and 503 on ``/api``.

The agent spec of a create body is a discriminated union (on ``kind``) over the spec models
of the serving supervisor's :class:`~app.agents.registry.AgentRegistry`, kinds an embedder
registered included: so the document is built on the first request, not at import, and kept
per app (rebuilt only if the registry's kinds change). Building it is plain CPU work with
no ``await``: nothing to cancel, and two requests cannot race on the cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from quart import Blueprint, Quart, Response, current_app

from app.agents.registry import AgentRegistry
from app.api.guards import BODY_METHODS, OPEN_TO_ANY_HOST
from app.api.http import json_response, supervisor
from app.api.idempotency import MAX_KEY_CHARS
from app.api.schemas import AGENT_SPEC_MARKER, ErrorBody
from app.records import ConversationRecord, RunRecord
from app.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
#: Each model's ``$ref``, by model and mode (as pydantic's ``models_json_schema`` gives them).
Refs = Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]

blueprint = Blueprint("openapi", __name__)

_DOC_ATTRIBUTE = "__trellis_doc__"
_REF = "#/components/schemas/{model}"
_CACHE = "trellis.openapi"
JSON = "application/json"

#: The request headers a view may declare (``documented(headers=...)``), as parameters.
HEADERS: dict[str, dict[str, Any]] = {
    "Idempotency-Key": {
        "description": "Retry safely: the same key and body replay the first answer (with"
        " Idempotent-Replayed: true); the same key with another body is 422; while the"
        " first request with the key is in flight, 409. Scoped per tenant.",
        # Visible ASCII, no spaces (app/api/idempotency.py; 400 otherwise).
        "schema": {"type": "string", "pattern": "^[!-~]+$", "maxLength": MAX_KEY_CHARS},
    },
    "Last-Event-ID": {
        "description": "Resume after this seq (as after_seq; the larger one wins).",
        "schema": {"type": "string", "pattern": "^[0-9]*$"},
    },
}
_RETRY_AFTER = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_WWW_AUTHENTICATE = {
    "description": "Bearer: send Authorization: Bearer <key>.",
    "required": True,
    "schema": {"type": "string"},
}
_REPLAYED = {
    "description": "true when this is the stored first answer to the Idempotency-Key.",
    "schema": {"type": "string", "enum": ["true"]},
}


#: What a write's answer identifies, as OpenAPI runtime expressions. They become the
#: document's links (a conversation created → reading, running, pausing, deleting it; a run
#: started → reading and waiting for it), which generated clients show and schemathesis'
#: stateful phase follows to chain requests.
LINK_PARAMETERS: dict[type[BaseModel], dict[str, str]] = {
    ConversationRecord: {"conversation_id": "$response.body#/id"},
    RunRecord: {
        "conversation_id": "$response.body#/conversation_id",
        "run_id": "$response.body#/id",
    },
}


@dataclass(frozen=True, slots=True)
class Doc:
    summary: str
    status: int
    response: type[BaseModel] | None
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    errors: tuple[int, ...]
    headers: tuple[str, ...]
    media_type: str | None


def documented(
    summary: str,
    *,
    status: int = 200,
    response: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    headers: tuple[str, ...] = (),
    media_type: str | None = None,
) -> Callable[[F], F]:
    """Declare what a view takes and returns, for the OpenAPI document.

    ``headers``: request headers it reads (names of :data:`HEADERS`); ``media_type``: the
    success answer's type when it is not JSON (``text/event-stream``, ``text/html``).
    """
    unknown = set(headers) - HEADERS.keys()
    if unknown:
        raise ValueError(f"undocumented headers {sorted(unknown)}; known: {sorted(HEADERS)}")
    doc = Doc(summary, status, response, body, query, errors, headers, media_type)

    def mark(view: F) -> F:
        setattr(view, _DOC_ATTRIBUTE, doc)
        return view

    return mark


def view_doc(view: Callable[..., Any]) -> Doc | None:
    return getattr(view, _DOC_ATTRIBUTE, None)


@blueprint.get("/openapi.json")
@documented("This OpenAPI document.")
async def openapi() -> Response:
    sup = supervisor()
    return json_response(cached_openapi(current_app, sup.registry, sup.settings))


def cached_openapi(app: Quart, registry: AgentRegistry, settings: Settings) -> dict[str, Any]:
    """The document of ``app``, built once per app and registry kinds."""
    key = (id(registry), tuple(registry.kinds), _keys_required(settings))
    cached: tuple[object, dict[str, Any]] | None = app.extensions.get(_CACHE)
    if cached is None or cached[0] != key:
        cached = (key, build_openapi(app, registry, settings))
        app.extensions[_CACHE] = cached
    return cached[1]


@dataclass(frozen=True, slots=True)
class _Route:
    rule: str
    method: str
    endpoint: str
    arguments: tuple[str, ...]
    doc: Doc


def build_openapi(app: Quart, registry: AgentRegistry, settings: Settings) -> dict[str, Any]:
    """The whole document for ``app`` (every rule whose view is :func:`documented`)."""
    from app import __version__

    routes = [
        _Route(rule.rule, method, rule.endpoint, tuple(sorted(rule.arguments)), doc)
        for rule in app.url_map.iter_rules()
        for method in sorted(rule.methods or ())
        if method not in {"HEAD", "OPTIONS"}
        if (doc := view_doc(app.view_functions[rule.endpoint])) is not None
    ]
    specs = registry.spec_models()
    refs, components = _schemas(routes, specs.values())
    _type_agent_specs(
        components, {kind: refs[model, "validation"] for kind, model in specs.items()}
    )
    ids = _operation_ids(routes)
    links = _links(routes, ids)
    keyed = _keys_required(settings)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", route.rule)
        operation = _operation(route, refs, components)
        operation["operationId"] = ids[route]
        if route in links:
            operation["responses"][str(route.doc.status)]["links"] = links[route]
        is_keyed = _is_keyed(route.rule, settings)
        error_ref = refs[ErrorBody, "serialization"]
        operation["responses"] |= _error_responses(route, error_ref, keyed=is_keyed)
        if is_keyed:
            # Without keys (open mode) the header is optional: {} is "no security".
            operation["security"] = [{"bearer": []}] if keyed else [{"bearer": []}, {}]
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Trellis", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _schemas(routes: list[_Route], specs: Iterable[type[BaseModel]]) -> tuple[Refs, dict[str, Any]]:
    """One pass over every model: requests (and agent specs) as validated, responses as
    serialized. Returns each model's ``$ref`` (pydantic picks the names, and disambiguates
    two models that share one) and the component schemas."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = {(ErrorBody, "serialization")}
    wanted |= {(model, "validation") for model in specs}
    for route in routes:
        if route.doc.body is not None:
            wanted.add((route.doc.body, "validation"))
        if route.doc.response is not None:
            wanted.add((route.doc.response, "serialization"))
    ordered = sorted(wanted, key=lambda item: (item[0].__module__, item[0].__qualname__, item[1]))
    refs, definitions = models_json_schema(ordered, ref_template=_REF)
    return refs, dict(definitions.get("$defs", {}))


def _type_agent_specs(components: dict[str, Any], specs: dict[str, dict[str, Any]]) -> None:
    """Replace each field marked as an agent spec (see ``app/api/schemas.py``) with the
    discriminated union over the registered kinds' spec models."""
    union = {
        "oneOf": [specs[kind] for kind in sorted(specs)],
        "discriminator": {
            "propertyName": "kind",
            "mapping": {kind: specs[kind]["$ref"] for kind in sorted(specs)},
        },
    }
    for schema in components.values():
        for name, field in schema.get("properties", {}).items():
            if isinstance(field, dict) and field.get(AGENT_SPEC_MARKER):
                description = (
                    {"description": field["description"]} if "description" in field else {}
                )
                schema["properties"][name] = union | description


def _operation_ids(routes: list[_Route]) -> dict[_Route, str]:
    """The view's name (snake_case already); a name two blueprints share gets the
    blueprint's as prefix, so ids stay unique and stable."""
    names = [route.endpoint.rpartition(".")[2] for route in routes]
    ids = {
        route: route.endpoint.replace(".", "_") if names.count(name) > 1 else name
        for route, name in zip(routes, names, strict=True)
    }
    if len(set(ids.values())) != len(ids):  # one view under two rules or methods
        raise ValueError(f"operationIds are not unique: {sorted(ids.values())}")
    return ids


def _links(routes: list[_Route], ids: dict[_Route, str]) -> dict[_Route, dict[str, Any]]:
    """For each write whose answer identifies something (:data:`LINK_PARAMETERS`): a link to
    every request-response operation whose path parameters that answer supplies."""
    links: dict[_Route, dict[str, Any]] = {}
    for source in routes:
        given = LINK_PARAMETERS.get(source.doc.response) if source.doc.response else None
        if given is None or source.method == "GET":
            continue
        links[source] = {
            ids[target]: {
                "operationId": ids[target],
                "parameters": {name: given[name] for name in target.arguments},
            }
            for target in routes
            if target is not source and target.arguments and set(target.arguments) <= given.keys()
            if target.doc.status != 101 and target.doc.media_type != "text/event-stream"
        }
    return links


def _operation(
    route: _Route,
    refs: Refs,
    components: dict[str, Any],
) -> dict[str, Any]:
    doc = route.doc
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.arguments
    ]
    if doc.query is not None:
        schema = doc.query.model_json_schema(ref_template=_REF)
        components.update(schema.get("$defs", {}))  # enums used by query fields
        for name, field_schema in schema.get("properties", {}).items():
            parameters.append({"name": name, "in": "query", "schema": field_schema})
    parameters += [{"name": name, "in": "header", **HEADERS[name]} for name in doc.headers]
    operation: dict[str, Any] = {"summary": doc.summary, "parameters": parameters}
    if doc.body is not None:
        operation["requestBody"] = {
            "content": {JSON: {"schema": refs[doc.body, "validation"]}},
            "required": any(field.is_required() for field in doc.body.model_fields.values()),
        }
    success: dict[str, Any] = {"description": "WebSocket" if doc.status == 101 else "OK"}
    if doc.response is not None:
        success["content"] = {JSON: {"schema": refs[doc.response, "serialization"]}}
    elif doc.media_type is not None:
        success["content"] = {doc.media_type: {"schema": {"type": "string"}}}
    if "Idempotency-Key" in doc.headers:
        success["headers"] = {"Idempotent-Replayed": _REPLAYED}
    operation["responses"] = {str(doc.status): success}
    return operation


def _error_responses(route: _Route, error_ref: dict[str, Any], *, keyed: bool) -> dict[str, Any]:
    """The view's own errors, plus those of every request of its kind (module docstring);
    ``keyed``: the route takes an API key (401 without a valid one)."""
    doc = route.doc
    statuses = {*doc.errors, 403}
    if route.rule not in OPEN_TO_ANY_HOST:
        statuses.add(421)  # the Host guard
    if route.method in BODY_METHODS:
        statuses |= {413, 415}
    if doc.body is not None or doc.query is not None or doc.headers:
        statuses |= {400, 422}
    if route.arguments:
        statuses.add(404)
    if "Idempotency-Key" in doc.headers:
        statuses.add(409)  # the first request with this key is still in flight
    if keyed:
        statuses.add(401)
    if route.rule.startswith("/api"):
        statuses.add(503)  # the store cannot be used (disk full, I/O error), draining
    responses = {}
    for status in sorted(statuses):
        response: dict[str, Any] = {
            "description": "Error",
            "content": {JSON: {"schema": error_ref}},
        }
        if status == 429:
            response["headers"] = {"Retry-After": _RETRY_AFTER}
        if status == 401:
            response["headers"] = {"WWW-Authenticate": _WWW_AUTHENTICATE}
        responses[str(status)] = response
    return responses


def _keys_required(settings: Settings) -> bool:
    """Whether the server checks API keys (``api_keys`` or ``api_keys_file`` set)."""
    return bool(settings.api_keys or settings.api_keys_file)


def _is_keyed(rule: str, settings: Settings) -> bool:
    """``/api`` takes a key; ``/metrics`` only when ``metrics_require_key`` says so."""
    if rule == "/metrics":
        return settings.metrics_require_key and _keys_required(settings)
    return rule.startswith("/api")
