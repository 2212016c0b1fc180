"""One model provider's HTTP side: its client, its key, retries, deadlines, size limits.

A :class:`ProviderClient` is one provider the operator configured (``[llm]``, the
``default`` one, or an ``[llm.providers.NAME]`` table): its settings, its API key (taken
from the environment at start-up, see :mod:`app.agents.providers`) and one
:class:`httpx.AsyncClient`, shared by every ``llm`` run that picks it, so that connections
(and their TLS sessions) are reused. Think of it as a phone line to one provider with the
provider's number and password written on it: runs choose which line to pick up, never
which number it dials, and a line never dials anyone else (redirects are not followed).

Ownership: :class:`~app.agents.providers.Providers` creates one per provider and closes them
when the registry is closed (after every run returned). The httpx client is built by the
first request, in a worker thread of its own (:class:`~app.lazy_client.LazyAsyncClient`:
its TLS context takes ~40 ms). After :meth:`~ProviderClient.aclose` the next request builds
a new client.

Limits — each a setting of the provider's table:

* ``max_response_bytes``: the answer is read as a stream and reading stops past it, so a
  provider answering 400 MB costs the server this much memory at most; the step fails.
* ``request_timeout_seconds``: a *total* deadline per attempt — connecting, sending, and
  reading the whole answer — so a provider dripping a byte a second cannot hold a step.
  A streamed answer is no exception: the limit and the deadline cover the whole stream.
* ``step_timeout_seconds``: every attempt and backoff of one step together.

Retries: 429, 5xx, transport errors and attempts past their deadline are retried at most
``max_retries`` times with exponential backoff and full jitter; a ``Retry-After`` header
(seconds or an HTTP date) wins. Each retry logs one line on the ``trellis.llm`` logger: the
attempt, the status or error, the delay — never the API key, never a body.

Streaming (``complete(body, on_text)``, read by :mod:`app.agents.completion_stream`): text
goes to ``on_text`` as it arrives, the result is the same dict. What went to ``on_text``
cannot be taken back, so an attempt is retried only while none of its text was handed on;
a stream broken off after that fails the step (its message is never stored): no text is
stored or shown twice.

Secrets: the key goes only into the ``Authorization`` header of requests to the provider's
own URL. Whatever the provider sends back has the key's value (and the URL's password)
replaced by ``***`` before it is parsed (streamed: each fragment, and the whole), so a
provider echoing the key cannot put it into an event, a live fragment or a run's error;
error messages show the URL with its password masked.

Cancellation:
    Every wait is a Trio checkpoint (the request, the body's chunks, the backoff sleep), so
    cancelling the caller — an interrupted run — stops at once. :meth:`~ProviderClient.aclose`
    is shielded.

Errors::

    Exception
    └── ProviderError    the provider refused (4xx), kept failing until the retries ran
                         out, answered more than max_response_bytes, broke off a stream
                         whose text was shown, or gave no usable answer within
                         step_timeout_seconds
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from app.agents.completion_stream import CompletionStream, StreamError
from app.backoff import backoff_seconds
from app.lazy_client import LazyAsyncClient
from app.redact import mask_urls, redact_secrets
from app.settings import DEFAULT_PROVIDER, ProviderSettings

log = logging.getLogger("trellis.llm")

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: How much of a provider's error text ends up in a run's error message.
_DETAIL_CHARS = 500
#: How much of an error answer is read (its message is what matters; the rest is dropped).
_ERROR_BODY_BYTES = 64 * 1024


class ProviderError(Exception):
    """The provider refused or kept failing; the message says how."""


@dataclass(frozen=True, slots=True)
class ProviderStatistics:
    """A snapshot: whether a client is open, and the requests and retries made so far."""

    client_open: bool
    requests: int
    retries: int


@dataclass(slots=True)
class _Tally:
    """The attempts of one completion: where their text goes (``on_text``: streamed), and
    what they have seen, read when the deadline cuts them."""

    on_text: Callable[[str], None] | None = None
    attempts: int = 0
    last_failure: str | None = None


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One attempt's outcome: a (redacted) completion, or a failure and whether to retry."""

    completion: dict[str, Any] | None = None
    failure: str | None = None
    retry: bool = False
    log_as: str = ""
    retry_after: str | None = None


