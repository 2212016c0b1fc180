"""Server-wide routes: limits and live statistics, liveness and readiness."""

from __future__ import annotations

from quart import Blueprint, Response

from app.api.http import json_response, parse_body, supervisor
from app.api.openapi import documented
from app.api.schemas import Health, Limits, ServerInfo, ServerLimits
from app.errors import ShuttingDown

blueprint = Blueprint("server", __name__)


def _server_info() -> ServerInfo:
    from app import __version__

    sup = supervisor()
    stats = sup.statistics()
    limits = ServerLimits(
        max_concurrent_runs=stats.max_concurrent_runs,
        max_queued_runs=stats.max_queued_runs,
        io_threads=stats.io_total,
        tool_threads=stats.tool_total,
        max_iterations=sup.settings.max_iterations,
    )
    return ServerInfo(version=__version__, limits=limits, statistics=stats)


@blueprint.get("/api/server")
@documented("Version, limits and live statistics.", response=ServerInfo)
async def server() -> Response:
    return json_response(_server_info())


@blueprint.patch("/api/server/limits")
@documented(
    "Change run limits at runtime: raising slots starts queued runs at once, 0 holds them.",
    body=Limits,
    response=ServerInfo,
)
async def patch_limits() -> Response:
    body, _ = await parse_body(Limits)
    supervisor().set_limits(
        max_concurrent_runs=body.max_concurrent_runs, max_queued_runs=body.max_queued_runs
    )
    return json_response(_server_info())


@blueprint.get("/health")
@documented("Liveness: 200 while the process answers, also while draining.", response=Health)
async def health() -> Response:
    return json_response(Health(status="ok"))


@blueprint.get("/ready")
@documented("Readiness: 503 while draining.", response=Health, errors=(503,))
async def ready() -> Response:
    if supervisor().draining:
        raise ShuttingDown("the server is draining and will stop soon")
    return json_response(Health(status="ready"))
