"""The ``llm`` agent: any OpenAI-compatible Chat Completions endpoint, with tools.

::

    {"kind": "llm", "provider": "default", "model": "...", "system_prompt": "...",
     "tools": ["terminal", "file_editor", "finish"], "temperature": 0.0,
     "max_parallel_tools": 4, "stream": true}

A spec picks one of the operator's providers by name (:mod:`app.agents.providers`) and may
choose the model, the prompt and the sampling; it never names a URL or an environment
variable. A spec that still carries ``base_url`` or ``api_key_env`` is refused (422) with
the setting to use instead, and so is an unknown provider.

One step is one Chat Completions request, then the tool calls it returned (in parallel, on
the tool limiter, results in call order). A reply without tool calls, or a ``finish`` call,
ends the run ``finished``.

Streaming (``"stream": true``, the default): the completion is requested as a stream and
its text goes to the conversation's live watchers as it arrives (``ctx.delta``: ephemeral
``delta`` frames, never stored); the complete message is stored as an event once the
completion has ended, exactly as without streaming. ``"stream": false`` is for providers
that cannot stream: one plain request, no ``stream`` field, no deltas.

The request's ``messages`` are built incrementally: the agent (one instance per run) keeps
a :class:`~app.agents.llm_messages.ChatHistory` and asks the run only for the events after
the last one it has seen, so a step costs the new events, not the whole conversation.

Cancellation:
    The HTTP request is made on the Trio side (``ctx.call_async``) through the chosen
    provider's :class:`~app.agents.provider.ProviderClient`, so an interrupt cancels it at once —
    mid-request, mid-stream, mid-backoff — instead of waiting for the provider to answer.
    The completion's message is stored only once the completion has ended, so an
    interrupted stream leaves nothing half-written (its deltas were live-only).

Errors:
    :class:`~app.agents.provider.ProviderError` (the provider refused, kept failing, answered
    too much, or gave no answer within ``llm.step_timeout_seconds``) ends the run ``error``
    with a message saying so. The API key lives in the provider's client only; what the
    provider sends back has it hidden before the agent sees it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from app.agents.base import CONTINUE, StepContext, StepResult, finish
from app.agents.llm_messages import ChatHistory
from app.agents.provider import ProviderClient, ProviderError
from app.agents.providers import PROVIDERS_CONTEXT, unknown_provider_message
from app.events import LLMCallPayload, MessagePayload
from app.tools.calls import ToolCall

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful software agent. Use the tools to inspect and change the workspace;"
    " call finish with a short summary when the task is done."
)


#: Spec fields that became the operator's settings, and the setting to use instead.
OPERATOR_SETTINGS = {
    "base_url": "[llm.providers.NAME] base_url",
    "api_key_env": "[llm.providers.NAME] api_key_env",
}


class LLMSpec(BaseModel):
    """An ``llm`` agent spec. Validated with the provider names in the context
    (``PROVIDERS_CONTEXT``), an unknown ``provider`` is refused; without them it is
    checked when the agent is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["llm"]
    provider: str | None = Field(None, min_length=1, max_length=64)
    model: str | None = Field(None, min_length=1, max_length=200)
    # Never accepted: declared only so that a spec carrying them gets an error naming the
    # setting that replaced them (hidden from the schema, never dumped).
    base_url: SkipJsonSchema[Any] = Field(None, exclude=True)
    api_key_env: SkipJsonSchema[Any] = Field(None, exclude=True)
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, max_length=100_000)
    tools: list[str] = Field(default_factory=lambda: ["terminal", "file_editor", "finish"])
    temperature: float = Field(0.0, ge=0, le=2)
    max_parallel_tools: int = Field(4, ge=1, le=64)
    stream: bool = True

    @field_validator("base_url", "api_key_env", mode="before")
    @classmethod
    def _operator_setting(cls, value: Any, info: ValidationInfo) -> Any:
        field = str(info.field_name)
        message = (
            f"{field} is no longer part of an agent spec: the operator sets it as"
            f" {OPERATOR_SETTINGS[field]} in the server's settings, and a spec picks that"
            ' provider with "provider": "NAME"'
        )
        raise PydanticCustomError("operator_setting", "{message}", {"message": message})

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, name: str | None, info: ValidationInfo) -> str | None:
        names = (info.context or {}).get(PROVIDERS_CONTEXT)
        if name is not None and names is not None and name not in names:
            message = unknown_provider_message(name, names)
            raise PydanticCustomError("unknown_provider", "{message}", {"message": message})
        return name


class LLMAgent:
    """Drives one run: request, tool calls, repeat, through the spec's provider. The
    spec's ``model`` wins over the provider's."""

    def __init__(self, spec: LLMSpec, provider: ProviderClient) -> None:
        self.spec = spec
        self.provider = provider
        self.model = spec.model or provider.settings.model
        self.history = ChatHistory(spec.system_prompt)

    def step(self, ctx: StepContext) -> StepResult:
        self.history.extend(ctx.history(after_seq=self.history.last_seq))
        started = time.monotonic()
        on_text = ctx.delta if self.spec.stream else None  # the fragments go live as they come
        response = ctx.call_async(self.provider.complete, self._request_body(ctx), on_text)
        choice, message, usage = _parts(response)
        ctx.emit(
            LLMCallPayload(
                model=str(response.get("model") or self.model),
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                finish_reason=choice.get("finish_reason"),
            )
        )
        text, raw_calls = message.get("content"), message.get("tool_calls") or []
        if text:
            ctx.emit(MessagePayload(text=text))
        if not raw_calls:
            return finish(text)
        calls = [_tool_call(raw, index, ctx.run_id) for index, raw in enumerate(raw_calls)]
        results = ctx.call_tools(
            calls, max_parallel=self.spec.max_parallel_tools, allowed=self.spec.tools
        )
        for result in results:
            if result.data.get("finish"):
                final = str(result.data.get("message", ""))
                ctx.emit(MessagePayload(text=final))
                return finish(final)
        return CONTINUE

    def _request_body(self, ctx: StepContext) -> dict[str, Any]:
        tools = [schema for name in self.spec.tools if (schema := ctx.tool_schema(name))]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self.history.messages(),
            "temperature": self.spec.temperature,
        }
        if tools:
            body["tools"] = tools
        return body


def _tool_call(raw: dict[str, Any], index: int, run_id: str) -> ToolCall:
    function = raw.get("function") or {}
    name = str(function.get("name") or "")
    call_id = str(raw.get("id") or f"{run_id}:{index}")
    return ToolCall(call_id=call_id, tool=name, arguments=function.get("arguments") or "{}")


def _parts(response: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The first choice, its message and the usage of a completion.

    Errors: :class:`ProviderError` when the body is not shaped like a completion.
    """
    try:
        choice = response["choices"][0]
        message = choice.get("message") or {}
        usage = response.get("usage") or {}
        if not all(isinstance(part, dict) for part in (choice, message, usage)):
            raise TypeError("not objects")
    except (KeyError, IndexError, TypeError, AttributeError):
        shown = str(response)[:300]
        raise ProviderError(f"the model provider answered with no usable choice: {shown}") from None
    return choice, message, usage
