"""Token streaming: the ``llm`` agent streams its completions and shows the text live.

A real supervisor, a real SQLite store and the fake provider over real HTTP; the live side
is read straight from the supervisor's feed (what the SSE and WebSocket streams render).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import trio

from app.events import Event, MessagePayload, Source
from app.lifecycle import Status
from app.live.feed import Delta, Subscription
from app.supervisor import RunSupervisor
from app.testing_llm import FakeChatServer, StreamHold, text_reply, tool_call_reply
from app.workspaces import workspace_path
from tests import test_agent_llm
from tests.conftest import new_conversation
from tests.test_agent_llm import API_KEY, events, llm, run_to_end

pytestmark = pytest.mark.timeout(30)

sup = test_agent_llm.sup  # the fixture: a supervisor whose default provider is `provider`


@pytest.fixture
def provider(request: pytest.FixtureRequest) -> Iterator[FakeChatServer]:
    """The fake provider; parametrize it with False for one that cannot stream."""
    with FakeChatServer(streaming=getattr(request, "param", True)) as fake:
        yield fake


def is_agent_message(item: Event | Delta) -> bool:
    return (
        isinstance(item, Event)
        and isinstance(item.payload, MessagePayload)
        and (item.source is Source.AGENT)
    )


async def receive_until(
    subscription: Subscription, last: Callable[[Event | Delta], bool]
) -> list[Event | Delta]:
    """What the subscription receives, in order, up to and including the item ``last``."""
    received: list[Event | Delta] = []
    with trio.fail_after(10):
        while True:
            item = await subscription.receive()
            assert isinstance(item, Event | Delta), f"the stream ended: {item}"
            received.append(item)
            if last(item):
                return received


def deltas(items: list[Event | Delta]) -> list[Delta]:
    return [item for item in items if isinstance(item, Delta)]


async def test_llm_streaming_deltas_reach_watchers_before_the_stored_message(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """The text arrives live as deltas (run, conversation, after_seq = the last event the
    run knew), all before the llm_call and message events; the stored message is exactly
    the deltas joined. The request asked for a stream with usage."""
    provider.add(text_reply("Streaming makes a run watchable, word by word, as it goes."))
    conversation = await new_conversation(sup, llm(), initial_message="hello")
    with sup.feed.subscribe(conversation.id) as subscription:
        run = await sup.start_run(conversation.id)
        items = await receive_until(subscription, is_agent_message)
    live = deltas(items)
    first = items.index(live[0])
    kinds = ["delta" if isinstance(item, Delta) else item.kind for item in items[first:]]
    assert kinds == ["delta"] * len(live) + ["llm_call", "message"]
    assert len(live) > 5  # word by word, not at the end
    message = items[-1]
    assert isinstance(message, Event) and isinstance(message.payload, MessagePayload)
    assert "".join(delta.text for delta in live) == message.payload.text
    before = items[first - 1]
    assert isinstance(before, Event) and before.kind == "status"  # "running"
    assert {(d.conversation_id, d.run_id, d.after_seq) for d in live} == {
        (conversation.id, run.id, before.seq)
    }
    body = provider.requests[0].body
    assert (body["stream"], body["stream_options"]) == (True, {"include_usage": True})


async def test_llm_streamed_tool_calls_are_executed_as_before(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A tool call whose arguments arrive in pieces across chunks runs with the whole
    arguments; the run then finishes on the streamed text answer."""
    create = {"command": "create", "path": "a.txt", "file_text": "streamed in pieces"}
    provider.add(tool_call_reply([("file_editor", create)]), text_reply("Created a.txt."))
    conversation_id, run = await run_to_end(sup, llm(), "create a.txt")
    assert (run.status, run.steps) == (Status.FINISHED, 2)
    action = (await events(sup, conversation_id, "action"))[0].payload
    assert (action.call_id, action.arguments) == ("call_0", create)  # type: ignore[union-attr]
    conversation = await sup.io(sup.store.get_conversation, conversation_id)
    workspace = workspace_path(sup.settings.workspaces_path, conversation)
    assert (workspace / "a.txt").read_text() == "streamed in pieces"
    assert all(request.body["stream"] is True for request in provider.requests)


