"""End to end in one process: real Hypercorn (trio worker) on port 0, driven by httpx."""

from __future__ import annotations

from functools import partial

import httpx
import hypercorn.trio
import pytest
import trio
from hypercorn.config import Config

from app.settings import Settings
from app.store import SqliteStore
from app.testing import Gates, gated_registry
from app.web import create_app
from tests.conftest import gated, script

pytestmark = pytest.mark.timeout(30)


async def test_real_server_runs_a_conversation_and_shuts_down_cleanly(
    settings: Settings, gates: Gates
) -> None:
    """Over real HTTP: create, run, read events; shutdown pauses the running run."""
    app = create_app(settings, registry=gated_registry(gates))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1.0
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
            )
            async with httpx.AsyncClient(base_url=binds[0]) as client:
                created = await client.post(
                    "/api/conversations",
                    json={"agent": script({"say": "hi"}, {"finish": "bye"}), "run": True},
                )
                assert created.status_code == 201
                conversation = created.json()
                run_path = (
                    f"/api/conversations/{conversation['id']}/runs/{conversation['run']['id']}"
                )
                done = await client.get(f"{run_path}/wait", params={"timeout": 5})
                assert done.json()["status"] == "finished"
                events = await client.get(f"/api/conversations/{conversation['id']}/events")
                texts = [e["payload"].get("text") for e in events.json()["items"]]
                assert [t for t in texts if t] == ["hi", "bye"]

                busy = await client.post(
                    "/api/conversations", json={"agent": gated("held"), "run": True}
                )
                await gates["held"].wait_entered()
            stop.set()
    supervisor = app.extensions["trellis.supervisor"]
    assert supervisor.statistics().run_threads_alive == 0
    reopened = SqliteStore(settings.database_path)  # the app closed its own store
    try:
        run = reopened.get_conversation(busy.json()["id"]).run
    finally:
        reopened.close()
    assert run is not None
    assert (run.status, run.reason) == ("paused", "shutdown")
