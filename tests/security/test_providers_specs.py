"""Agent specs cannot name secrets or endpoints: they pick one of the operator's providers.

Real server, real HTTP, real stand-in providers (``FakeChatServer``): a spec that still
carries ``base_url`` or ``api_key_env`` is refused naming the setting that replaced it, an
unknown provider is refused, and each provider's key goes to that provider alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from app.settings import LLMSettings, ProviderSettings, Settings
from app.store import NewConversation, SqliteStore
from app.testing_llm import FakeChatServer, text_reply
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

ALPHA_KEY = "sk-alpha-0000-1111-2222"
BETA_KEY = "sk-beta-3333-4444-5555"


@pytest.fixture
def alpha() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


@pytest.fixture
def beta() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


@pytest.fixture
def two_providers(
    tmp_path: Path, alpha: FakeChatServer, beta: FakeChatServer, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """``default`` is alpha (with ALPHA_KEY), ``beta`` is beta (with BETA_KEY)."""
    monkeypatch.setenv("TRELLIS_TEST_ALPHA_KEY", ALPHA_KEY)
    monkeypatch.setenv("TRELLIS_TEST_BETA_KEY", BETA_KEY)
    beta_table = ProviderSettings(
        base_url=beta.url, api_key_env="TRELLIS_TEST_BETA_KEY", model="beta-model", max_retries=0
    )
    llm = LLMSettings(
        base_url=alpha.url,
        api_key_env="TRELLIS_TEST_ALPHA_KEY",
        model="alpha-model",
        max_retries=0,
        providers={"beta": beta_table},
    )
    return Settings(data_dir=tmp_path / "data", llm=llm)


async def run_over_http(server: LiveServer, agent: dict[str, Any]) -> dict[str, Any]:
    """Create a conversation with ``agent`` and a first message, run it, return its end."""
    created = await server.client.post(
        "/api/conversations", json={"agent": agent, "initial_message": "hi", "run": True}
    )
    assert created.status_code == 201, created.text
    conversation = created.json()
    path = f"/api/conversations/{conversation['id']}/runs/{conversation['run']['id']}/wait"
    with trio.fail_after(15):
        ended = await server.client.get(path, params={"timeout": 10})
    assert ended.status_code == 200, ended.text
    run: dict[str, Any] = ended.json()
    assert run["status"] in ("finished", "error"), run
    return run


def refused(response: httpx.Response) -> str:
    """The text of a 422 answer (message and detail)."""
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error", response.text
    return response.text


async def stored_conversations(server: LiveServer) -> list[Any]:
    listed = await server.client.get("/api/conversations")
    assert listed.status_code == 200, listed.text
    items: list[Any] = listed.json()["items"]
    return items


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        pytest.param(
            "base_url", "http://attacker.example/v1", "[llm.providers.NAME] base_url", id="url"
        ),
        pytest.param("api_key_env", "AWS_SECRET", "[llm.providers.NAME] api_key_env", id="env"),
    ],
)
async def test_providers_spec_naming_an_endpoint_or_variable_is_refused_naming_the_setting(
    two_providers: Settings,
    alpha: FakeChatServer,
    beta: FakeChatServer,
    field: str,
    value: str,
    setting: str,
) -> None:
    """A spec with base_url or api_key_env gets a 422 naming the operator's setting, stores
    nothing, and no provider is asked anything."""
    async with live_server(two_providers) as server:
        agent = {"kind": "llm", field: value}
        response = await server.client.post(
            "/api/conversations", json={"agent": agent, "initial_message": "hi", "run": True}
        )
        text = refused(response)
        assert setting in text
        detail = response.json()["error"]["detail"]
        assert [item["loc"] for item in detail] == [["body", "agent", field]]
        assert await stored_conversations(server) == []
    assert alpha.requests == beta.requests == []


async def test_providers_unknown_provider_is_refused_before_anything_is_stored(
    two_providers: Settings, alpha: FakeChatServer, beta: FakeChatServer
) -> None:
    """``"provider": "gamma"`` on a server with default and beta is a 422 listing those."""
    async with live_server(two_providers) as server:
        response = await server.client.post(
            "/api/conversations",
            json={"agent": {"kind": "llm", "provider": "gamma"}, "run": True},
        )
        text = refused(response)
        assert "unknown provider 'gamma'" in text
        assert "['default', 'beta']" in text
        assert await stored_conversations(server) == []
    assert alpha.requests == beta.requests == []


async def test_providers_each_key_goes_only_to_its_own_provider(
    two_providers: Settings, alpha: FakeChatServer, beta: FakeChatServer
) -> None:
    """A spec choosing beta reaches beta with beta's key and model; a spec choosing nothing
    reaches the default (alpha) with alpha's key; neither sees the other's key."""
    alpha.add(text_reply("from alpha"))
    beta.add(text_reply("from beta"))
    async with live_server(two_providers) as server:
        chose_beta = await run_over_http(server, {"kind": "llm", "provider": "beta"})
        chose_default = await run_over_http(server, {"kind": "llm"})
    assert chose_beta["status"] == chose_default["status"] == "finished"
    (to_beta,), (to_alpha,) = beta.requests, alpha.requests
    assert to_beta.headers["Authorization"] == f"Bearer {BETA_KEY}"
    assert to_alpha.headers["Authorization"] == f"Bearer {ALPHA_KEY}"
    assert (to_beta.body["model"], to_alpha.body["model"]) == ("beta-model", "alpha-model")
    assert ALPHA_KEY not in str(to_beta) and BETA_KEY not in str(to_alpha)


async def test_providers_spec_model_overrides_the_providers_model(
    two_providers: Settings, beta: FakeChatServer
) -> None:
    """A spec may still choose the model (and temperature) of the provider it picks."""
    beta.add(text_reply("ok"))
    async with live_server(two_providers) as server:
        agent = {"kind": "llm", "provider": "beta", "model": "beta-large", "temperature": 0.5}
        assert (await run_over_http(server, agent))["status"] == "finished"
    assert (beta.requests[0].body["model"], beta.requests[0].body["temperature"]) == (
        "beta-large",
        0.5,
    )


async def test_providers_spec_stored_before_the_change_cannot_reach_its_url(
    tmp_path: Path, alpha: FakeChatServer, beta: FakeChatServer
) -> None:
    """A conversation stored with a spec naming its own base_url (as older servers
    accepted) gets a run error naming the setting; that URL is never called."""
    settings = Settings(data_dir=tmp_path / "data", llm=LLMSettings(base_url=alpha.url))
    settings.data_dir.mkdir()
    store = SqliteStore(settings.database_path)
    try:
        agent = {"kind": "llm", "base_url": beta.url, "api_key_env": "HOME"}
        new = NewConversation(agent=agent, title=None, max_iterations=5, initial_message="hi")
        conversation, _ = store.create_conversation(new)
    finally:
        store.close()
    async with live_server(settings) as server:
        path = f"/api/conversations/{conversation.id}/runs"
        started = await server.client.post(path)
        assert started.status_code == 202, started.text
        with trio.fail_after(15):
            ended = await server.client.get(
                f"{path}/{started.json()['id']}/wait", params={"timeout": 10}
            )
    run = ended.json()
    assert (run["status"], run["reason"]) == ("error", "agent_error")
    assert "[llm.providers.NAME] base_url" in run["error"]
    assert beta.requests == alpha.requests == []
