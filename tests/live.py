"""A real server for tests: the app on Hypercorn (trio worker) on 127.0.0.1:0, with httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import hypercorn.trio
import trio
from hypercorn.config import Config
from quart_trio import QuartTrio

from app.agents.registry import AgentRegistry
from app.settings import Settings
from app.supervisor import RunSupervisor
from app.web import create_app


class LiveServer:
    """The running app, its supervisor and a client bound to it."""

    def __init__(self, app: QuartTrio, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def supervisor(self) -> RunSupervisor:
        sup: RunSupervisor = self.app.extensions["trellis.supervisor"]
        return sup


@asynccontextmanager
async def live_server(
    settings: Settings, registry: AgentRegistry | None = None
) -> AsyncIterator[LiveServer]:
    """Serve ``create_app(settings)`` for the block; shut it down (draining) at the end."""
    app = create_app(settings, registry=registry)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1.0
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
        )
        try:
            async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
                yield LiveServer(app, client)
        finally:
            stop.set()
