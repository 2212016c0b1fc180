"""A Python client for a Trellis server's HTTP API: sync and async, typed, resumable streams.

::

    from app.client import TrellisClient

    with TrellisClient("http://127.0.0.1:8000") as client:
        created = client.create_conversation(
            {"kind": "script", "steps": [{"say": "hello"}]}, initial_message="hi", run=True
        )
        ended = client.wait_run(created.id, created.run.id)
        for event in client.search_events(created.id, kind="message").items:
            print(event.seq, event.payload)

:class:`AsyncTrellisClient` has the same methods, awaitable, under Trio or asyncio.
Results are the server's own pydantic models (:class:`~app.records.ConversationRecord`,
:class:`~app.records.RunRecord`, :class:`~app.events.Event` …); every failure is a
:class:`ClientError` — an :class:`APIError` subclass per status carrying the server's error
code, or a :class:`TrellisConnectionError`. ``stream()`` follows a conversation live and
resumes by itself after a dropped connection, with no gap and no duplicate.

The layers, one module each: ``_calls`` (one function per route: the request and its
answer's model), ``_requests`` (sending rules shared by both clients: errors, 429 retries,
idempotency keys), ``_sse`` (the stream parser and its resume logic), ``_async`` and
``_sync`` (the two thin clients), ``_errors`` (the exception tree).
"""

from __future__ import annotations

from app.client._async import AsyncTrellisClient
from app.client._errors import (
    APIError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ResponseFormatError,
    ServiceUnavailable,
    TrellisConnectionError,
    Unauthorized,
    UnprocessableEntity,
    WaitTimedOut,
)
from app.client._sse import Delta
from app.client._sync import TrellisClient

__all__ = [
    "APIError",
    "AsyncTrellisClient",
    "BadRequest",
    "ClientError",
    "Conflict",
    "Delta",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "QueueFull",
    "ResponseFormatError",
    "ServiceUnavailable",
    "TrellisClient",
    "TrellisConnectionError",
    "Unauthorized",
    "UnprocessableEntity",
    "WaitTimedOut",
]
