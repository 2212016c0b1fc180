"""``GET /metrics``: the server's metrics for Prometheus (see :mod:`app.metrics`).

The exposition is built on the Trio thread, from the supervisor's own registry: the live
gauges read the same ``statistics()`` record ``GET /api/server`` shows, so the two never
disagree. No store call, no thread hop: a scrape costs a few dozen series' formatting.
"""

from __future__ import annotations

from quart import Blueprint, Response, request

from app.api.http import supervisor
from app.api.openapi import documented

blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
@documented(
    "Metrics in the Prometheus text format (text/plain; version=0.0.4), or OpenMetrics when"
    " the Accept header asks for application/openmetrics-text: runs running and queued,"
    " limits, limiters, queue wait, run duration, pause/interrupt latency, HTTP latency by"
    " route, events appended, stream subscribers and drops, llm requests, retries, tokens.",
    media_type="text/plain",
)
async def metrics() -> Response:
    body, content_type = supervisor().metrics.exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type)
