"""Events → Chat Completions messages: grouping, dangling calls, incremental building."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.agents.llm_messages import INTERRUPTED_CONTENT, ChatHistory, chat_messages
from app.events import (
    ActionPayload,
    Event,
    LLMCallPayload,
    MessagePayload,
    ObservationPayload,
    Payload,
    Source,
    StatusPayload,
)
from app.lifecycle import Status
from app.testing_llm import message_sequence_error


def history(*items: tuple[Source, Payload]) -> list[Event]:
    """Events numbered from seq 1, in the order given."""
    now = datetime.now(UTC)
    return [
        Event(
            id=str(seq),
            conversation_id="c",
            seq=seq,
            run_id="r",
            timestamp=now,
            source=source,
            payload=payload,
        )
        for seq, (source, payload) in enumerate(items, start=1)
    ]


def user(text: str) -> tuple[Source, Payload]:
    return Source.USER, MessagePayload(text=text)


def said(text: str) -> tuple[Source, Payload]:
    return Source.AGENT, MessagePayload(text=text)


def action(call_id: str, **arguments: Any) -> tuple[Source, Payload]:
    return Source.AGENT, ActionPayload(call_id=call_id, tool="terminal", arguments=arguments)


def observed(call_id: str, content: str = "ok") -> tuple[Source, Payload]:
    return Source.TOOL, ObservationPayload(call_id=call_id, tool="terminal", content=content)


def status(now: Status, before: Status, reason: str) -> tuple[Source, Payload]:
    return Source.SYSTEM, StatusPayload(status=now, previous=before, reason=reason)


def llm_call() -> tuple[Source, Payload]:
    payload = LLMCallPayload(model="m", prompt_tokens=1, completion_tokens=1, duration_ms=1.0)
    return Source.AGENT, payload


def call(call_id: str, arguments: str = "{}") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "terminal", "arguments": arguments},
    }


def tool(call_id: str, content: str = "ok") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def interrupted(call_id: str) -> dict[str, Any]:
    return tool(call_id, INTERRUPTED_CONTENT)


SYSTEM = {"role": "system", "content": "sys"}
CRASH_RECOVERY = status(Status.PAUSED, Status.RUNNING, "crash_recovery")


def test_chat_messages_groups_tool_calls_and_replays_raw_arguments() -> None:
    """Actions join the assistant message before them; raw (bad) arguments replay verbatim."""
    events = history(
        user("hi"),
        status(Status.RUNNING, Status.QUEUED, "started"),
        said("looking"),
        action("a", command="ls"),
        action("b", raw="{oops"),
        observed("a", "x"),
        observed("b", "bad"),
    )
    assert chat_messages("sys", events) == [
        SYSTEM,
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "looking",
            "tool_calls": [call("a", '{"command": "ls"}'), call("b", "{oops")],
        },
        tool("a", "x"),
        tool("b", "bad"),
    ]


@pytest.mark.parametrize(
    ("after_crash", "expected_after_crash"),
    [
        pytest.param([], [], id="crash-is-the-end"),
        pytest.param(
            [CRASH_RECOVERY, user("go on")], [{"role": "user", "content": "go on"}], id="then-user"
        ),
        pytest.param(
            [CRASH_RECOVERY, llm_call(), said("retrying")],
            [{"role": "assistant", "content": "retrying"}],
            id="then-assistant",
        ),
        pytest.param(
            [CRASH_RECOVERY, llm_call(), action("c1"), observed("c1")],
            [{"role": "assistant", "content": None, "tool_calls": [call("c1")]}, tool("c1")],
            id="then-a-new-batch",
        ),
    ],
)
def test_chat_messages_answer_calls_a_crash_left_without_observation(
    after_crash: list[tuple[Source, Payload]], expected_after_crash: list[dict[str, Any]]
) -> None:
    """A batch cut by a crash (one call answered, two not) gets an "interrupted" answer per
    dangling call, right after the batch's tool messages and before anything that follows."""
    events = history(
        user("do it"),
        action("a1"),
        action("a2"),
        action("a3"),
        observed("a2"),
        *after_crash,
    )
    messages = chat_messages("sys", events)
    assert messages == [
        SYSTEM,
        {"role": "user", "content": "do it"},
        {"role": "assistant", "content": None, "tool_calls": [call("a1"), call("a2"), call("a3")]},
        tool("a2"),
        interrupted("a1"),
        interrupted("a3"),
        *expected_after_crash,
    ]
    assert message_sequence_error(messages) is None


def test_chat_history_built_in_pieces_equals_built_at_once() -> None:
    """Extending a ChatHistory step by step gives the messages of the whole history at once,
    and last_seq follows the events it was given."""
    events = history(
        user("hi"),
        llm_call(),
        said("looking"),
        action("a"),
        observed("a"),
        llm_call(),
        action("b"),
        CRASH_RECOVERY,
        user("again"),
        llm_call(),
        said("done"),
    )
    built = ChatHistory("sys")
    seen_at_each_cut = []
    for cut in (0, 3, 5, 7, 8, len(events)):
        built.extend(event for event in events if built.last_seq < event.seq <= cut)
        seen_at_each_cut.append(built.last_seq)
        assert built.messages() == chat_messages("sys", events[:cut])
    assert seen_at_each_cut == [0, 3, 5, 7, 8, 11]
