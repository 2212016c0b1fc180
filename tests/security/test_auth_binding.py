"""Binding and browsers: non-loopback binds need keys; CORS for allowed origins only.

The binding rules are checked through the command line (in process, with the server
replaced by a recorder) and with a real ``python -m app serve`` on ``0.0.0.0``; CORS and
Host handling with a real Hypercorn server on port 0.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import app.cli
from app.settings import Settings
from tests.live import live_server
from tests.security.test_auth_tenants import ALICE, KEYS
from tests.test_cli import clean_environ_and_logging  # noqa: F401 - autouse: restores logging
from tests.test_process import Server

pytestmark = pytest.mark.timeout(60)

UI = "https://ui.example.com"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the server with a recorder: what ``main`` would have served."""
    recorded: list[Settings] = []

    async def fake_serve(settings: Settings) -> int:
        recorded.append(settings)
        return 0

    monkeypatch.setattr(app.cli, "serve", fake_serve)
    return recorded


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_non_loopback_bind_needs_keys_or_the_insecure_flag(
    served: list[Settings],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    host: str,
) -> None:
    """Without keys: exit 2 naming the way out; with --insecure-no-auth: served, with a
    warning on stderr; with keys (a file or TRELLIS_API_KEYS): served, no warning."""
    assert app.cli.main(["serve", "--host", host]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err
    assert served == []

    assert app.cli.main(["serve", "--host", host, "--insecure-no-auth"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert app.cli.main(["serve", "--host", host, "--api-keys-file", str(keys_file(tmp_path))]) == 0
    monkeypatch.setenv("TRELLIS_API_KEYS", json.dumps(KEYS[:1]))
    assert app.cli.main(["serve", "--host", host]) == 0
    err = capsys.readouterr().err
    assert "WARNING" not in err and ALICE not in err
    assert [settings.host for settings in served] == [host] * 3


def test_a_bad_keys_file_stops_start_up_without_echoing_a_key(
    served: list[Settings], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A keys file with a bad entry: exit 2, the file named, the key not shown."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"key": ALICE, "tenant": "no spaces"}]))
    assert app.cli.main(["serve", "--api-keys-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "tenant" in err and ALICE not in err
    assert served == []


@pytest.mark.slow
def test_container_bind_with_keys_answers_on_loopback(tmp_path: Path) -> None:
    """A real ``serve --host 0.0.0.0`` with a keys file answers on 127.0.0.1: 401 without
    a key, 200 with one, whatever Host the client used; SIGTERM exits 0."""
    server = Server(
        tmp_path / "data", "--host", "0.0.0.0", "--api-keys-file", str(keys_file(tmp_path))
    )
    try:
        port = server.url.rsplit(":", 1)[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            refused = client.get("/api/conversations", headers={"Host": "trellis.internal"})
            assert refused.status_code == 401, refused.text
            headers = {"Authorization": f"Bearer {ALICE}", "Host": "trellis.internal"}
            assert client.get("/api/conversations", headers=headers).status_code == 200
            assert client.get("/health").status_code == 200
        code, _, stderr = server.stop(signal.SIGTERM)
        assert code == 0, stderr
        assert ALICE not in stderr
    finally:
        server.client.close()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        if server.process.stdout is not None:
            server.process.stdout.close()
        server.stderr_file.close()


@pytest.mark.parametrize(
    ("fields", "host", "status"),
    [
        pytest.param({"api_keys": KEYS}, "anything.example", 401, id="keys-any-host"),
        pytest.param(
            {"api_keys": KEYS, "allowed_hosts": ["ok.example"]}, "other.example", 421, id="hosts"
        ),
        pytest.param({"allowed_hosts": ["ok.example"]}, "ok.example", 200, id="allowed"),
        pytest.param({}, "anything.example", 421, id="no-keys"),
    ],
)
async def test_wildcard_bind_host_check(
    settings: Settings, fields: dict[str, Any], host: str, status: int
) -> None:
    """With host 0.0.0.0 and keys, any Host is accepted (the key protects: 401 without);
    with allowed_hosts, or without keys, Host names are still checked (421)."""
    configured = Settings(**{**settings.model_dump(), "host": "0.0.0.0", **fields})
    with trio.fail_after(20):
        async with live_server(configured) as server:
            answer = await server.client.get("/api/conversations", headers={"Host": host})
    assert answer.status_code == status, answer.text


async def test_cors_for_allowed_origins_only(settings: Settings) -> None:
    """An allowed origin's preflight gets 204 with methods, headers and max age (no key
    needed); its requests' answers — errors included — carry Access-Control-Allow-Origin
    and Vary: Origin. Another origin's preflight is 403 and gets no CORS header."""
    configured = settings.model_copy(
        update={"api_keys": Settings(api_keys=KEYS).api_keys, "allowed_origins": [UI]}
    )
    preflight = {"Origin": UI, "Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization, content-type"
    with trio.fail_after(20):
        async with live_server(configured) as server:
            client = server.client
            answer = await client.options("/api/conversations", headers=preflight)
            assert answer.status_code == 204, answer.text
            assert answer.headers["Access-Control-Allow-Origin"] == UI
            assert "POST" in answer.headers["Access-Control-Allow-Methods"]
            allowed = answer.headers["Access-Control-Allow-Headers"]
            for name in ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"):
                assert name in allowed
            assert int(answer.headers["Access-Control-Max-Age"]) > 0
            assert "Origin" in answer.headers["Vary"]

            foreign = await client.options(
                "/api/conversations", headers=preflight | {"Origin": "https://evil.example"}
            )
            assert foreign.status_code == 403
            assert "Access-Control-Allow-Origin" not in foreign.headers

            auth = {"Origin": UI, "Authorization": f"Bearer {ALICE}"}
            listed = await client.get("/api/conversations", headers=auth)
            assert listed.status_code == 200
            assert listed.headers["Access-Control-Allow-Origin"] == UI
            assert "Origin" in listed.headers["Vary"]
            refused = await client.get("/api/conversations", headers={"Origin": UI})
            assert refused.status_code == 401
            assert refused.headers["Access-Control-Allow-Origin"] == UI
            plain = await client.get(
                "/api/conversations", headers={"Authorization": auth["Authorization"]}
            )
            assert "Access-Control-Allow-Origin" not in plain.headers


async def test_no_cors_headers_without_allowed_origins(settings: Settings) -> None:
    """By default no origin is allowed: a preflight is 403 and nothing says CORS."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            answer = await server.client.options(
                "/api/conversations",
                headers={"Origin": UI, "Access-Control-Request-Method": "GET"},
            )
    assert answer.status_code == 403
    assert not [name for name in answer.headers if name.lower().startswith("access-control")]
