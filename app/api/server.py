"""Server-wide routes: limits and live statistics, liveness and readiness."""

from __future__ import annotations

from quart import Blueprint, Response

from app.api.http import json_response, parse_body, supervisor
from app.api.openapi import documented
from app.api.schemas import Health, Limits, Ready, ServerInfo, ServerLimits
from app.auth import require_admin
from app.errors import ShuttingDown
from app.store.faults import StoreUnavailable
from app.tools import sandbox
from app.tools.sandbox import ActiveSandbox

blueprint = Blueprint("server", __name__)


async def _active_sandbox() -> ActiveSandbox:
    """The sandbox commands run in: the setting, or what ``auto`` resolved to (probed
    once per process, then a lookup)."""
    settings = supervisor().settings
    if settings.sandbox != "auto":
        return settings.sandbox
    return await sandbox.active("auto", network=settings.sandbox_network)


async def _server_info() -> ServerInfo:
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
    effective = sup.settings.model_copy(
        update={
            "max_concurrent_runs": stats.max_concurrent_runs,
            "max_queued_runs": stats.max_queued_runs,
        }
    )
    return ServerInfo(
        version=__version__,
        limits=limits,
        statistics=stats,
        settings=effective,
        sandbox=await _active_sandbox(),
    )


@blueprint.get("/api/server")
@documented(
    "Version, limits and live statistics (settings included, secrets masked). With API"
    " keys: admin keys only (403 forbidden for others).",
    response=ServerInfo,
    errors=(403,),
)
async def server() -> Response:
    require_admin()
    return json_response(await _server_info())


@blueprint.patch("/api/server/limits")
@documented(
    "Change run limits at runtime: raising slots starts queued runs at once, 0 holds them.",
    body=Limits,
    response=ServerInfo,
    errors=(403,),
)
async def patch_limits() -> Response:
    require_admin()  # before the body is read
    body, _ = await parse_body(Limits)
    supervisor().set_limits(
        max_concurrent_runs=body.max_concurrent_runs, max_queued_runs=body.max_queued_runs
    )
    return json_response(await _server_info())


@blueprint.get("/health")
@documented("Liveness: 200 while the process answers, also while draining.", response=Health)
async def health() -> Response:
    return json_response(Health(status="ok"))


@blueprint.get("/ready")
@documented(
    "Readiness: 503 while draining, and 503 store_unavailable while the store cannot write"
    " (disk full, I/O error, read-only); ready again once a probe write succeeds. Says"
    " which sandbox terminal commands run in.",
    response=Ready,
    errors=(503,),
)
async def ready() -> Response:
    sup = supervisor()
    if sup.draining:
        raise ShuttingDown("the server is draining and will stop soon")
    health = sup.store.health()  # never blocks
    if not health.ok:
        health = await sup.io(sup.store.probe)  # has space come back?
    if not health.ok:
        raise StoreUnavailable(
            f"the store cannot write: {health.error}; free disk space or fix the filesystem",
            detail={
                "error": health.error,
                "failures": health.failures,
                "failing_since": health.failing_since,
            },
        )
    return json_response(Ready(status="ready", sandbox=await _active_sandbox()))