class ProviderClient:
    """Chat Completions requests to one provider, for every ``llm`` run that picks it.

    ``api_key`` is the key itself (None: no ``Authorization`` header); the client never
    reads the environment. ``transport`` is the test seam: given, the client sends through
    it (an ``httpx.MockTransport``, or a real transport wrapped to observe it) and no TLS
    context is built.
    """

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        name: str = DEFAULT_PROVIDER,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._url = f"{settings.base_url.rstrip('/')}/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        #: What must never come back out: the key, and the password of the URL.
        self._secrets = (api_key, urlsplit(settings.base_url).password)
        self._transport = transport
        self._build_threads = trio.CapacityLimiter(1)
        self._http = LazyAsyncClient(self._build_client, limiter=self._build_threads)
        self._requests = 0
        self._retries = 0

    def __repr__(self) -> str:
        stats = self.statistics()
        state = "open" if stats.client_open else "closed"
        return (
            f"<ProviderClient {self.name} {state} | {stats.requests} requests,"
            f" {stats.retries} retries>"
        )

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(self._http.statistics().open, self._requests, self._retries)

    def setting(self, field: str) -> str:
        """How messages name one of this provider's settings: ``llm.max_retries`` for the
        default provider, ``llm.providers.NAME.max_retries`` for a named one."""
        table = "llm" if self.name == DEFAULT_PROVIDER else f"llm.providers.{self.name}"
        return f"{table}.{field}"

    def redact(self, text: str) -> str:
        """``text`` with this provider's secrets hidden and its URL's password masked."""
        return mask_urls(redact_secrets(text, self._secrets))

    async def complete(
        self, body: dict[str, Any], on_text: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """POST ``body`` to ``{base_url}/chat/completions``; the parsed JSON answer.

        Given ``on_text``, the answer is streamed and ``on_text`` gets its text piece by
        piece (on the Trio thread: it must not block); the result is the same.

        All attempts and backoffs together get ``step_timeout_seconds``; each attempt
        ``request_timeout_seconds``, its whole answer included.

        Cancellation:
            Cancelling the caller cancels the request (or stream) or the backoff in progress.

        Errors:
            :class:`ProviderError` for a 4xx (not retried), when the retries ran out, for
            a 200 whose body is not JSON (or not a usable stream) or is larger than
            ``max_response_bytes`` (not retried either: it would be as large again), for a
            stream broken off after some of its text went to ``on_text``, and when the
            step's deadline passed.
        """
        tally = _Tally(on_text)
        if on_text is not None:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with trio.move_on_after(self.settings.step_timeout_seconds):
            client = await self._http.get()
            return await self._post_with_retries(client, body, tally)
        seconds = self.settings.step_timeout_seconds
        raise ProviderError(
            f"the model provider gave no usable answer within"
            f" {self.setting('step_timeout_seconds')} ({seconds:g} s) after"
            f" {tally.attempts} attempt(s);"
            f" {tally.last_failure or 'the last request was still waiting for its answer'}"
        )

    async def aclose(self) -> None:
        """Close the client and its connections, once no request is in flight (the
        supervisor calls it after its runs have returned). Idempotent; the next request
        would open a new client.

        Cancellation:
            Shielded: closing sockets is quick, and a half-closed pool would leak them.
        """
        await self._http.aclose()

    def _build_client(self) -> httpx.AsyncClient:
        """Worker thread: the client, with its TLS context (the slow part) built here.
        Redirects are never followed: the key goes to the configured URL and nowhere else."""
        timeout = httpx.Timeout(
            self.settings.request_timeout_seconds, connect=self.settings.connect_timeout_seconds
        )
        if self._transport is not None:
            return httpx.AsyncClient(
                timeout=timeout, transport=self._transport, follow_redirects=False
            )
        return httpx.AsyncClient(timeout=timeout, verify=_tls_context(), follow_redirects=False)

    async def _post_with_retries(
        self, client: httpx.AsyncClient, body: dict[str, Any], tally: _Tally
    ) -> dict[str, Any]:
        total = self.settings.max_retries + 1
        for attempt in range(1, total + 1):
            tally.attempts = attempt
            self._requests += 1
            outcome = await self._attempt(client, body, tally.on_text)
            if outcome.completion is not None:
                return outcome.completion
            tally.last_failure = outcome.failure
            if not outcome.retry or attempt == total:
                break
            delay = backoff_seconds(
                attempt - 1,
                outcome.retry_after,
                base_seconds=self.settings.backoff_base_seconds,
                max_seconds=self.settings.backoff_max_seconds,
            )
            log.warning(
                "llm request attempt %d of %d failed (%s); retrying in %.2f s",
                attempt,
                total,
                outcome.log_as,
                delay,
            )
            self._retries += 1
            await trio.sleep(delay)
        raise ProviderError(f"{tally.last_failure} (after {tally.attempts} attempt(s))")

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        body: dict[str, Any],
        on_text: Callable[[str], None] | None,
    ) -> _Attempt:
        """One request, its whole answer read within ``request_timeout_seconds``. A
        failure is retried only if none of this attempt's text went to ``on_text``."""
        seconds = self.settings.request_timeout_seconds
        stream = CompletionStream(on_text, self.redact) if on_text is not None else None
        with trio.move_on_after(seconds):
            try:
                async with client.stream(
                    "POST", self._url, json=body, headers=self._headers
                ) as response:
                    return await self._read(response, stream)
            except httpx.RequestError as exc:
                failure = f"cannot reach the model provider at {self._url}: {exc!r}"
                return _broken(self.redact(failure), type(exc).__name__, stream)
        failure = (
            f"the model provider sent no complete answer within"
            f" {self.setting('request_timeout_seconds')} ({seconds:g} s)"
        )
        return _broken(failure, "request timeout", stream)

    async def _read(self, response: httpx.Response, stream: CompletionStream | None) -> _Attempt:
        """The answer's body, read as a stream up to its limit, secrets hidden.

        Errors: :class:`ProviderError` for a 200 larger than ``max_response_bytes``, or
        whose body is not JSON.
        """
        status = response.status_code
        content_type = response.headers.get("Content-Type", "")
        if status == 200 and stream is not None and content_type.startswith("text/event-stream"):
            return await self._read_stream(response, stream)
        limit = self.settings.max_response_bytes if status == 200 else _ERROR_BODY_BYTES
        raw = bytearray()
        complete = await _read_at_most(response, limit, raw.extend)
        text = self.redact(raw.decode("utf-8", errors="replace"))
        if status == 200 and not complete:
            raise self._too_large()
        if status == 200:
            return _Attempt(completion=_json_object(text))
        return _Attempt(
            failure=_describe_status(status, text),
            retry=status in RETRIED_STATUSES,
            log_as=f"status {status}",
            retry_after=response.headers.get("Retry-After"),
        )

    async def _read_stream(self, response: httpx.Response, stream: CompletionStream) -> _Attempt:
        """A 200 ``text/event-stream`` body, fed to ``stream`` as it arrives, up to the limit.

        Errors: :class:`ProviderError` for a stream larger than ``max_response_bytes``.
        """
        complete = await _read_at_most(response, self.settings.max_response_bytes, stream.feed)
        if not complete:
            raise self._too_large()
        try:
            completion = stream.finish()  # raises the failure that stopped the read, if any
        except StreamError as exc:
            return _broken(self.redact(str(exc)), "unusable stream", stream)
        # As a whole, too: the fragments were redacted one by one (see WordRelease).
        return _Attempt(
            completion=json.loads(self.redact(json.dumps(completion, ensure_ascii=False)))
        )

    def _too_large(self) -> ProviderError:
        return ProviderError(
            f"the model provider's answer is larger than {self.setting('max_response_bytes')}"
            f" ({self.settings.max_response_bytes} bytes); it was not read further"
        )


