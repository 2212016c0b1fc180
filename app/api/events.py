"""Event search, count, and one event by id."""

from __future__ import annotations

from quart import Blueprint, Response

from app.api.http import json_response, parse_query, supervisor
from app.api.openapi import documented
from app.api.schemas import Count, EventList
from app.events import Event
from app.store.base import EventQuery, Order

blueprint = Blueprint("events", __name__, url_prefix="/api/conversations/<conversation_id>/events")


@blueprint.get("")
@documented(
    "Search events. Ascending pages give next_after_seq, descending ones next_before_seq:"
    " pass it back as after_seq / before_seq (null on the last page).",
    query=EventQuery,
    response=EventList,
    errors=(404, 422),
)
async def search_events(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(EventQuery)
    page = await sup.io(sup.store.search_events, conversation_id, query)
    if query.order is Order.ASC:
        return json_response(EventList(items=page.items, next_after_seq=page.next_seq))
    return json_response(EventList(items=page.items, next_before_seq=page.next_seq))


@blueprint.get("/count")
@documented(
    "Count events matching the search filters.", query=EventQuery, response=Count, errors=(404, 422)
)
async def count_events(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(EventQuery)
    count = await sup.io(sup.store.count_events, conversation_id, query)
    return json_response(Count(count=count))


@blueprint.get("/<event_id>")
@documented("One event by id.", response=Event, errors=(404,))
async def get_event(conversation_id: str, event_id: str) -> Response:
    sup = supervisor()
    return json_response(await sup.io(sup.store.get_event, conversation_id, event_id))
