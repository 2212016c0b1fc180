"""API keys: every /api route, stream and WebSocket needs one; keys are never shown.

Each test talks to a real server (Hypercorn on port 0, httpx or a wsproto client) with
keys from the settings, the environment (``TRELLIS_API_KEYS``) or ``api_keys_file``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from app.settings import Settings, SettingsError, resolve_settings
from app.web import create_app
from tests.live import live_server
from tests.test_streams_ws import Closed, Refused, ws

pytestmark = pytest.mark.timeout(30)

ALICE = "alice-key-0123456789abcdef"
ROOT = "root-key-0123456789abcdef00"
KEYS = [{"key": ALICE, "tenant": "alice"}, {"key": ROOT, "tenant": "ops", "admin": True}]
SCRIPT = {"agent": {"kind": "script", "steps": [{"say": "x"}]}, "initial_message": "hi"}


def keyed(settings: Settings, **more: Any) -> Settings:
    return settings.model_copy(update={"api_keys": Settings(api_keys=KEYS).api_keys, **more})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"


ROUTES = [
    pytest.param("GET", "/api/conversations", id="list"),
    pytest.param("POST", "/api/conversations", id="create"),
    pytest.param("GET", "/api/conversations/nope/events/stream", id="sse"),
    pytest.param("GET", "/api/runs", id="runs"),
    pytest.param("GET", "/api/server", id="server"),
    pytest.param("GET", "/api/cluster", id="cluster"),
    pytest.param("GET", "/api/events/stream", id="server-stream"),
    pytest.param("PATCH", "/api/server/limits", id="limits"),
    pytest.param("GET", "/api/nothing-here", id="unknown"),
]
BAD_AUTH = [
    pytest.param({}, id="none"),
    pytest.param(bearer("wrong-key-0123456789abcdef"), id="wrong"),
    pytest.param({"Authorization": ALICE}, id="no-scheme"),
    pytest.param({"Authorization": f"Basic {ALICE}"}, id="basic"),
    pytest.param({"Authorization": "Bearer"}, id="empty"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_api_without_a_valid_key_is_401_and_nothing_is_created(
    settings: Settings, method: str, path: str
) -> None:
    """No key, a wrong one or a malformed header: 401 unauthorized with WWW-Authenticate:
    Bearer on every /api route, before any handler (nothing is created)."""
    with trio.fail_after(20):
        async with live_server(keyed(settings)) as server:
            for headers in BAD_AUTH:
                body = SCRIPT if method == "POST" else ({} if method == "PATCH" else None)
                response = await server.client.request(
                    method, path, json=body, headers=headers.values[0]
                )
                assert_unauthorized(response)
                assert ALICE not in response.text
            listed = await server.client.get("/api/conversations", headers=bearer(ROOT))
            assert listed.status_code == 200
            assert listed.json()["items"] == []


async def test_a_valid_key_is_let_in_and_logged_by_key_id_only(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A valid key (in any scheme case) is let in; the log names its key_id (tenant and
    digest prefix) and never the key, refused ones included."""
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(20):
        async with live_server(keyed(settings)) as server:
            created = await server.client.post(
                "/api/conversations", json=SCRIPT, headers={"Authorization": f"bearer {ALICE}"}
            )
            assert created.status_code == 201, created.text
            wrong = await server.client.get("/api/conversations", headers=bearer(ALICE + "x"))
            assert_unauthorized(wrong)
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    key_id = "alice:" + hashlib.sha256(ALICE.encode()).hexdigest()[:8]
    assert key_id in text
    assert ALICE not in text


async def test_key_sha256_entry_accepts_the_key(settings: Settings) -> None:
    """An entry given as key_sha256 accepts the key whose digest it is, and only it."""
    digest = hashlib.sha256(ALICE.encode()).hexdigest()
    entries = Settings(api_keys=[{"key_sha256": digest.upper(), "tenant": "alice"}]).api_keys
    with trio.fail_after(20):
        async with live_server(settings.model_copy(update={"api_keys": entries})) as server:
            ok = await server.client.get("/api/conversations", headers=bearer(ALICE))
            assert ok.status_code == 200, ok.text
            assert_unauthorized(
                await server.client.get("/api/conversations", headers=bearer(digest))
            )


@pytest.mark.parametrize("source", ["env", "toml-file", "json-file"])
async def test_keys_from_environment_and_keys_file(
    settings: Settings, tmp_path: Path, source: str
) -> None:
    """TRELLIS_API_KEYS (JSON) and api_keys_file (TOML [[api_keys]] or a JSON array) both
    configure keys."""
    environ = {"TRELLIS_DATA_DIR": str(settings.data_dir)}
    if source == "env":
        environ["TRELLIS_API_KEYS"] = json.dumps(KEYS)
    elif source == "toml-file":
        path = tmp_path / "keys.toml"
        path.write_text(
            f'[[api_keys]]\nkey = "{ALICE}"\ntenant = "alice"\n'
            f'[[api_keys]]\nkey = "{ROOT}"\ntenant = "ops"\nadmin = true\n'
        )
        environ["TRELLIS_API_KEYS_FILE"] = str(path)
    else:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(KEYS))
        environ["TRELLIS_API_KEYS_FILE"] = str(path)
    loaded = resolve_settings(environ=environ).settings
    with trio.fail_after(20):
        async with live_server(loaded) as server:
            assert_unauthorized(await server.client.get("/api/conversations"))
            ok = await server.client.get("/api/conversations", headers=bearer(ALICE))
            assert ok.status_code == 200, ok.text
            admin = await server.client.get("/api/server", headers=bearer(ROOT))
            assert admin.status_code == 200, admin.text