def _broken(failure: str, log_as: str, stream: CompletionStream | None) -> _Attempt:
    """An attempt that failed on the way (transport error, deadline, unusable stream):
    retried, unless some of its streamed text was shown already (see the module doc)."""
    if stream is None or not stream.shown:
        return _Attempt(failure=failure, retry=True, log_as=log_as)
    failure = f"the model provider's stream broke off after its text was shown: {failure}"
    return _Attempt(failure=failure + "; not retried, so that no text is shown twice")


async def _read_at_most(
    response: httpx.Response, limit: int, sink: Callable[[bytes], object]
) -> bool:
    """Hand up to ``limit`` bytes of the (decoded) body to ``sink`` as they arrive; whether
    that was all of it. Stops reading at the first chunk past the limit — memory stays
    bounded by ``limit`` plus one network read, whatever the provider sends or declares —
    and as soon as ``sink`` returns ``False`` (it has seen enough).

    Cancellation:
        Reading stops by cancelling a scope of its own, not by leaving the loop: the
        ``Cancelled`` then rises from the socket read *inside* httpcore's chain of body
        generators, which closes each of them (and the connection) at once. Leaving the loop
        would abandon them half-consumed, to be finalized whenever the garbage collector
        gets to them.
    """
    received = 0
    with trio.CancelScope() as reading:
        async for chunk in response.aiter_bytes():
            room = limit - received
            received += len(chunk)
            if sink(chunk[:room]) is False or received > limit:
                reading.cancel()
    return received <= limit


def _json_object(text: str) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(text)
    except ValueError:
        raise ProviderError(
            f"the model provider answered 200 with a body that is not JSON: {text[:300]}"
        ) from None
    return result


def _tls_context() -> ssl.SSLContext:
    """A verifying TLS context with the system's CA bundle (the ~40 ms part)."""
    return ssl.create_default_context()


def _describe_status(status: int, text: str) -> str:
    """``the model provider answered 400: <its message>``, whatever the body's shape."""
    try:
        detail = _message_in(json.loads(text)) or text
    except ValueError:
        detail = text
    shown = detail[:_DETAIL_CHARS] if detail.strip() else "(empty body)"
    return f"the model provider answered {status}: {shown}"


def _message_in(body: Any) -> str | None:
    """The human message in an error body: OpenAI's ``{"error": {"message": ...}}``,
    ``{"error": "..."}``, ``{"detail": "..."}``, ``{"message": "..."}`` or a bare string.
    None for any other shape (a list, a number): the caller shows the raw text instead."""
    if isinstance(body, str):
        return body
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if (found := _message_in(body.get(key))) is not None:
                return found
    return None
