"""Events: the append-only log of a conversation.

An event is immutable once committed. ``seq`` numbers the events of one conversation 1, 2,
3 … with no gaps; it is the cursor for search and (later) streams. ``payload`` is a
discriminated union on ``kind``; ``Event.kind`` mirrors it so the store can index it.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, computed_field

from app.lifecycle import Status


class Source(enum.StrEnum):
    USER = "user"
    AGENT = "agent"
    TOOL = "tool"
    SYSTEM = "system"


class MessagePayload(BaseModel):
    """Text said by the user or the agent."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["message"] = "message"
    text: str


class StatusPayload(BaseModel):
    """A status change of the conversation (and of the run named by ``Event.run_id``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["status"] = "status"
    status: Status
    previous: Status
    reason: str


class ErrorPayload(BaseModel):
    """Why a run ended in ``error``: the agent's exception or a limit that was reached."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["error"] = "error"
    message: str
    error_type: str


class ActionPayload(BaseModel):
    """The agent calls a tool. ``call_id`` pairs it with its observation."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["action"] = "action"
    call_id: str
    tool: str
    arguments: dict[str, Any]


class ObservationPayload(BaseModel):
    """What a tool call returned (``content`` is what the model sees)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["observation"] = "observation"
    call_id: str
    tool: str
    content: str
    is_error: bool = False
    data: dict[str, Any] = Field(default_factory=dict)


class LLMCallPayload(BaseModel):
    """One request to a language model: its token usage (summed on the conversation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["llm_call"] = "llm_call"
    model: str
    prompt_tokens: int
    completion_tokens: int
    duration_ms: float
    finish_reason: str | None = None


class WebhookPayload(BaseModel):
    """The final outcome of one webhook delivery for the run named by ``Event.run_id``:
    ``delivered`` (a 2xx answer) or ``failed`` (a final refusal, the attempts ran out, the
    queue was full, or the server shut down), after ``attempts`` POSTs (0: never sent).
    One event per delivery, not per attempt (see ``app/live/webhooks.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["webhook"] = "webhook"
    delivery_id: str
    url: str
    attempts: int
    status_code: int | None = None
    outcome: Literal["delivered", "failed"]
    error: str | None = None


Payload = Annotated[
    MessagePayload
    | StatusPayload
    | ErrorPayload
    | ActionPayload
    | ObservationPayload
    | LLMCallPayload
    | WebhookPayload,
    Field(discriminator="kind"),
]

#: The ``kind`` values that exist, for validating search filters.
EVENT_KINDS: tuple[str, ...] = tuple(
    str(model.model_fields["kind"].default) for model in get_args(get_args(Payload)[0])
)


class Event(BaseModel):
    """One committed entry of a conversation's log."""

    model_config = ConfigDict(frozen=True)
    id: str
    conversation_id: str
    seq: int
    run_id: str | None
    timestamp: datetime
    source: Source
    payload: Payload

    @computed_field  # type: ignore[prop-decorator]
    @property
    def kind(self) -> str:
        return self.payload.kind


def searchable_text(payload: Payload) -> str:
    """The words the ``q`` search filter matches for this payload (not its JSON syntax)."""
    match payload:
        case MessagePayload(text=text):
            return text
        case ErrorPayload(message=message, error_type=error_type):
            return f"{error_type}: {message}"
        case StatusPayload(status=status, reason=reason):
            return f"{status.value} {reason}"
        case ActionPayload(tool=tool, arguments=arguments):
            return f"{tool} {' '.join(str(value) for value in arguments.values())}"
        case ObservationPayload(tool=tool, content=content):
            return f"{tool} {content}"
        case LLMCallPayload(model=model, finish_reason=finish_reason):
            return f"{model} {finish_reason or ''}"
        case WebhookPayload(url=url, outcome=outcome, status_code=code, error=error):
            return f"webhook {outcome} {code or ''} {url} {error or ''}"
    raise TypeError(f"no search text for {type(payload).__name__}")  # pragma: no cover


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the only kind of timestamp Trellis stores)."""
    return datetime.now(UTC)
