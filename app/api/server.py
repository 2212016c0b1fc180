"""Server-wide routes: limits and live statistics, liveness and readiness."""

from __future__ import annotations

import dataclasses

from quart import Blueprint, Response

from app.api.http import json_response, parse_body, supervisor
from app.api.schemas import Limits
from app.errors import ShuttingDown

blueprint = Blueprint("server", __name__)


def _server_info() -> dict[str, object]:
    from app import __version__

    sup = supervisor()
    stats = sup.statistics()
    return {
        "version": __version__,
        "limits": {
            "max_concurrent_runs": stats.max_concurrent_runs,
            "max_queued_runs": stats.max_queued_runs,
            "io_threads": stats.io_total,
            "tool_threads": stats.tool_total,
            "max_iterations": sup.settings.max_iterations,
        },
        "statistics": dataclasses.asdict(stats),
    }


@blueprint.get("/api/server")
async def server() -> Response:
    return json_response(_server_info())


@blueprint.patch("/api/server/limits")
async def patch_limits() -> Response:
    body, _ = await parse_body(Limits)
    supervisor().set_limits(
        max_concurrent_runs=body.max_concurrent_runs, max_queued_runs=body.max_queued_runs
    )
    return json_response(_server_info())


@blueprint.get("/health")
async def health() -> Response:
    """Liveness: the process answers. Stays 200 while draining."""
    return json_response({"status": "ok"})


@blueprint.get("/ready")
async def ready() -> Response:
    """Readiness: 503 while draining (load balancers stop sending new work)."""
    if supervisor().draining:
        raise ShuttingDown("the server is draining and will stop soon")
    return json_response({"status": "ready"})
