"""Turning a conversation's events into Chat Completions ``messages``, incrementally.

=====================  =============================================================
event                  message
=====================  =============================================================
user ``message``       ``{"role": "user", "content": text}``
agent ``message``      ``{"role": "assistant", "content": text}``
``action``             a ``tool_calls`` entry of the assistant message just before it
                       (a new assistant message if anything else came between)
``observation``        ``{"role": "tool", "tool_call_id": ..., "content": ...}``
anything else          nothing (status, error and llm_call events are bookkeeping)
=====================  =============================================================

Rule: every ``tool_calls`` entry is answered by a ``tool`` message before the next user or
assistant message — every OpenAI-compatible server rejects a request otherwise. A call
with no ``observation`` (the server was killed, or outlived its shutdown grace, mid tool
batch) is answered by :data:`INTERRUPTED_CONTENT`, placed right after the tool messages of
its batch, so a crash never leaves a conversation that can no longer be resumed.

An action whose arguments were not valid JSON is stored as ``{"raw": "<text>"}`` and is
replayed as that text, so the model sees exactly what it sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from app.events import ActionPayload, Event, MessagePayload, ObservationPayload, Source

Message = dict[str, Any]

#: The answer given to a tool call that has no observation.
INTERRUPTED_CONTENT = "interrupted: the server stopped before this call finished"


class ChatHistory:
    """The messages of one conversation, extended event by event as the run goes on.

    An ``llm`` agent keeps one for its run and feeds it only the events it has not seen
    (``ctx.history(after_seq=history.last_seq)``), so building a request costs the new
    events, not the whole conversation. Not thread-safe: it belongs to one run thread.
    """

    def __init__(self, system_prompt: str) -> None:
        self._messages: list[Message] = [{"role": "system", "content": system_prompt}]
        #: Call ids of the open batch (the last assistant message) without an answer yet.
        self._unanswered: list[str] = []
        #: True right after an agent message or an action: an action joins that message.
        self._joinable = False
        self.last_seq = 0

    def __repr__(self) -> str:
        return f"<ChatHistory {len(self._messages)} messages, up to seq {self.last_seq}>"

    def extend(self, events: Iterable[Event]) -> None:
        """Add ``events`` (oldest first, all after :attr:`last_seq`)."""
        for event in events:
            self._add(event)
            self.last_seq = event.seq

    def messages(self) -> list[Message]:
        """The messages so far, every call answered (a new list; the messages are shared)."""
        return [*self._messages, *map(_interrupted, self._unanswered)]

    def _add(self, event: Event) -> None:
        joinable, self._joinable = self._joinable, False
        match event.payload:
            case MessagePayload(text=text):
                role = "user" if event.source is Source.USER else "assistant"
                self._close_batch()
                self._messages.append({"role": role, "content": text})
                self._joinable = role == "assistant"
            case ActionPayload() as action:
                self._assistant_for(joinable).setdefault("tool_calls", []).append(
                    _tool_call(action)
                )
                self._unanswered.append(action.call_id)
                self._joinable = True
            case ObservationPayload(call_id=call_id, content=content):
                if call_id in self._unanswered:
                    self._unanswered.remove(call_id)
                self._messages.append({"role": "tool", "tool_call_id": call_id, "content": content})

    def _assistant_for(self, joinable: bool) -> Message:
        """The assistant message an action joins: the one its event directly follows (the
        step's text, or its batch's first action); else a new one, after closing the last
        batch."""
        if joinable:
            return self._messages[-1]
        self._close_batch()
        self._messages.append({"role": "assistant", "content": None})
        return self._messages[-1]

    def _close_batch(self) -> None:
        self._messages.extend(map(_interrupted, self._unanswered))
        self._unanswered.clear()


def chat_messages(system_prompt: str, events: Iterable[Event]) -> list[Message]:
    """The messages of a whole history at once (see :class:`ChatHistory`)."""
    history = ChatHistory(system_prompt)
    history.extend(events)
    return history.messages()


def _interrupted(call_id: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "content": INTERRUPTED_CONTENT}


def _tool_call(action: ActionPayload) -> Message:
    arguments = action.arguments
    text = arguments["raw"] if set(arguments) == {"raw"} else json.dumps(arguments)
    return {
        "id": action.call_id,
        "type": "function",
        "function": {"name": action.tool, "arguments": text},
    }
