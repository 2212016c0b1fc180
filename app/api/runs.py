"""Runs: start, list, read, wait for; pause and interrupt; the server-wide run list."""

from __future__ import annotations

import itertools

from quart import Blueprint, Response

from app.admission import Admission
from app.api import idempotency
from app.api.http import get_conversation, json_response, parse_body, parse_query, supervisor
from app.api.openapi import documented
from app.api.schemas import ListRuns, RunList, ServerRuns, StartRun, WaitRun
from app.auth import current_principal
from app.errors import RequestTimeout
from app.records import ConversationRecord, RunRecord
from app.store.idempotency import Answer, IdempotentWrite

blueprint = Blueprint("runs", __name__, url_prefix="/api")


@blueprint.post("/conversations/<conversation_id>/runs")
@documented(
    "Start a run (body optional). if_busy: reject (409), enqueue, or interrupt the active run."
    " Idempotent with an Idempotency-Key header.",
    status=202,
    body=StartRun,
    response=RunRecord,
    errors=(404, 409, 429, 503),
    headers=("Idempotency-Key",),
)
@idempotency.guarded
async def start_run(conversation_id: str) -> Response:
    sup = supervisor()
    body, raw = await parse_body(StartRun, optional=True)
    key = idempotency.request_key(raw)
    await idempotency.replay_if_known(sup, key)

    def write(admission: Admission) -> tuple[RunRecord, ConversationRecord, Answer]:
        @idempotency.RenderOnce
        def render(run: RunRecord) -> Answer:
            location = {"Location": f"/api/conversations/{conversation_id}/runs/{run.id}"}
            return idempotency.answer(admission.present(run), 202, location)

        keyed = IdempotentWrite(key[0], key[1], render) if key else None
        run, conversation = sup.store.create_run(
            conversation_id,
            run_id=admission.run_id,
            activate=admission.activate,
            reason=admission.reason,
            idempotent=keyed,
            started=admission.seated,
        )
        return run, conversation, render(run)

    (_, _, sent), _ = await sup.admit(
        conversation_id, write, lambda result: result[1], if_busy=body.if_busy
    )
    return idempotency.respond(sent)


@blueprint.get("/conversations/<conversation_id>/runs")
@documented(
    "The conversation's runs, oldest first.", query=ListRuns, response=RunList, errors=(404,)
)
async def list_runs(conversation_id: str) -> Response:
    sup = supervisor()
    query = parse_query(ListRuns)
    runs, next_after = await sup.io(
        sup.store.list_runs, conversation_id, limit=query.limit, after=query.after
    )
    items = await sup.with_positions(runs)
    return json_response(RunList(items=items, next_after=next_after))


@blueprint.get("/conversations/<conversation_id>/runs/<run_id>")
@documented("One run, with its live queue position.", response=RunRecord, errors=(404,))
async def get_run(conversation_id: str, run_id: str) -> Response:
    return json_response(await supervisor().get_run(conversation_id, run_id))


@blueprint.get("/conversations/<conversation_id>/runs/<run_id>/wait")
@documented(
    "Wait until the run has ended (200), or answer 408 at the timeout.",
    query=WaitRun,
    response=RunRecord,
    errors=(404, 408),
)
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
@documented(
    "Stop the active run at its next step boundary (pausing until then).",
    status=202,
    response=RunRecord,
    errors=(404, 409),
)
async def pause(conversation_id: str) -> Response:
    sup = supervisor()
    await get_conversation(sup, conversation_id)  # 404 before 409
    return json_response(await sup.pause(conversation_id), 202)


@blueprint.post("/conversations/<conversation_id>/interrupt")
@documented(
    "Stop the active and enqueued runs now, even mid-step.",
    status=202,
    response=RunRecord,
    errors=(404, 409),
)
async def interrupt(conversation_id: str) -> Response:
    sup = supervisor()
    await get_conversation(sup, conversation_id)  # 404 before 409
    return json_response(await sup.interrupt(conversation_id), 202)


@blueprint.get("/runs")
@documented(
    "Active runs server-wide: running first, then queued in the order they will start"
    " (at most limit of them). A non-admin key sees only its tenant's runs.",
    query=ServerRuns,
    response=RunList,
)
async def server_runs() -> Response:
    sup = supervisor()
    query = parse_query(ServerRuns)
    running = {None: None, "running": True, "queued": False}[query.status]
    principal = current_principal()
    if principal.admin:
        active = sup.active_runs(query.limit, running=running)
    else:  # in memory: the run's tenant is known while it is active
        mine = (
            a for a in sup.active_runs(running=running) if sup.run_tenant(a[0]) == principal.tenant
        )
        active = list(itertools.islice(mine, query.limit))
    records = {run.id: run for run in await sup.io(sup.store.get_runs, [a[0] for a in active])}
    items = [
        records[run_id].model_copy(update={"queue_position": position})
        for run_id, _, position in active
        if run_id in records  # not in records: still being created
    ]
    if sup.desk.clustered:  # the line is the database's: its positions, one read
        items = await sup.with_positions(items)
    return json_response(RunList(items=items))
