"""Conversations: create, list, read, delete, and append user messages."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, TypeVar

import pydantic_core
from quart import Blueprint, Response

from app.admission import Admission
from app.api import http, idempotency
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
from app.auth import current_principal
from app.errors import PayloadTooLarge
from app.events import MessagePayload
from app.live.webhooks import check_webhook
from app.records import ConversationRecord, ConversationSummary
from app.store.base import MessageWritten, NewConversation
from app.store.idempotency import Answer, IdempotentWrite, Replayed
from app.supervisor import RunSupervisor

blueprint = Blueprint("conversations", __name__, url_prefix="/api/conversations")

C = TypeVar("C", ConversationRecord, ConversationSummary)


async def present(sup: RunSupervisor, conversations: list[C]) -> list[C]:
    """The records (or summaries) with their runs' live queue positions (in a cluster, one
    database read for all of them: ``RunBoard.with_positions``)."""
    runs = await sup.with_positions([c.run for c in conversations if c.run is not None])
    by_id = {run.id: run for run in runs}
    return [
        c if c.run is None else c.model_copy(update={"run": by_id[c.run.id]}) for c in conversations
    ]


def check_spec_size(agent: dict[str, Any], limit: int) -> None:
    """Refuse an agent spec whose JSON is larger than ``max_agent_spec_bytes``.

    Errors: :class:`~app.errors.PayloadTooLarge` (413) stating the size and the limit.
    """
    size = len(pydantic_core.to_json(agent))
    if size > limit:
        raise PayloadTooLarge(
            f"the agent spec is {size} bytes of JSON; max_agent_spec_bytes is {limit}",
            detail={"loc": ["body", "agent"], "size": size, "max_agent_spec_bytes": limit},
        )


@blueprint.post("")
@documented(
    "Create a conversation; with run=true start its first run, atomically: a refused run"
    " stores nothing. Idempotent with an Idempotency-Key header (a replay answers exactly"
    " the first answer, with Idempotent-Replayed: true). The agent spec is validated against"
    " its kind's schema first; one larger than max_agent_spec_bytes is 413. A webhook URL"
    " must start with a webhook_allowed_urls prefix, and the server needs a webhook_secret"
    " (422 otherwise).",
    status=201,
    body=CreateConversation,
    response=ConversationRecord,
    errors=(409, 413, 429, 503),
    headers=("Idempotency-Key",),
)
@idempotency.guarded
async def create_conversation() -> Response:
    sup = supervisor()
    body, raw = await parse_body(CreateConversation)
    check_spec_size(body.agent, sup.settings.max_agent_spec_bytes)
    sup.registry.validate(body.agent, loc=("body", "agent"), tools=sup.tools.names)
    if body.webhook is not None:
        check_webhook(body.webhook.url, sup.settings)
    key = idempotency.request_key(raw)
    await idempotency.replay_if_known(sup, key)
    conversation_id = str(uuid.uuid4())
    tenant = current_principal().tenant
    new = NewConversation(
        id=conversation_id,
        tenant=tenant,
        agent=body.agent,
        title=body.title,
        max_iterations=body.max_iterations or sup.settings.max_iterations,
        initial_message=body.initial_message,
        workspace=body.workspace,
        webhook=body.webhook,
        idempotency_key=key[0] if key else None,
        request_hash=key[1] if key else None,
    )

    def write(admission: Admission | None) -> tuple[ConversationRecord, Answer]:
        fields = new
        if admission is not None:
            fields = dataclasses.replace(new, run=admission.new_run)

        @idempotency.RenderOnce
        def render(record: ConversationRecord) -> Answer:
            if admission is not None and record.run is not None:
                record = record.model_copy(update={"run": admission.present(record.run)})
            location = {"Location": f"/api/conversations/{record.id}"}
            return idempotency.answer(record, 201, location)

        record, created = sup.store.create_conversation(fields, answer=render)
        if not created:  # a key stored without its answer (by an older version)
            raise Replayed(render(record))
        return record, render(record)

    if body.run:
        (_, sent), _ = await sup.admit(
            conversation_id, write, lambda result: result[0], tenant=tenant
        )
    else:
        _, sent = await sup.io(write, None)
    sup.server_feed.conversation_changed(conversation_id, "created")  # not on a replay
    return idempotency.respond(sent)


@blueprint.get("")
@documented(
    "List conversations, newest first, as summaries (agent_kind instead of the agent spec)."
    " A page stays under 1 MiB (it may hold fewer than limit items: follow next_cursor);"
    " a stored record that cannot be read is listed as its id with an error.",
    query=ListConversations,
    response=ConversationList,
)
async def list_conversations() -> Response:
    sup = supervisor()
    query = parse_query(ListConversations)
    principal = current_principal()
    page = await sup.io(
        sup.store.list_conversations,
        status=query.status,
        limit=query.limit,
        cursor=query.cursor,
        tenant=None if principal.admin else principal.tenant,
    )
    summaries = [item for item in page.items if isinstance(item, ConversationSummary)]
    presented = iter(await present(sup, summaries))
    items = [
        next(presented) if isinstance(item, ConversationSummary) else item for item in page.items
    ]
    return json_response(ConversationList(items=items, next_cursor=page.next_cursor))


@blueprint.get("/<conversation_id>")
@documented("A conversation with its current run.", response=ConversationRecord, errors=(404,))
async def get_conversation(conversation_id: str) -> Response:
    sup = supervisor()
    [conversation] = await present(sup, [await http.get_conversation(sup, conversation_id)])
    return json_response(conversation)


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
    "Append a user message; with run=true start a run (if_busy defaults to enqueue),"
    " atomically: a refused run stores no message. Idempotent with an Idempotency-Key.",
    status=202,
    body=PostMessage,
    response=MessageAccepted,
    errors=(404, 409, 429, 503),
    headers=("Idempotency-Key",),
)
@idempotency.guarded
async def post_message(conversation_id: str) -> Response:
    sup = supervisor()
    body, raw = await parse_body(PostMessage)
    await http.get_conversation(sup, conversation_id)
    key = idempotency.request_key(raw)
    await idempotency.replay_if_known(sup, key)
    payload = MessagePayload(text=body.content)

    def write(admission: Admission | None) -> tuple[MessageWritten, Answer]:
        @idempotency.RenderOnce
        def render(written: MessageWritten) -> Answer:
            run = written.run
            if run is not None and admission is not None:
                run = admission.present(run)
            return idempotency.answer(MessageAccepted(event=written.event, run=run), 202)

        new_run = None
        if admission is not None:
            new_run = admission.new_run
        keyed = IdempotentWrite(key[0], key[1], render) if key else None
        written = sup.store.append_message(conversation_id, payload, run=new_run, idempotent=keyed)
        return written, render(written)

    if body.run:
        (_, sent), _ = await sup.admit(
            conversation_id, write, lambda result: result[0].conversation, if_busy=body.if_busy
        )
    else:
        _, sent = await sup.io(write, None)
    return idempotency.respond(sent)
