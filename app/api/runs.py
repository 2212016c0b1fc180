"""Runs: start, list, read, wait for; pause and interrupt; the server-wide run list."""

from __future__ import annotations

from quart import Blueprint, Response

from app.api.http import json_response, parse_body, parse_query, supervisor
from app.api.schemas import ListRuns, ServerRuns, StartRun, WaitRun
from app.errors import RequestTimeout

blueprint = Blueprint("runs", __name__, url_prefix="/api")


@blueprint.post("/conversations/<conversation_id>/runs")
async def start_run(conversation_id: str) -> Response:
    sup = supervisor()
    body, _ = await parse_body(StartRun, optional=True)
    run = await sup.start_run(conversation_id, if_busy=body.if_busy)
    location = f"/api/conversations/{conversation_id}/runs/{run.id}"
    return json_response(run, 202, {"Location": location})


@blueprint.get("/conversations/<conversation_id>/runs")
async def list_runs(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(ListRuns)
    runs, next_after = await sup.io(
        sup.store.list_runs, conversation_id, limit=query.limit, after=query.after
    )
    items = [sup.with_position(run) for run in runs]
    return json_response({"items": items, "next_after": next_after})


@blueprint.get("/conversations/<conversation_id>/runs/<run_id>")
async def get_run(conversation_id: str, run_id: str) -> Response:
    return json_response(await supervisor().get_run(conversation_id, run_id))


@blueprint.get("/conversations/<conversation_id>/runs/<run_id>/wait")
async def wait_run(conversation_id: str, run_id: str) -> Response:
    sup = supervisor()
    query = parse_query(WaitRun)
    await sup.get_run(conversation_id, run_id)  # 404 before waiting
    run = await sup.wait_run(conversation_id, run_id, query.timeout)
    if run is None:
        raise RequestTimeout(
            f"run {run_id} did not end within {query.timeout} s; call again to keep waiting",
            detail={"run_id": run_id, "timeout": query.timeout},
        )
    return json_response(run)


@blueprint.post("/conversations/<conversation_id>/pause")
async def pause(conversation_id: str) -> Response:
    sup = supervisor()
    await sup.io(sup.store.get_conversation, conversation_id)
    return json_response(await sup.pause(conversation_id), 202)


@blueprint.post("/conversations/<conversation_id>/interrupt")
async def interrupt(conversation_id: str) -> Response:
    sup = supervisor()
    await sup.io(sup.store.get_conversation, conversation_id)
    return json_response(await sup.interrupt(conversation_id), 202)


@blueprint.get("/runs")
async def server_runs() -> Response:
    """Active runs server-wide: running first, then queued in the order they will start."""
    sup = supervisor()
    query = parse_query(ServerRuns)
    records = {run.id: run for run in await sup.io(sup.store.list_active_runs)}
    wanted = {None: (True, False), "running": (True,), "queued": (False,)}[query.status]
    items = [
        records[run_id].model_copy(update={"queue_position": position})
        for run_id, holds_slot, position in sup.active_runs()
        if holds_slot in wanted and run_id in records  # not in records: still being created
    ]
    return json_response({"items": items})
