"""Turning a conversation's events into Chat Completions ``messages``.

=====================  =============================================================
event                  message
=====================  =============================================================
user ``message``       ``{"role": "user", "content": text}``
agent ``message``      ``{"role": "assistant", "content": text}``
``action``             a ``tool_calls`` entry of the assistant message just before it
                       (a new assistant message if a user or tool message came between)
``observation``        ``{"role": "tool", "tool_call_id": ..., "content": ...}``
anything else          nothing (status, error and llm_call events are bookkeeping)
=====================  =============================================================

An action whose arguments were not valid JSON is stored as ``{"raw": "<text>"}`` and is
replayed as that text, so the model sees exactly what it sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from app.events import ActionPayload, Event, MessagePayload, ObservationPayload, Source

Message = dict[str, Any]


def chat_messages(system_prompt: str, events: Iterable[Event]) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": system_prompt}]
    for event in events:
        match event.payload:
            case MessagePayload(text=text) if event.source is Source.USER:
                messages.append({"role": "user", "content": text})
            case MessagePayload(text=text):
                messages.append({"role": "assistant", "content": text})
            case ActionPayload() as action:
                _assistant_for_tool_calls(messages).setdefault("tool_calls", []).append(
                    _tool_call(action)
                )
            case ObservationPayload(call_id=call_id, content=content):
                messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
    return messages


def _assistant_for_tool_calls(messages: list[Message]) -> Message:
    last = messages[-1]
    if last["role"] == "assistant":
        return last
    messages.append({"role": "assistant", "content": None})
    return messages[-1]


def _tool_call(action: ActionPayload) -> Message:
    arguments = action.arguments
    text = arguments["raw"] if set(arguments) == {"raw"} else json.dumps(arguments)
    return {
        "id": action.call_id,
        "type": "function",
        "function": {"name": action.tool, "arguments": text},
    }
