"""Secrets never appear in responses, logs or stored errors.

Real server, real HTTP, a real stand-in provider: a provider that echoes the API key (in an
error or in a completion) cannot put it anywhere a client or a log reader sees it; a
password in a provider's URL is shown masked; the key leaves the server's environment.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import LLMSettings, Settings
from app.testing_llm import FakeChatServer, ScriptedReply, error_reply, text_reply
from tests.live import LiveServer, live_server
from tests.security.test_providers_specs import run_over_http
from tests.test_agent_llm import closed_port
from tests.test_process import Server

pytestmark = pytest.mark.timeout(30)

KEY = "sk-live-echo-5f3a9c0d7e1b2468"
PASSWORD = "pw-s3cret-7731"


@pytest.fixture
def provider() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


async def everything_shown(server: LiveServer, conversation_id: str) -> str:
    """Every answer a client can get about the conversation, concatenated."""
    paths = [
        "/api/conversations",
        f"/api/conversations/{conversation_id}",
        f"/api/conversations/{conversation_id}/events?limit=1000",
        f"/api/conversations/{conversation_id}/runs",
        "/api/runs",
        "/api/server",
    ]
    texts = []
    for path in paths:
        response = await server.client.get(path)
        assert response.status_code == 200, (path, response.text)
        texts.append(response.text)
    return "\n".join(texts)


def stored_bytes(directory: Path) -> bytes:
    """Every byte under ``directory``: the database, its WAL, the workspaces."""
    return b"".join(path.read_bytes() for path in directory.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        pytest.param(
            error_reply(401, f"Incorrect API key provided: {KEY}. Find yours at ..."),
            "error",
            id="in-an-error",
        ),
        pytest.param(text_reply(f"The key you sent me is {KEY}."), "finished", id="in-an-answer"),
        pytest.param(ScriptedReply(200, f"not json {KEY}"), "error", id="in-a-bad-answer"),
    ],
)
async def test_secrets_key_echoed_by_the_provider_is_never_shown_stored_or_logged(
    tmp_path: Path,
    provider: FakeChatServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    reply: ScriptedReply,
    status: str,
) -> None:
    """The provider gets the key and sends it back; it reaches no response, no event, no
    run error, no stored byte and no log line."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TRELLIS_TEST_ECHO_KEY", KEY)
    llm = LLMSettings(base_url=provider.url, api_key_env="TRELLIS_TEST_ECHO_KEY", max_retries=0)
    settings = Settings(data_dir=tmp_path / "data", llm=llm)
    provider.add(reply)
    async with live_server(settings) as server:
        run = await run_over_http(server, {"kind": "llm"})
        shown = await everything_shown(server, run["conversation_id"])
    assert provider.requests[0].headers["Authorization"] == f"Bearer {KEY}"  # it was sent
    assert run["status"] == status
    assert KEY not in shown
    assert "***" in shown  # the echo did arrive, hidden
    assert KEY not in caplog.text
    assert KEY.encode() not in stored_bytes(settings.data_dir)


async def test_secrets_password_in_a_provider_url_is_masked_everywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A base_url with a password is shown as user:***@ in /api/server and in the run's
    error (the provider is unreachable), and logged nowhere in clear."""
    caplog.set_level(logging.DEBUG)
    base_url = f"http://trellis:{PASSWORD}@127.0.0.1:{closed_port()}/v1"
    llm = LLMSettings(base_url=base_url, max_retries=1, backoff_base_seconds=0.01)
    settings = Settings(data_dir=tmp_path / "data", llm=llm)
    async with live_server(settings) as server:
        info = (await server.client.get("/api/server")).json()
        run = await run_over_http(server, {"kind": "llm"})
        shown = await everything_shown(server, run["conversation_id"])
    assert info["settings"]["llm"]["base_url"] == base_url.replace(PASSWORD, "***")
    assert run["status"] == "error"
    assert "cannot reach the model provider at http://trellis:***@127.0.0.1:" in run["error"]
    assert PASSWORD not in shown
    assert PASSWORD not in caplog.text
    assert PASSWORD.encode() not in stored_bytes(settings.data_dir)


@pytest.mark.slow
def test_secrets_key_is_gone_from_the_server_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m app serve`` started with the key in its environment no longer has it in
    /proc/<pid>/environ once it serves (read once, removed, wiped in place)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = Server(tmp_path)  # returns once the server printed that it serves
    try:
        try:
            environ = Path(f"/proc/{server.process.pid}/environ").read_bytes()
        except PermissionError:  # not root, and the server made itself non-dumpable
            environ = b""  # unreadable is as good as wiped
        assert KEY.encode() not in environ
    finally:
        server.client.close()
        code, _, stderr = server.stop(signal.SIGTERM)
        if server.process.stdout is not None:
            server.process.stdout.close()
        server.stderr_file.close()
    assert code == 0, stderr
    assert KEY not in stderr
