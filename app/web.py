"""``create_app(settings)``: the Quart-Trio app, wired to one store and one supervisor.

Lifetime (who owns what):

* ``before_serving`` opens the SQLite store and starts the supervisor with
  ``await app.nursery.start(supervisor.serve)`` — quart-trio's ``app.nursery`` lives in the
  ASGI lifespan task, so runs live exactly as long as the app serves.
* ``after_serving`` drains the supervisor (every run stopped with reason ``shutdown``, every
  thread joined, every final status stored) and closes the store. Hypercorn cancels the
  lifespan nursery right after this returns, so nothing may be left running in it.

``python -m app serve`` drains earlier, as soon as the signal arrives (see ``app/cli.py``);
the drain in ``after_serving`` then finds nothing left to do.
"""

from __future__ import annotations

import trio
from quart_trio import QuartTrio

from app.agents.registry import AgentRegistry
from app.api import conversations, events, openapi, runs, server
from app.api.errors import register_error_handlers
from app.settings import Settings
from app.store.sqlite import SqliteStore
from app.supervisor import RunSupervisor
from app.tools.calls import ToolRegistry


def create_app(
    settings: Settings | None = None,
    *,
    registry: AgentRegistry | None = None,
    tools: ToolRegistry | None = None,
) -> QuartTrio:
    """Build the app. Nothing is opened until the app starts serving."""
    settings = settings or Settings()
    app = QuartTrio("trellis", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_SORT_KEYS"] = False
    for module in (conversations, runs, events, server, openapi):
        app.register_blueprint(module.blueprint)
    register_error_handlers(app)

    @app.before_serving
    async def open_supervisor() -> None:
        # Opening creates the schema: blocking, so in a thread, on a limiter of its own
        # (never Trio's default one).
        store = await trio.to_thread.run_sync(
            SqliteStore, settings.database_path, limiter=trio.CapacityLimiter(1)
        )
        supervisor = RunSupervisor(settings, store, registry, tools)
        app.extensions["trellis.supervisor"] = supervisor
        await app.nursery.start(supervisor.serve)

    @app.after_serving
    async def close_supervisor() -> None:
        supervisor: RunSupervisor = app.extensions["trellis.supervisor"]
        await supervisor.aclose()
        await trio.to_thread.run_sync(supervisor.store.close, limiter=trio.CapacityLimiter(1))

    return app
