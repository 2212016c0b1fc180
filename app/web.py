"""``create_app(settings)``: the Quart-Trio app, wired to one store and one supervisor.

Lifetime (who owns what):

* ``before_serving`` starts the supervisor with ``await app.nursery.start(supervisor.serve)``
  — quart-trio's ``app.nursery`` lives in the ASGI lifespan task, so runs live exactly as
  long as the app serves. Without a ``store`` argument it first opens the SQLite store
  itself (tests use ``app.test_app()`` this way); ``python -m app serve`` opens the store
  beforehand, so that a data directory that cannot be used fails before anything serves.
* ``after_serving`` drains the supervisor (every run stopped with reason ``shutdown``, every
  thread joined, every final status stored) and closes the store *if it opened it* — a
  store passed in belongs to the caller. Hypercorn cancels the lifespan nursery right after
  this returns, so nothing may be left running in it.

``python -m app serve`` drains earlier, as soon as the signal arrives (see
``app/cli/serving.py``); the drain in ``after_serving`` then finds nothing left to do.

Every request first passes the guards of ``app/api/guards.py`` (Host, Origin, a JSON body)
and, with API keys, ``app/auth.py`` (its key, and so its tenant). It is logged as one line
when its response is ready: method, path (never the query string), status, milliseconds
and, with keys, the ``key_id`` — never headers, bodies or keys.
"""

from __future__ import annotations

import logging
import time

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from app.agents.registry import AgentRegistry
from app.api import (
    cluster,
    connection,
    conversations,
    dashboard,
    docs_page,
    events,
    metrics_route,
    openapi,
    runs,
    server,
    server_stream,
    streams,
    ws_stream,
)
from app.api.errors import register_error_handlers
from app.api.guards import install_guards
from app.api.http import install_ownership_check
from app.auth import install_auth
from app.logs import log_fields
from app.settings import Settings
from app.store.base import EventStore
from app.store.opening import open_store
from app.supervisor import RunSupervisor
from app.tools.calls import ToolRegistry

request_log = logging.getLogger("trellis.http")


def create_app(
    settings: Settings | None = None,
    *,
    registry: AgentRegistry | None = None,
    tools: ToolRegistry | None = None,
    store: EventStore | None = None,
) -> QuartTrio:
    """Build the app. Nothing is opened until the app starts serving.

    ``store``: an open store to serve; the caller keeps it and closes it after the app
    stopped serving. Without one, the app opens the store the settings name
    (``app/store/opening.py``) and closes it.
    """
    settings = settings or Settings()
    app = QuartTrio("trellis", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    for module in (conversations, runs, events, streams, ws_stream, server_stream, server, openapi):
        app.register_blueprint(module.blueprint)
    app.register_blueprint(cluster.blueprint)  # GET /api/cluster
    app.register_blueprint(dashboard.blueprint)  # GET / and /static/<name>
    app.register_blueprint(docs_page.blueprint)  # GET /docs and /docs/<name>
    app.register_blueprint(metrics_route.blueprint)  # GET /metrics
    register_error_handlers(app)
    _log_requests(app)
    install_guards(app, settings)  # after the clock starts: a refused request is logged too
    install_auth(app, settings)  # after the guards: API keys, the request's principal
    install_ownership_check(app)  # after auth: another tenant's conversation is a 404
    connection.install(app)  # a body left unread never stalls its keep-alive connection
    # Blocking store open/close go to a thread on a limiter of their own (never Trio's
    # default one).
    lifetime_limiter = trio.CapacityLimiter(1)

    @app.before_serving
    async def open_supervisor() -> None:
        opened = store
        if opened is None:
            opened = await trio.to_thread.run_sync(open_store, settings, limiter=lifetime_limiter)
        supervisor = RunSupervisor(settings, opened, registry, tools)
        app.extensions["trellis.supervisor"] = supervisor
        await app.nursery.start(supervisor.serve)

    @app.after_serving
    async def close_supervisor() -> None:
        supervisor: RunSupervisor = app.extensions["trellis.supervisor"]
        await supervisor.aclose()
        if store is None:  # the store this app opened
            await trio.to_thread.run_sync(supervisor.store.close, limiter=lifetime_limiter)

    return app


def _log_requests(app: QuartTrio) -> None:
    """One line per request: ``GET /api/server 200 1.3ms``, plus the same as fields; and
    its duration in the supervisor's metrics (see :func:`_observe`)."""

    @app.before_request
    async def start_clock() -> None:
        g.trellis_started = time.perf_counter()

    @app.after_request
    async def log_request(response: Response) -> Response:
        started = g.get("trellis_started")
        seconds = time.perf_counter() - started if started is not None else None
        ms = round(seconds * 1000, 1) if seconds is not None else None
        _observe(app, response, seconds)
        log_fields(
            request_log,
            "{method} {path} {status} {ms}ms",
            method=request.method,
            path=request.path,
            status=response.status_code,
            ms=ms,
            **({"key_id": key_id} if (key_id := g.get("trellis_key_id")) else {}),
        )
        return response


def _observe(app: QuartTrio, response: Response, seconds: float | None) -> None:
    """Observe the request in ``trellis_http_request_duration_seconds``, labelled with its
    route template (``request.url_rule.rule``, never the path: a bounded set of series).

    Hooks run when the response *starts*: a stream's duration is its time to first byte,
    not how long the client stayed connected."""
    sup: RunSupervisor | None = app.extensions.get("trellis.supervisor")
    if sup is None or seconds is None:
        return
    rule = request.url_rule.rule if request.url_rule is not None else None
    sup.metrics.observe_http(request.method, rule, response.status_code, seconds)