async def test_llm_stream_false_sends_a_plain_request_and_no_deltas(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """``"stream": false``: the request has no stream fields, nothing is shown live, the
    message is stored as before."""
    provider.add(text_reply("Plain and simple."))
    conversation = await new_conversation(sup, llm(stream=False), initial_message="hello")
    with sup.feed.subscribe(conversation.id) as subscription:
        await sup.start_run(conversation.id)
        items = await receive_until(subscription, is_agent_message)
    assert not deltas(items)
    assert items[-1].payload.text == "Plain and simple."  # type: ignore[union-attr]
    body = provider.requests[0].body
    assert "stream" not in body and "stream_options" not in body


@pytest.mark.parametrize("provider", [pytest.param(False, id="no-streaming")], indirect=True)
async def test_llm_plain_json_answer_to_a_stream_request_works(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A provider that answers a stream request with plain JSON: the run finishes, the
    message and the usage are recorded; there was nothing to show live."""
    provider.add(text_reply("I do not stream.", prompt_tokens=12, completion_tokens=3))
    conversation = await new_conversation(sup, llm(), initial_message="hello")
    with sup.feed.subscribe(conversation.id) as subscription:
        run = await sup.start_run(conversation.id)
        items = await receive_until(subscription, is_agent_message)
        ended = await sup.wait_run(conversation.id, run.id, 10)
    assert ended is not None and ended.status is Status.FINISHED
    assert provider.requests[0].body["stream"] is True
    assert not deltas(items) and items[-1].payload.text == "I do not stream."  # type: ignore[union-attr]
    call = (await events(sup, conversation.id, "llm_call"))[0].payload
    assert (call.prompt_tokens, call.completion_tokens) == (12, 3)  # type: ignore[union-attr]


async def test_llm_interrupt_mid_stream_stops_the_run_at_once(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """Interrupted while the provider holds its stream after two words, the run ends
    ``paused``/``interrupt`` without waiting for the rest (still held when it ended), and
    nothing of the half-streamed completion is stored."""
    hold = StreamHold(after_chunks=3)  # the role chunk, "Hello ", "you, "
    provider.add(dataclasses.replace(text_reply("Hello you, never finished"), hold=hold))
    conversation = await new_conversation(sup, llm(), initial_message="hello")
    with sup.feed.subscribe(conversation.id) as subscription:
        await sup.start_run(conversation.id)
        with trio.fail_after(10):
            await hold.wait_reached()
            shown = ""
            while shown != "Hello you, ":  # the two words reached the watchers
                item = await subscription.receive()
                shown += item.text if isinstance(item, Delta) else ""
            started = trio.current_time()
            run = await sup.interrupt(conversation.id)
            elapsed = trio.current_time() - started
    assert (run.status, run.reason) == (Status.PAUSED, "interrupt")
    assert not hold.released  # the run did not wait for the stream
    kinds = [event.kind for event in await events(sup, conversation.id)]
    assert "llm_call" not in kinds and kinds.count("message") == 1  # the user's
    assert elapsed < 1.0  # measured ~ms (see the report); this only rules out waiting


async def test_llm_stream_cut_before_any_text_is_retried_cleanly(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A stream dropped before any of its text was shown is retried like a failed
    request; watchers see the second answer's text once, and it is stored once."""
    cut = dataclasses.replace(text_reply("lost"), cut_after_chunks=1)  # the role chunk only
    provider.add(cut, text_reply("Second try, complete."))
    conversation = await new_conversation(sup, llm(), initial_message="hello")
    with sup.feed.subscribe(conversation.id) as subscription:
        run = await sup.start_run(conversation.id)
        items = await receive_until(subscription, is_agent_message)
        ended = await sup.wait_run(conversation.id, run.id, 10)
    assert ended is not None and ended.status is Status.FINISHED
    assert len(provider.requests) == 2
    assert "".join(delta.text for delta in deltas(items)) == "Second try, complete."
    stored = [e.payload.text for e in await events(sup, conversation.id, "message")]  # type: ignore[union-attr]
    assert stored == ["hello", "Second try, complete."]


async def test_llm_stream_cut_after_text_was_shown_fails_without_retry(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """A stream dropped after some of its text was shown live is not retried (the text
    would be shown twice): the run ends error saying so, and no message is stored."""
    cut = dataclasses.replace(text_reply("Half of an answer that breaks"), cut_after_chunks=3)
    provider.add(cut, text_reply("never asked for"))
    conversation_id, run = await run_to_end(sup, llm(), "hello")
    assert (run.status, len(provider.requests)) == (Status.ERROR, 1)
    assert "stream broke off after its text was shown" in run.error
    assert "not retried" in run.error
    stored = [e.payload.text for e in await events(sup, conversation_id, "message")]  # type: ignore[union-attr]
    assert stored == ["hello"]


async def test_llm_stream_usage_chunk_lands_in_the_llm_call_event(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """The tokens of the stream's usage chunk are the llm_call event's and the
    conversation's usage."""
    provider.add(text_reply("counted", prompt_tokens=123, completion_tokens=45))
    conversation_id, run = await run_to_end(sup, llm(), "hello")
    assert run.status is Status.FINISHED
    call = (await events(sup, conversation_id, "llm_call"))[0].payload
    assert (call.prompt_tokens, call.completion_tokens, call.finish_reason) == (123, 45, "stop")  # type: ignore[union-attr]
    conversation = await sup.io(sup.store.get_conversation, conversation_id)
    assert (conversation.usage.prompt_tokens, conversation.usage.completion_tokens) == (123, 45)


async def test_llm_stream_never_shows_an_echoed_key_even_split_across_chunks(
    sup: RunSupervisor, provider: FakeChatServer
) -> None:
    """The provider echoes the API key in its text, split across chunks: no delta carries
    any part of it, and the deltas joined equal the stored (redacted) message."""
    provider.add(text_reply(f"Your key is {API_KEY} (keep it safe)."))
    conversation = await new_conversation(sup, llm(), initial_message="hello")
    with sup.feed.subscribe(conversation.id) as subscription:
        await sup.start_run(conversation.id)
        items = await receive_until(subscription, is_agent_message)
    shown = [delta.text for delta in deltas(items)]
    assert "".join(shown) == items[-1].payload.text == "Your key is *** (keep it safe)."  # type: ignore[union-attr]
    assert not any(API_KEY[:5] in text for text in shown)
