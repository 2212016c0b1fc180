"""The ``llm`` agent against a real local HTTP server standing in for the model provider."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from app.events import Event
from app.lifecycle import Status
from app.settings import LLMSettings, Settings
from app.store import EventQuery, SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.testing_llm import (
    FakeChatServer,
    ScriptedReply,
    error_reply,
    text_reply,
    tool_call_reply,
)
from app.workspaces import workspace_path
from tests.conftest import assert_all_returned, new_conversation

pytestmark = pytest.mark.timeout(30)

API_KEY = "sk-test-4242-do-not-store"


@pytest.fixture
def provider() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


def with_llm(settings: Settings, base_url: str, **fields: Any) -> Settings:
    """``settings`` whose default provider is ``base_url`` (``[llm]`` keys in ``fields``)."""
    return settings.model_copy(update={"llm": LLMSettings(base_url=base_url, **fields)})


@pytest.fixture
async def sup(
    settings: Settings,
    store: SqliteStore,
    provider: FakeChatServer,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[RunSupervisor]:
    monkeypatch.setenv("TRELLIS_TEST_KEY", API_KEY)
    fast = with_llm(
        settings,
        provider.url,
        api_key_env="TRELLIS_TEST_KEY",
        max_retries=2,
        backoff_base_seconds=0.01,
    )
    async with open_run_supervisor(fast, store) as supervisor:
        yield supervisor
    await supervisor.registry.aclose()  # idempotent: the supervisor may have closed it
    assert_all_returned(supervisor)


def llm(**fields: Any) -> dict[str, Any]:
    return {"kind": "llm", "model": "test-model", **fields}


async def run_to_end(sup: RunSupervisor, agent: dict[str, Any], message: str) -> tuple[Any, Any]:
    conversation = await new_conversation(sup, agent, initial_message=message)
    run = await sup.start_run(conversation.id)
    with trio.fail_after(15):
        ended = await sup.wait_run(conversation.id, run.id, 15)
    assert ended is not None
    return conversation.id, ended


async def events(sup: RunSupervisor, conversation_id: str, kind: str | None = None) -> list[Event]:
    page = await sup.io(sup.store.search_events, conversation_id, EventQuery(kind=kind, limit=1000))
    return page.items


#: Both ways of asking for a completion: streamed (the default) and not.
STREAMED_OR_NOT = pytest.mark.parametrize(
    "stream", [pytest.param(True, id="streamed"), pytest.param(False, id="not-streamed")]
)


@STREAMED_OR_NOT
async def test_llm_tool_call_then_answer_sends_exact_requests(
    sup: RunSupervisor, provider: FakeChatServer, stream: bool
) -> None:
    """Tool call → observation → final answer; both request bodies are exactly as expected,
    whether the completions are streamed or not."""
    provider.add(
        tool_call_reply(
            [("file_editor", {"command": "create", "path": "a.txt", "file_text": "hi"})]
        ),
        text_reply("Created a.txt."),
    )
    conversation_id, run = await run_to_end(sup, llm(stream=stream), "Create a.txt")
    assert (run.status, run.reason, run.steps) == (Status.FINISHED, "agent_finished", 2)
    first, second = (request.body for request in provider.requests)
    assert first.get("stream", False) is second.get("stream", False) is stream
    assert [tool["function"]["name"] for tool in first["tools"]] == [
        "terminal",
        "file_editor",
        "finish",
    ]
    assert (first["model"], first["temperature"]) == ("test-model", 0.0)
    assert first["messages"][1:] == [{"role": "user", "content": "Create a.txt"}]
    observation = (await events(sup, conversation_id, "observation"))[0].payload
    assert second["messages"][1:] == [
        {"role": "user", "content": "Create a.txt"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {
                        "name": "file_editor",
                        "arguments": '{"command": "create", "path": "a.txt", "file_text": "hi"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": observation.content},  # type: ignore[union-attr]
    ]
    conversation = await sup.io(sup.store.get_conversation, conversation_id)
    workspace = workspace_path(sup.settings.workspaces_path, conversation)
    assert (workspace / "a.txt").read_text() == "hi"
    assert (conversation.usage.prompt_tokens, conversation.usage.completion_tokens) == (20, 10)
    assert [e.kind for e in await events(sup, conversation_id)] == [
        "message",  # the user's
        "status",  # queued
        "status",  # running
        "llm_call",
        "action",
        "observation",
        "llm_call",
        "message",  # "Created a.txt."
        "status",  # finished
    ]


async def test_llm_parallel_calls_answer_in_call_order(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """Three calls of one reply run concurrently; observations come back in call order."""
    creates = [
        ("file_editor", {"command": "create", "path": f"f{i}.txt", "file_text": str(i)})
        for i in range(3)
    ]
    provider.add(tool_call_reply(creates), text_reply("done"))
    conversation_id, run = await run_to_end(sup, llm(), "go")
    assert run.status is Status.FINISHED
    observed = [e.payload for e in await events(sup, conversation_id, "observation")]
    assert [p.call_id for p in observed] == ["call_0", "call_1", "call_2"]  # type: ignore[union-attr]
    assert not any(p.is_error for p in observed)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("failures", "status"),
    [
        pytest.param(
            [error_reply(429, retry_after=0), error_reply(503)], Status.FINISHED, id="recovers"
        ),
        pytest.param([error_reply(500, "overloaded")] * 3, Status.ERROR, id="gives-up"),
    ],
)
async def test_llm_retries_then_succeeds_or_gives_up(
    sup: RunSupervisor, provider: FakeChatServer, failures: list[Any], status: Status
) -> None:
    """429/5xx are retried max_retries (2) times; then the run ends error with the cause."""
    provider.add(*failures, text_reply("fine"))
    conversation_id, run = await run_to_end(sup, llm(), "hello")
    assert run.status is status
    assert len(provider.requests) == 3
    if status is Status.ERROR:
        error = (await events(sup, conversation_id, "error"))[0].payload
        assert "500" in error.message and "overloaded" in error.message  # type: ignore[union-attr]


async def test_llm_client_errors_are_not_retried(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A 400 from the provider ends the run at once, without a retry."""
    provider.add(error_reply(400, "bad model"))
    _, run = await run_to_end(sup, llm(), "hello")
    assert (run.status, len(provider.requests)) == (Status.ERROR, 1)
    assert run.error is not None and "400" in run.error and "bad model" in run.error


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param(("terminal", "{not json"), "not valid JSON", id="bad-json"),
        pytest.param(("teleport", {"to": "mars"}), "unknown tool 'teleport'", id="unknown-tool"),
        pytest.param(("terminal", {"cmd": "ls"}), "invalid arguments for terminal", id="schema"),
    ],
)
async def test_llm_malformed_tool_calls_become_observations(
    sup: RunSupervisor, provider: FakeChatServer, call: Any, expected: str
) -> None:
    """A malformed call is an error observation to the model; the run carries on."""
    provider.add(tool_call_reply([call]), text_reply("sorry"))
    conversation_id, run = await run_to_end(sup, llm(), "hello")
    assert run.status is Status.FINISHED
    observation = (await events(sup, conversation_id, "observation"))[0].payload
    assert observation.is_error and expected in observation.content  # type: ignore[union-attr]
    assert expected in provider.requests[1].body["messages"][-1]["content"]


