"""Conversations: create, list, read, delete, and append user messages."""

from __future__ import annotations

import hashlib
import json

from quart import Blueprint, Response, request

from app.api import http
from app.api.http import json_response, parse_body, parse_query, supervisor
from app.api.openapi import documented
from app.api.schemas import (
    ConversationList,
    CreateConversation,
    DeleteConversation,
    ListConversations,
    MessageAccepted,
    PostMessage,
)
from app.errors import BadRequest
from app.events import MessagePayload, Source
from app.records import ConversationRecord
from app.store.base import NewConversation
from app.supervisor import RunSupervisor

blueprint = Blueprint("conversations", __name__, url_prefix="/api/conversations")

MAX_IDEMPOTENCY_KEY_CHARS = 200


def present(sup: RunSupervisor, conversation: ConversationRecord) -> ConversationRecord:
    """The record with its run's live queue position."""
    if conversation.run is None:
        return conversation
    return conversation.model_copy(update={"run": sup.with_position(conversation.run)})


@blueprint.post("")
@documented(
    "Create a conversation; with run=true start its first run. Idempotent with an"
    " Idempotency-Key header (a replay answers with the same conversation).",
    status=201,
    body=CreateConversation,
    response=ConversationRecord,
    errors=(409, 413, 429, 503),
)
async def create_conversation() -> Response:
    sup = supervisor()
    body, raw = await parse_body(CreateConversation)
    sup.registry.validate(body.agent, loc=("body", "agent"), tools=sup.tools.names)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    if body.run:
        sup.check_admission()
    request_hash = None
    if key is not None:
        request_hash = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    new = NewConversation(
        agent=body.agent,
        title=body.title,
        max_iterations=body.max_iterations or sup.settings.max_iterations,
        initial_message=body.initial_message,
        workspace=body.workspace,
        idempotency_key=key,
        request_hash=request_hash,
    )
    conversation, created = await sup.io(sup.store.create_conversation, new)
    headers = {"Location": f"/api/conversations/{conversation.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    elif body.run:
        _, conversation = await sup.admit_run(conversation.id)
    return json_response(present(sup, conversation), 201, headers)


@blueprint.get("")
@documented("List conversations, newest first.", query=ListConversations, response=ConversationList)
async def list_conversations() -> Response:
    sup = supervisor()
    query = parse_query(ListConversations)
    page = await sup.io(
        sup.store.list_conversations, status=query.status, limit=query.limit, cursor=query.cursor
    )
    items = [present(sup, item) for item in page.items]
    return json_response(ConversationList(items=items, next_cursor=page.next_cursor))


@blueprint.get("/<conversation_id>")
@documented("A conversation with its current run.", response=ConversationRecord, errors=(404,))
async def get_conversation(conversation_id: str) -> Response:
    sup = supervisor()
    return json_response(present(sup, await http.get_conversation(sup, conversation_id)))


@blueprint.delete("/<conversation_id>")
@documented(
    "Stop the conversation's runs and delete its data (and, if asked, its workspace).",
    status=204,
    query=DeleteConversation,
    errors=(404,),
)
async def delete_conversation(conversation_id: str) -> Response:
    query = parse_query(DeleteConversation)
    await supervisor().delete_conversation(conversation_id, delete_workspace=query.delete_workspace)
    return Response(b"", status=204)


@blueprint.post("/<conversation_id>/messages")
@documented(
    "Append a user message; with run=true start a run (if_busy defaults to enqueue).",
    status=202,
    body=PostMessage,
    response=MessageAccepted,
    errors=(404, 409, 429, 503),
)
async def post_message(conversation_id: str) -> Response:
    sup = supervisor()
    body, _ = await parse_body(PostMessage)
    await http.get_conversation(sup, conversation_id)
    if body.run:
        sup.check_admission(conversation_id, if_busy=body.if_busy)
    event = await sup.io(
        sup.store.append_event,
        conversation_id,
        None,
        Source.USER,
        MessagePayload(text=body.content),
    )
    run = await sup.start_run(conversation_id, if_busy=body.if_busy) if body.run else None
    return json_response(MessageAccepted(event=event, run=run), 202)
