"""The model provider's HTTP side: one client per supervisor, retries, one deadline per step.

:class:`ProviderClient` holds the ``[llm]`` settings and one :class:`httpx.AsyncClient`,
shared by every ``llm`` run of a supervisor so that connections (and their TLS sessions) are
reused from one request to the next instead of being opened for each. Think of it as the
supervisor's phone line to the provider: every run dials through it, and it is hung up
once, when the supervisor stops.

Ownership: :func:`~app.agents.registry.default_registry` creates it and registers
:meth:`ProviderClient.aclose` as a closer of the registry; the supervisor that owns the
registry closes it when its ``serve()`` ends. The httpx client itself is created lazily, on
the Trio thread, by the first request — but *built* in a worker thread (on a limiter of its
own, never Trio's default one), because loading the CA bundle for its TLS context takes
~40 ms: longer than a whole request to a local model server, and a stall for every other
task if done on the Trio thread. After :meth:`~ProviderClient.aclose` the next request
builds a new client, so a registry may serve several supervisors one after the other.

Retries: 429, 5xx and transport errors are retried at most ``llm.max_retries`` times with
exponential backoff and full jitter; a ``Retry-After`` header (seconds or an HTTP date)
wins. Each retry logs one line on the ``trellis.llm`` logger: the attempt, the status or
error, the delay — never the API key, never a body.

Cancellation:
    Every wait is a Trio checkpoint (the request, the backoff sleep), so cancelling the
    caller — an interrupted run — stops at once. :meth:`~ProviderClient.aclose` is shielded.

Errors::

    Exception
    └── ProviderError    the provider refused (4xx), kept failing until the retries ran
                         out, or gave no usable answer within llm.step_timeout_seconds
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from app.settings import LLMSettings

log = logging.getLogger("trellis.llm")

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: How much of a provider's error text ends up in a run's error message.
_DETAIL_CHARS = 500


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
    """What the attempts of one completion have seen, read when the deadline cuts them."""

    attempts: int = 0
    last_failure: str | None = None


class ProviderClient:
    """Chat Completions requests for every ``llm`` run of one supervisor, over one client.

    ``transport`` is the test seam: given, the client sends through it (an
    ``httpx.MockTransport``, or a real transport wrapped to observe it) and no TLS context
    is built.
    """

    def __init__(
        self, settings: LLMSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._opening = trio.Lock()
        # One thread builds the client; a second first request waits for it on the lock.
        self._build_threads = trio.CapacityLimiter(1)
        self._requests = 0
        self._retries = 0

    def __repr__(self) -> str:
        stats = self.statistics()
        state = "open" if stats.client_open else "closed"
        return f"<ProviderClient {state} | {stats.requests} requests, {stats.retries} retries>"

    def statistics(self) -> ProviderStatistics:
        return ProviderStatistics(self._client is not None, self._requests, self._retries)

    async def complete(
        self, base_url: str, body: dict[str, Any], api_key_env: str
    ) -> dict[str, Any]:
        """POST ``body`` to ``{base_url}/chat/completions``; the parsed JSON answer.

        The key is read from ``$api_key_env`` now, sent as a bearer token, and kept nowhere.
        All attempts and backoffs together get ``llm.step_timeout_seconds``.

        Cancellation:
            Cancelling the caller cancels the request or the backoff in progress.

        Errors:
            :class:`ProviderError` for a 4xx (not retried), when the retries ran out, for
            a 200 whose body is not JSON, and when the step's deadline passed.
        """
        url = f"{base_url.rstrip('/')}/chat/completions"
        headers = {"Content-Type": "application/json"}
        if api_key := os.environ.get(api_key_env):
            headers["Authorization"] = f"Bearer {api_key}"
        tally = _Tally()
        with trio.move_on_after(self.settings.step_timeout_seconds):
            client = await self._open()
            return await self._post_with_retries(client, url, body, headers, tally)
        seconds = self.settings.step_timeout_seconds
        raise ProviderError(
            f"the model provider gave no usable answer within llm.step_timeout_seconds "
            f"({seconds:g} s) after {tally.attempts} attempt(s); "
            f"{tally.last_failure or 'the last request was still waiting for its answer'}"
        )

    async def aclose(self) -> None:
        """Close the client and its connections, once no request is in flight (the
        supervisor calls it after its runs have returned). Idempotent; the next request
        would open a new client.

        Cancellation:
            Shielded: closing sockets is quick, and a half-closed pool would leak them.
        """
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()

    async def _open(self) -> httpx.AsyncClient:
        async with self._opening:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(
                    self._build_client, limiter=self._build_threads
                )
            return self._client

    def _build_client(self) -> httpx.AsyncClient:
        """Worker thread: the client, with its TLS context (the slow part) built here."""
        timeout = httpx.Timeout(
            self.settings.request_timeout_seconds, connect=self.settings.connect_timeout_seconds
        )
        if self._transport is not None:
            return httpx.AsyncClient(timeout=timeout, transport=self._transport)
        return httpx.AsyncClient(timeout=timeout, verify=_tls_context())

    async def _post_with_retries(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        tally: _Tally,
    ) -> dict[str, Any]:
        total = self.settings.max_retries + 1
        for attempt in range(1, total + 1):
            tally.attempts = attempt
            self._requests += 1
            try:
                response = await client.post(url, json=body, headers=headers)
            except httpx.TransportError as exc:
                tally.last_failure = f"cannot reach the model provider at {url}: {exc!r}"
                failure, retry_after = type(exc).__name__, None
            else:
                if response.status_code == 200:
                    return _json_object(response)
                tally.last_failure = _describe_status(response)
                if response.status_code not in RETRIED_STATUSES:
                    break
                failure = f"status {response.status_code}"
                retry_after = response.headers.get("Retry-After")
            if attempt == total:
                break
            delay = self._backoff(attempt - 1, retry_after)
            log.warning(
                "llm request attempt %d of %d failed (%s); retrying in %.2f s",
                attempt,
                total,
                failure,
                delay,
            )
            self._retries += 1
            await trio.sleep(delay)
        raise ProviderError(f"{tally.last_failure} (after {tally.attempts} attempt(s))")

    def _backoff(self, retry: int, retry_after: str | None) -> float:
        """Seconds before the next attempt: ``Retry-After`` if it parses, else exponential
        with full jitter (0.5x to 1.5x); never more than ``backoff_max_seconds``."""
        seconds = retry_after_seconds(retry_after) if retry_after is not None else None
        if seconds is None:
            base = self.settings.backoff_base_seconds * 2**retry
            seconds = base * random.uniform(0.5, 1.5)
        return min(seconds, self.settings.backoff_max_seconds)


def retry_after_seconds(value: str, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from ``now``: ``"1.5"`` or an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``); a date in the past is 0. None if it is neither."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _tls_context() -> ssl.SSLContext:
    """A verifying TLS context with the system's CA bundle (the ~40 ms part)."""
    return ssl.create_default_context()


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        result: dict[str, Any] = response.json()
    except ValueError:
        raise ProviderError(
            f"the model provider answered 200 with a body that is not JSON: {response.text[:300]}"
        ) from None
    return result


def _describe_status(response: httpx.Response) -> str:
    """``the model provider answered 400: <its message>``, whatever the body's shape."""
    try:
        detail = _message_in(response.json()) or response.text
    except ValueError:
        detail = response.text
    shown = detail[:_DETAIL_CHARS] if detail.strip() else "(empty body)"
    return f"the model provider answered {response.status_code}: {shown}"


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
