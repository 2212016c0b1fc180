"""Event search, count, and one event by id."""

from __future__ import annotations

from quart import Blueprint, Response

from app.api.http import json_response, parse_query, supervisor
from app.store.base import EventQuery, Order

blueprint = Blueprint("events", __name__, url_prefix="/api/conversations/<conversation_id>/events")


@blueprint.get("")
async def search_events(conversation_id: str) -> Response:
    """Ascending pages end with ``next_after_seq``, descending ones with ``next_before_seq``:
    pass it back as ``after_seq`` / ``before_seq`` for the next page (``null`` at the end)."""
    sup = supervisor()
    query = parse_query(EventQuery)
    page = await sup.io(sup.store.search_events, conversation_id, query)
    cursor = "next_after_seq" if query.order is Order.ASC else "next_before_seq"
    return json_response({"items": page.items, cursor: page.next_seq})


@blueprint.get("/count")
async def count_events(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(EventQuery)
    return json_response({"count": await sup.io(sup.store.count_events, conversation_id, query)})


@blueprint.get("/<event_id>")
async def get_event(conversation_id: str, event_id: str) -> Response:
    sup = supervisor()
    return json_response(await sup.io(sup.store.get_event, conversation_id, event_id))
