"""The fake provider itself: keep-alive, immediate close, a real provider's strictness,
and its streams."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from app.testing_llm import FakeChatServer, text_reply, tool_call_reply

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


def stream(client: httpx.Client, provider: FakeChatServer, **fields: object) -> httpx.Response:
    body = {"messages": [], "stream": True, **fields}
    return client.post(f"{provider.url}/chat/completions", json=body)


def test_fake_provider_streams_a_completion_as_openai_does() -> None:
    """A stream request gets chunked text/event-stream: role chunk, content and tool-call
    arguments in pieces, finish_reason, usage (when asked for), [DONE]; keep-alive."""
    with httpx.Client() as client, FakeChatServer() as provider:
        call = ("terminal", {"command": "echo streamed"})
        provider.add(tool_call_reply([call], text="Running it."), text_reply("Done."))
        usage = {"include_usage": True}
        first, second = stream(client, provider, stream_options=usage), stream(client, provider)
    assert first.headers["Content-Type"] == "text/event-stream"
    assert first.headers["Transfer-Encoding"] == "chunked"
    events = [line.removeprefix("data: ") for line in first.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Running it."
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d]
    assert len(pieces) == 4 and json.loads("".join(pieces)) == call[1]  # name, then 3 pieces
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 15
    assert "usage" not in second.text  # not asked for
    assert len({request.client_port for request in provider.requests}) == 1


def test_fake_provider_without_streaming_answers_plain_json() -> None:
    """FakeChatServer(streaming=False) answers a stream request with the JSON completion."""
    with httpx.Client() as client, FakeChatServer(streaming=False) as provider:
        provider.add(text_reply("plain"))
        answer = stream(client, provider)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["choices"][0]["message"]["content"] == "plain"