async def test_llm_finish_tool_ends_the_run_with_its_message(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A finish call ends the run finished; its message is the agent's last message."""
    provider.add(tool_call_reply([("finish", {"message": "All done."})]))
    conversation_id, run = await run_to_end(sup, llm(), "hello")
    assert run.status is Status.FINISHED
    assert (await events(sup, conversation_id, "message"))[-1].payload.text == "All done."  # type: ignore[union-attr]


@STREAMED_OR_NOT
async def test_llm_interrupt_cancels_the_request_in_flight(
    sup: RunSupervisor, provider: FakeChatServer, stream: bool
) -> None:
    """Interrupt during a 60 s provider response stops the run within the request's wait
    (mid-stream: see tests/test_llm_streaming.py)."""
    provider.add(text_reply("too late", delay_seconds=60))
    conversation = await new_conversation(sup, llm(stream=stream), initial_message="hello")
    await sup.start_run(conversation.id)
    with trio.fail_after(10):
        while not provider.requests:  # the request has reached the provider
            await trio.sleep(0.005)
        started = time.monotonic()
        run = await sup.interrupt(conversation.id)
        elapsed = time.monotonic() - started
    assert (run.status, run.reason) == (Status.PAUSED, "interrupt")
    assert elapsed < 1.0  # bench/ measures the real figure; this only rules out waiting 60 s


def stored_bytes(directory: Path) -> bytes:
    """Every byte under ``directory``: the database, its WAL, the workspaces."""
    return b"".join(path.read_bytes() for path in directory.rglob("*") if path.is_file())


async def test_llm_api_key_is_sent_but_never_stored(
    sup: RunSupervisor, provider: FakeChatServer, settings: Settings
) -> None:
    """The key reaches the provider as a bearer token and appears in no stored byte, even
    when the model asks a command to print the server's environment."""
    provider.add(tool_call_reply([("terminal", {"command": "env"})]), text_reply("ok"))
    await run_to_end(sup, llm(), "hello")
    assert provider.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert API_KEY.encode() not in stored_bytes(Path(settings.data_dir))


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_llm_connection_errors_are_retried_then_reported(
    settings: Settings, store: SqliteStore
) -> None:
    """An unreachable provider is retried max_retries times, then the run says so."""
    unreachable = f"http://127.0.0.1:{closed_port()}/v1"
    fast = with_llm(settings, unreachable, max_retries=2, backoff_base_seconds=0.01)
    async with open_run_supervisor(fast, store) as sup:
        conversation_id, run = await run_to_end(sup, llm(), "hello")
        error = (await events(sup, conversation_id, "error"))[0].payload
    assert run.status is Status.ERROR
    assert "cannot reach" in error.message  # type: ignore[union-attr]


async def test_llm_malformed_completion_ends_the_run_clearly(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A 200 answer without choices ends the run error with a message saying so."""
    provider.add(ScriptedReply(200, {"unexpected": True}))
    _, run = await run_to_end(sup, llm(), "hello")
    assert run.status is Status.ERROR
    assert run.error is not None and "no usable choice" in run.error


async def test_llm_honours_retry_after(sup: RunSupervisor, provider: FakeChatServer) -> None:
    """A 429 with Retry-After: 0.3 delays the retry at least that long (backoff is 0.01 s)."""
    provider.add(error_reply(429, retry_after=0.3), text_reply("fine"))
    _, run = await run_to_end(sup, llm(), "hello")
    assert run.status is Status.FINISHED
    first, second = provider.requests
    assert second.received_at - first.received_at >= 0.3


async def test_llm_parallel_calls_with_one_slot_and_two_tool_threads_all_finish(
    settings: Settings, store: SqliteStore, provider: FakeChatServer
) -> None:
    """max_concurrent_runs=1, tool_threads=2: runs each given 3 parallel calls all finish."""
    limits = {
        "max_concurrent_runs": 1,
        "tool_threads": 2,
        "llm": LLMSettings(base_url=provider.url, max_retries=0),
    }
    calls = [("terminal", {"command": f"echo {n}"}) for n in range(3)]
    for _ in range(3):  # one slot: the runs take their replies one after another
        provider.add(tool_call_reply(calls), text_reply("done"))
    async with open_run_supervisor(settings.model_copy(update=limits), store) as sup:
        with trio.fail_after(20):
            started = []
            for _ in range(3):
                conversation = await new_conversation(sup, llm(), initial_message="go")
                started.append((conversation.id, (await sup.start_run(conversation.id)).id))
            for conversation_id, run_id in started:
                ended = await sup.wait_run(conversation_id, run_id, 15)
                assert ended is not None and ended.status is Status.FINISHED
                observed = await events(sup, conversation_id, "observation")
                assert [e.payload.content.splitlines()[0] for e in observed] == ["0", "1", "2"]  # type: ignore[union-attr]
    assert_all_returned(sup)


async def test_llm_resumes_after_an_interrupted_tool_call_with_a_valid_history(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A call cut short by interrupt still gets a tool message in the next request."""
    provider.add(tool_call_reply([("terminal", {"command": "touch started; sleep 300"})]))
    conversation = await new_conversation(sup, llm(), initial_message="go")
    await sup.start_run(conversation.id)
    marker = workspace_path(sup.settings.workspaces_path, conversation) / "started"
    with trio.fail_after(15):
        while not await trio.to_thread.run_sync(marker.exists):
            await trio.sleep(0.01)  # poll interval: the command has started
        await sup.interrupt(conversation.id)
        provider.add(text_reply("resumed"))
        run = await sup.start_run(conversation.id)
        ended = await sup.wait_run(conversation.id, run.id, 10)
    assert ended is not None and ended.status is Status.FINISHED
    messages = provider.requests[1].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[3]["tool_call_id"] == messages[2]["tool_calls"][0]["id"]
    assert "stopped before this call returned" in messages[3]["content"]


async def test_llm_runs_of_a_supervisor_share_one_connection(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """Every request of two runs, one after the other, comes over the same TCP connection."""
    provider.add(tool_call_reply([("finish", {"message": "a"})]), text_reply("b"))
    await run_to_end(sup, llm(), "first")
    await run_to_end(sup, llm(), "second")
    ports = {request.client_port for request in provider.requests}
    assert (len(provider.requests), len(ports)) == (2, 1)


async def test_llm_step_deadline_ends_the_run_with_a_clear_error(
    settings: Settings, store: SqliteStore, provider: FakeChatServer
) -> None:
    """A provider that never answers ends the run error once llm.step_timeout_seconds
    (0.3 s) has passed, with a message naming that setting."""
    provider.add(text_reply("too late", delay_seconds=60))
    async with open_run_supervisor(
        with_llm(settings, provider.url, step_timeout_seconds=0.3), store
    ) as sup:
        _, run = await run_to_end(sup, llm(), "hello")
    await sup.registry.aclose()
    assert (run.status, run.reason) == (Status.ERROR, "agent_error")
    assert "within llm.step_timeout_seconds (0.3 s)" in run.error


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param(["not", "an", "object"], '["not", "an", "object"]', id="json-list"),
        pytest.param("model overloaded", "model overloaded", id="json-string"),
        pytest.param({"error": "no such model"}, "no such model", id="error-string"),
        pytest.param({"detail": "Not Found"}, "Not Found", id="detail"),
        pytest.param({"error": {"message": "bad model"}}, "bad model", id="openai"),
        pytest.param(None, "null", id="json-null"),
    ],
)
async def test_llm_provider_error_bodies_of_any_shape_give_a_clear_run_error(
    sup: RunSupervisor, provider: FakeChatServer, body: Any, detail: str
) -> None:
    """A 400 whose body is any JSON value ends the run error with the status and the
    provider's message (or its raw body), not a crash of the error handling."""
    provider.add(ScriptedReply(400, body))
    _, run = await run_to_end(sup, llm(), "hello")
    assert run.status is Status.ERROR
    assert run.error == f"the model provider answered 400: {detail} (after 1 attempt(s))"


async def test_llm_each_step_reads_only_the_events_it_has_not_seen(
    sup: RunSupervisor, provider: FakeChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step n asks the store for the events after the last one step n-1 saw, not for the
    whole conversation again; the requests still carry the whole history."""
    queried: list[int] = []
    real = sup.store.search_events

    def spy(conversation_id: str, query: EventQuery) -> Any:
        queried.append(query.after_seq)
        return real(conversation_id, query)

    monkeypatch.setattr(sup.store, "search_events", spy)
    provider.add(
        tool_call_reply([("terminal", {"command": "echo 1"})]),
        tool_call_reply([("terminal", {"command": "echo 2"})]),
        text_reply("done"),
    )
    await run_to_end(sup, llm(), "count")
    first, second, third = queried[:3]
    assert first == 0 < second < third
    assert [len(request.body["messages"]) for request in provider.requests] == [2, 4, 6]
