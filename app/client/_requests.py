"""How a call is sent and answered, shared by both clients (sans-IO, as h11 is).

A call of the API is data — a :class:`Call`: method, path, query, JSON body, headers, and how
to read its answer (the server's own pydantic model). :mod:`app.client._calls` has one
function per route that builds it; both clients (:mod:`app.client._async`,
:mod:`app.client._sync`) are thin: a method builds its call and the client's ``_call``
sends it with :func:`build_request`, then reads the answer with :func:`finish`.
Everything here does no I/O, so the rules hold alike for the sync and the async client:

- an error status becomes the :class:`~app.client.APIError` subclass of its status
  (:func:`finish`);
- a 429 is retried after ``Retry-After`` when the client allows it (:class:`RetryPolicy`),
  and a create that may be retried carries an ``Idempotency-Key`` — the same on every
  attempt — so it is never done twice (:func:`with_idempotency_key`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from app.backoff import backoff_seconds
from app.client._errors import ResponseFormatError, error_from_response

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

IDEMPOTENCY_KEY = "Idempotency-Key"
#: Retrying a 429 without a ``Retry-After`` header: 1 s, doubling, with jitter (the server
#: always sends one: ``queue_full_retry_after_seconds``, 5 by default).
RETRY_BASE_SECONDS = 1.0
#: The longest sleep before a retry, whatever ``Retry-After`` says: a client that silently
#: waits for minutes looks hung; past this, the error is the better answer.
RETRY_MAX_SECONDS = 60.0


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer.

    ``creates``: a POST that writes something, so a retry must carry an idempotency key.
    ``wait_seconds``: the server may hold the answer that long (``wait_run``), on top of
    the client's timeout. ``reads_errors``: ``parse`` gets error answers too (``ready``).
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    creates: bool = False
    wait_seconds: float = 0.0
    reads_errors: bool = False


def documented_by(builder: Callable[..., Any]) -> Callable[[F], F]:
    """Give a client method the docstring of the builder it calls (one text, two clients)."""

    def decorate(method: F) -> F:
        method.__doc__ = builder.__doc__
        return method

    return decorate


def build_request(
    http: httpx.Client | httpx.AsyncClient, call: Call[Any], timeout: httpx.Timeout
) -> httpx.Request:
    """The :class:`httpx.Request` for ``call`` (auth and base URL come from ``http``)."""
    if call.wait_seconds and timeout.read is not None:
        read = timeout.read + call.wait_seconds
        timeout = httpx.Timeout(
            connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
        )
    return http.build_request(
        call.method,
        call.path,
        params=dict(call.params),
        json=call.body,
        headers=dict(call.headers),
        timeout=timeout,
    )


def finish(call: Call[T], response: httpx.Response) -> T:
    """The answer as ``call``'s result. Errors: the :class:`~app.client.APIError` subclass
    of an error status; :class:`ResponseFormatError` for an answer that is not the model."""
    if response.is_error and not call.reads_errors:
        raise error_from_response(response)
    try:
        return call.parse(response)
    except ValidationError as error:
        raise ResponseFormatError(
            f"{call.method} {call.path} answered {response.status_code} with a body that does"
            f" not fit: {error.error_count()} errors, first {error.errors()[0]['loc']}"
        ) from error


def with_idempotency_key(call: Call[T], retries_on_429: int) -> Call[T]:
    """``call`` with a fresh ``Idempotency-Key`` if it creates, may be retried and has
    none: every retry then sends the same key, so the server writes at most once (and
    answers a retry of a request it already served with that first answer)."""
    if not call.creates or retries_on_429 <= 0 or IDEMPOTENCY_KEY in call.headers:
        return call
    return dataclasses.replace(call, headers={**call.headers, IDEMPOTENCY_KEY: str(uuid.uuid4())})


class RetryPolicy:
    """Whether to send a request again after a 429, and when. One per call; sans-IO."""

    def __init__(self, retries_on_429: int) -> None:
        self.retries_left = retries_on_429
        self.retried = 0

    def delay(self, response: httpx.Response) -> float | None:
        """Seconds to sleep before retrying, or ``None``: answer with ``response``."""
        if response.status_code != 429 or self.retries_left <= 0:
            return None
        seconds = backoff_seconds(
            self.retried,
            response.headers.get("Retry-After"),
            base_seconds=RETRY_BASE_SECONDS,
            max_seconds=RETRY_MAX_SECONDS,
        )
        self.retries_left -= 1
        self.retried += 1
        return seconds


#: A stream's read timeout is at least this: the server sends a heartbeat after
#: ``stream_heartbeat_seconds`` (15 by default) of silence, so 45 s without a byte is three
#: missed heartbeats — a dead connection, which the stream then replaces.
STREAM_READ_SECONDS = 45.0


@dataclass(frozen=True)
class ClientOptions:
    """What both clients are configured with; the key is never shown."""

    base_url: str
    api_key: str | None
    timeout: float
    retries_on_429: int

    def __str__(self) -> str:
        key = ", api key" if self.api_key else ""
        return (
            f"{self.base_url}{key}, timeout {self.timeout} s, retries_on_429={self.retries_on_429}"
        )

    @property
    def timeouts(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout)

    @property
    def stream_timeouts(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=max(self.timeout, STREAM_READ_SECONDS))

    def httpx_arguments(self) -> dict[str, Any]:
        """Arguments for ``httpx.Client`` / ``httpx.AsyncClient``: base URL, headers, timeout."""
        from app import __version__

        headers = {"User-Agent": f"trellis-client/{__version__}"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": headers, "timeout": self.timeouts}
