"""The ``llm`` agent: any OpenAI-compatible Chat Completions endpoint, with tools.

::

    {"kind": "llm", "model": "...", "base_url": "http://127.0.0.1:8080/v1",
     "api_key_env": "OPENAI_API_KEY", "system_prompt": "...",
     "tools": ["terminal", "file_editor", "finish"], "temperature": 0.0,
     "max_parallel_tools": 4}

One step is one Chat Completions request built from the conversation's events, then the
tool calls it returned (in parallel, on the tool limiter, results in call order). A reply
without tool calls, or a ``finish`` call, ends the run ``finished``.

Cancellation:
    The HTTP request is made on the Trio side (``ctx.call_async``) with httpx's async client,
    so an interrupt cancels it at once — mid-request, mid-backoff — instead of waiting for
    the provider to answer.

Errors:
    429, 5xx and connection errors are retried with exponential backoff and jitter (a
    ``Retry-After`` header wins), at most ``llm.max_retries`` times; then, and for any other
    4xx, :class:`ProviderError` ends the run ``error`` with the status and the provider's
    message. The API key is read from the server's environment at request time and never
    written anywhere.
"""

from __future__ import annotations

import functools
import os
import random
import ssl
import time
from typing import Any, Literal

import httpx
import trio
from pydantic import BaseModel, ConfigDict, Field

from app.agents.base import CONTINUE, StepContext, StepResult, finish
from app.agents.llm_messages import chat_messages
from app.events import LLMCallPayload, MessagePayload
from app.settings import LLMSettings
from app.tools.calls import ToolCall

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful software agent. Use the tools to inspect and change the workspace;"
    " call finish with a short summary when the task is done."
)
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


class ProviderError(Exception):
    """The provider refused or kept failing; the message says how."""


class LLMSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["llm"]
    model: str | None = Field(None, min_length=1, max_length=200)
    base_url: str | None = Field(None, pattern=r"^https?://", max_length=500)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=100)
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, max_length=100_000)
    tools: list[str] = Field(default_factory=lambda: ["terminal", "file_editor", "finish"])
    temperature: float = Field(0.0, ge=0, le=2)
    max_parallel_tools: int = Field(4, ge=1, le=64)


class LLMAgent:
    """Drives one run: request, tool calls, repeat."""

    def __init__(self, spec: LLMSpec, defaults: LLMSettings) -> None:
        self.spec = spec
        self.settings = defaults
        self.model = spec.model or defaults.model
        self.base_url = (spec.base_url or defaults.base_url).rstrip("/")
        self.api_key_env = spec.api_key_env or defaults.api_key_env

    def step(self, ctx: StepContext) -> StepResult:
        body = self._request_body(ctx)
        started = time.monotonic()
        response = ctx.call_async(self._complete, body)
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
        calls = [self._tool_call(raw, index, ctx.run_id) for index, raw in enumerate(raw_calls)]
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
            "messages": chat_messages(self.spec.system_prompt, ctx.history()),
            "temperature": self.spec.temperature,
        }
        if tools:
            body["tools"] = tools
        return body

    def _tool_call(self, raw: dict[str, Any], index: int, run_id: str) -> ToolCall:
        function = raw.get("function") or {}
        name = str(function.get("name") or "")
        call_id = str(raw.get("id") or f"{run_id}:{index}")
        return ToolCall(call_id=call_id, tool=name, arguments=function.get("arguments") or "{}")

    async def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST the request; retry what is worth retrying. Runs on the Trio side."""
        timeout = httpx.Timeout(
            self.settings.request_timeout_seconds, connect=self.settings.connect_timeout_seconds
        )
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        url = f"{self.base_url}/chat/completions"
        async with httpx.AsyncClient(timeout=timeout, verify=_tls_context()) as client:
            for attempt in range(self.settings.max_retries + 1):
                last_attempt = attempt == self.settings.max_retries
                try:
                    response = await client.post(url, json=body, headers=headers)
                except httpx.TransportError as exc:
                    if last_attempt:
                        raise ProviderError(f"cannot reach {url}: {exc!r}") from None
                    await trio.sleep(self._backoff(attempt, None))
                    continue
                if response.status_code == 200:
                    try:
                        result: dict[str, Any] = response.json()
                    except ValueError:
                        raise ProviderError(
                            f"the model provider answered 200 with a body that is not JSON: "
                            f"{response.text[:300]}"
                        ) from None
                    return result
                if response.status_code not in RETRIED_STATUSES or last_attempt:
                    raise ProviderError(_describe_failure(response, attempt + 1))
                await trio.sleep(self._backoff(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before the next attempt: Retry-After if given, else exponential
        with full jitter (0.5x to 1.5x), capped at ``backoff_max_seconds``."""
        if retry_after is not None:
            try:
                seconds = float(retry_after)
                return min(max(seconds, 0.0), self.settings.backoff_max_seconds)
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        base: float = self.settings.backoff_base_seconds * 2**attempt
        return min(base * random.uniform(0.5, 1.5), self.settings.backoff_max_seconds)


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


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every request: building one loads the CA bundle,
    which costs ~40 ms — more than a whole request to a local model server."""
    return ssl.create_default_context()


def _describe_failure(response: httpx.Response, attempts: int) -> str:
    try:
        detail = response.json().get("error", {}).get("message") or response.text
    except ValueError:
        detail = response.text
    status = response.status_code
    return f"the model provider answered {status} after {attempts} attempt(s): {detail[:500]}"
