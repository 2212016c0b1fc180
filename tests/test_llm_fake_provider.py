"""The fake provider itself: keep-alive, immediate close, and a real provider's strictness."""

from __future__ import annotations

import time

import httpx
import pytest

from app.testing_llm import FakeChatServer, text_reply

pytestmark = pytest.mark.timeout(30)

TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "terminal", "arguments": "{}"}}
    ],
}


def post(client: httpx.Client, provider: FakeChatServer, messages: list[object]) -> httpx.Response:
    return client.post(f"{provider.url}/chat/completions", json={"messages": messages})


def test_fake_provider_closes_at_once_after_serving() -> None:
    """Leaving the block right after a request takes well under serve_forever's 0.5 s poll."""
    with httpx.Client() as client:
        with FakeChatServer() as provider:
            provider.add(text_reply("hi"))
            assert post(client, provider, []).status_code == 200
            started = time.monotonic()
        elapsed = time.monotonic() - started
    assert elapsed < 0.2


def test_fake_provider_keeps_connections_alive() -> None:
    """Two requests of one client arrive over one TCP connection, as with a real provider."""
    with httpx.Client() as client, FakeChatServer() as provider:
        provider.add(text_reply("one"), text_reply("two"))
        assert [post(client, provider, []).status_code for _ in range(2)] == [200, 200]
    assert len({request.client_port for request in provider.requests}) == 1


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        pytest.param([TOOL_CALL], "did not have response messages: a", id="unanswered"),
        pytest.param(
            [TOOL_CALL, {"role": "user", "content": "and?"}],
            "did not have response messages: a",
            id="user-before-answer",
        ),
        pytest.param(
            [{"role": "tool", "tool_call_id": "b", "content": "?"}],
            "must be a response to a preceding message with 'tool_calls'",
            id="orphan-answer",
        ),
    ],
)
def test_fake_provider_rejects_an_invalid_tool_sequence(messages: list[object], error: str) -> None:
    """Like a real provider, an unanswered tool call or an orphan answer gets 400, and the
    scripted reply stays for the next request."""
    with httpx.Client() as client, FakeChatServer() as provider:
        provider.add(text_reply("fine"))
        refused = post(client, provider, messages)
        answered = post(client, provider, [])
    assert refused.status_code == 400
    assert error in refused.json()["error"]["message"]
    assert answered.json()["choices"][0]["message"]["content"] == "fine"