async def test_keys_are_never_shown_in_server_settings(settings: Settings) -> None:
    """GET /api/server (admin) shows the key entries masked: neither a key nor a digest."""
    sha = hashlib.sha256(b"another-key-0123456789").hexdigest()
    entries = [*KEYS, {"key_sha256": sha, "tenant": "bob"}]
    with trio.fail_after(20):
        async with live_server(settings.model_copy(update={
            "api_keys": Settings(api_keys=entries).api_keys
        })) as server:  # fmt: skip
            answer = await server.client.get("/api/server", headers=bearer(ROOT))
    assert answer.status_code == 200, answer.text
    assert ALICE not in answer.text and ROOT not in answer.text and sha not in answer.text
    shown = answer.json()["settings"]["api_keys"]
    assert [entry["tenant"] for entry in shown] == ["alice", "ops", "bob"]
    assert "***" in json.dumps(shown)
    assert ALICE not in repr(Settings(api_keys=KEYS))


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param([KEYS[0], {"key": ALICE, "tenant": "x"}], "same key", id="duplicate"),
        pytest.param(
            [KEYS[0], {"key_sha256": hashlib.sha256(ALICE.encode()).hexdigest(), "tenant": "x"}],
            "same key",
            id="duplicate-digest",
        ),
        pytest.param([{"key": ALICE, "tenant": "a/b"}], "tenant", id="bad-tenant"),
        pytest.param([{"key": ALICE[:8], "tenant": "a"}], "key", id="short"),
        pytest.param(
            [{"key": ALICE, "key_sha256": "0" * 64, "tenant": "a"}], "exactly one", id="both"
        ),
    ],
)
@pytest.mark.parametrize("source", ["env", "file"])
def test_bad_key_entries_are_a_startup_error_that_never_echoes_a_key(
    tmp_path: Path, entries: list[dict[str, Any]], expected: str, source: str
) -> None:
    """Duplicates, bad tenant names, short keys: an error naming the source and the field,
    never the key."""
    environ = {"TRELLIS_DATA_DIR": str(tmp_path)}
    if source == "env":
        environ["TRELLIS_API_KEYS"] = json.dumps(entries)
    else:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(entries))
        environ["TRELLIS_API_KEYS_FILE"] = str(path)
    with pytest.raises(SettingsError) as caught:
        create_app(resolve_settings(environ=environ).settings)
    message = str(caught.value)
    assert expected in message
    assert ("TRELLIS_API_KEYS" if source == "env" else "keys.json") in message
    assert ALICE not in message and ALICE[:8] not in message


async def test_open_paths_stay_open_and_metrics_follow_the_setting(settings: Settings) -> None:
    """/health, /ready, the dashboard, /openapi.json answer without a key; /metrics too,
    unless metrics_require_key is set (then 401 without, 200 with a key)."""
    with trio.fail_after(20):
        async with live_server(keyed(settings)) as server:
            for path in ("/health", "/ready", "/", "/openapi.json", "/metrics"):
                response = await server.client.get(path)
                assert response.status_code == 200, (path, response.text)
        async with live_server(keyed(settings, metrics_require_key=True)) as server:
            assert_unauthorized(await server.client.get("/metrics"))
            ok = await server.client.get("/metrics", headers=bearer(ALICE))
            assert ok.status_code == 200
            assert (await server.client.get("/health")).status_code == 200


async def test_websocket_needs_a_key_in_its_handshake_or_first_frame(settings: Settings) -> None:
    """A WebSocket with a valid Authorization header streams; a wrong header is refused
    with 401 before the handshake; without a header, a first frame {type: auth, key}
    authenticates it, and any other first frame closes it with 4401."""
    with trio.fail_after(20):
        async with live_server(keyed(settings)) as server:
            created = await server.client.post(
                "/api/conversations", json=SCRIPT, headers=bearer(ALICE)
            )
            conversation_id = created.json()["id"]
            async with ws(server, conversation_id, headers=bearer(ALICE)) as client:
                assert (await client.frame())["event"]["seq"] == 1
            with pytest.raises(Refused) as refused:
                async with ws(server, conversation_id, headers=bearer("x" * 20)):
                    pass
            assert refused.value.status == 401
            assert refused.value.body["error"]["code"] == "unauthorized"
            async with ws(server, conversation_id) as client:
                await client.send({"type": "auth", "key": ALICE})
                assert (await client.frame())["event"]["seq"] == 1
            for first in ({"type": "auth", "key": "x" * 20}, {"type": "ping"}):
                async with ws(server, conversation_id) as client:
                    await client.send(first)
                    error = await client.frame()
                    assert error["error"]["code"] == "unauthorized"
                    assert await client.closed() == Closed(4401, "unauthorized")
