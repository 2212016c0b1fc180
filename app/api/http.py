"""Request parsing and JSON responses shared by every blueprint.

Every input goes through a pydantic model: a body that is not UTF-8 JSON is a 415, one
that is not well-formed (or too deep, or with a duplicate key) a 400, a body or query that
does not fit its model a 422 naming the field. Nothing is changed before the whole input
has been validated.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError
from quart import Quart, Response, current_app, request

from app.api.guards import check_json_media_type
from app.api.json_limits import parse_json
from app.auth import current_principal
from app.errors import BadRequest, InvalidInput
from app.records import ConversationRecord
from app.store.sqlite import conversation_not_found
from app.supervisor import RunSupervisor

M = TypeVar("M", bound=BaseModel)


def supervisor() -> RunSupervisor:
    """The supervisor of the app serving the current request."""
    sup: RunSupervisor = current_app.extensions["trellis.supervisor"]
    return sup


async def get_conversation(sup: RunSupervisor, conversation_id: str) -> ConversationRecord:
    """The conversation (404 if there is none): a cached record needs no thread hop.

    Another tenant's conversation does not exist for the request's principal: the same 404
    as for an unknown id (an admin key sees every tenant's).
    """
    conversation = sup.store.cached_conversation(conversation_id)
    if conversation is None:
        conversation = await sup.io(sup.store.get_conversation, conversation_id)
    if not current_principal().sees(conversation.tenant):
        raise conversation_not_found(conversation_id)
    return conversation


def install_ownership_check(app: Quart) -> None:
    """Before any route with a ``conversation_id`` (events, runs, streams, pause, interrupt,
    delete, messages): 404 unless the conversation belongs to the request's tenant — the
    one place per-conversation routes are checked. Admins (and the open mode) skip it.
    Install after :func:`app.auth.install_auth`. WebSocket handlers call
    :func:`get_conversation` themselves (their principal may come with the first frame).
    """

    @app.before_request
    async def check_owner() -> None:
        conversation_id = (request.view_args or {}).get("conversation_id")
        if conversation_id is not None and not current_principal().admin:
            await get_conversation(supervisor(), conversation_id)


async def read_json_object(*, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; ``{}`` for an empty body when ``optional``.

    The body is parsed by :func:`app.api.json_limits.parse_json` (UTF-8, unique keys,
    bounded depth and numbers) and must be declared as JSON — checked again here for a body
    that arrived without announcing itself (no Content-Length).

    Errors: :class:`BadRequest` for malformed JSON or a non-object;
    :class:`~app.errors.UnsupportedMediaType` (415) for a body that is not UTF-8 JSON; 413
    (from Quart) for a body larger than ``max_request_bytes``; see ``parse_json`` for the rest.
    """
    raw = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if not raw.strip():
        if optional:
            return {}
        raise BadRequest("the request body is empty; send a JSON object")
    check_json_media_type()
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def parse_body(model: type[M], *, optional: bool = False) -> tuple[M, dict[str, Any]]:
    """Validate the JSON body against ``model``; returns the model and the raw object."""
    raw = await read_json_object(optional=optional)
    return validate(model, raw, loc="body"), raw


def parse_query(model: type[M]) -> M:
    """Validate the query string against ``model`` (a repeated parameter is an error)."""
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if len(values) > 1:
            raise InvalidInput(
                f"invalid input: query.{key} given more than once",
                detail=[{"loc": ["query", key], "msg": "given more than once", "type": "repeated"}],
            )
        args[key] = values[0]
    return validate(model, args, loc="query")


def validate(model: type[M], data: dict[str, Any], *, loc: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput.from_validation_error(exc, prefix=(loc,)) from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialize models, datetimes and enums (anywhere in ``data``) to a JSON response."""
    return Response(
        pydantic_core.to_json(data),
        status=status,
        headers=headers,
        content_type="application/json",
    )
