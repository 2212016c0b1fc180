"""End to end in one process: real Hypercorn (trio worker) on port 0, driven by httpx;
the app's lifetime, ``serve()`` and ``GET /api/server``."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx
import hypercorn.trio
import pytest
import trio
from hypercorn.config import Config

from app.cli import serve
from app.settings import LLMSettings, Settings, load_settings
from app.store import SqliteStore
from app.store.lock import DataDirInUse, DataDirLock
from app.testing import Gates, gated_registry
from app.web import create_app
from tests.conftest import gated, script

pytestmark = pytest.mark.timeout(30)

SECRET = "sk-do-not-print-me"


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


async def test_server_info_shows_effective_settings_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/server shows every setting (runtime limits included) and never a secret."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    settings = load_settings(
        environ={"TRELLIS_LLM__MODEL": "m1", "TRELLIS_LLM__BASE_URL": "http://127.0.0.1:9/v1"},
        data_dir=tmp_path,
    )
    app = create_app(settings)
    with trio.fail_after(10):  # store calls run in threads
        async with app.test_app() as test_app:
            client = test_app.test_client()
            patched = await client.patch("/api/server/limits", json={"max_concurrent_runs": 3})
            assert patched.status_code == 200
            response = await client.get("/api/server")
            body = await response.get_data(as_text=True)
    shown = json.loads(body)["settings"]
    assert shown == json.loads(
        settings.model_copy(update={"max_concurrent_runs": 3}).model_dump_json()
    )
    assert (shown["llm"]["model"], shown["llm"]["base_url"]) == ("m1", "http://127.0.0.1:9/v1")
    assert SECRET not in body
    # Showing every setting is safe because a field whose name looks secret only names the
    # environment variable that holds one — except webhook_secret, which is always masked
    # (tests/test_webhooks.py shows it set and never shown).
    names = [*Settings.model_fields, *(f"llm.{name}" for name in LLMSettings.model_fields)]
    for name in names:
        if any(word in name.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD")):
            # api_keys: each key masked (tests/security/test_auth_keys.py); the others name
            # a file or a flag, not a key; idempotency_key_retention_hours is a duration.
            not_secret = {
                "api_keys",
                "api_keys_file",
                "metrics_require_key",
                "idempotency_key_retention_hours",
            }
            assert name.endswith("_env") or name == "webhook_secret" or name in not_secret, name


async def test_create_app_leaves_a_store_it_was_given_open(settings: Settings) -> None:
    """A store passed to create_app belongs to the caller: still open after the app stopped."""
    store = SqliteStore(settings.database_path)
    try:
        app = create_app(settings, store=store)
        with trio.fail_after(10):  # store calls run in threads
            async with app.test_app() as test_app:
                created = await test_app.test_client().post(
                    "/api/conversations", json={"agent": script({"say": "hi"})}
                )
                assert created.status_code == 201
        assert store.get_conversation((await created.get_json())["id"]).title is None
    finally:
        store.close()


async def test_serve_claims_the_data_dir_until_it_returns(settings: Settings) -> None:
    """serve() holds the data directory while serving: a second serve() on it fails before
    opening anything; once the first is cancelled, the directory is free again."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, settings)
            async with httpx.AsyncClient(base_url=binds[0]) as client:
                assert (await client.get("/health")).status_code == 200
            with pytest.raises(DataDirInUse, match=str(settings.data_dir)):
                await serve(settings)
            nursery.cancel_scope.cancel()
    with DataDirLock(settings.data_dir):  # released on the way out, even when cancelled
        pass
