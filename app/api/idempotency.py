"""The ``Idempotency-Key`` header of create, message and run requests (see
``app/store/idempotency.py`` for how keys and first answers are stored)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pydantic_core
from quart import Response, request

from app.errors import BadRequest
from app.store.idempotency import Answer, Replayed
from app.supervisor import RunSupervisor

R = TypeVar("R")

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 200


def request_key(raw_body: dict[str, Any]) -> tuple[str, str] | None:
    """The request's key and a hash of the request (method, path, body), or ``None``.

    Errors: :class:`~app.errors.BadRequest` for a key that is empty or too long.
    """
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise BadRequest(f"{HEADER} must be 1 to {MAX_KEY_CHARS} characters")
    body = json.dumps(raw_body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()
    return key, digest


async def replay_if_known(sup: RunSupervisor, key: tuple[str, str] | None) -> None:
    """Answer a retried request before admission looks at it (a replay must not get a
    429 because the queue filled up since the first request).

    Errors: :class:`~app.store.idempotency.Replayed` carrying the first answer;
    :class:`~app.errors.IdempotencyKeyReused`. The store checks again when it writes.
    """
    if key is not None:
        await sup.io(sup.store.check_idempotency_key, *key)


class RenderOnce(Generic[R]):
    """A write's answer, rendered once: inside the transaction when a key stores it, and
    then reused for the response instead of serializing the same result again."""

    def __init__(self, render: Callable[[R], Answer]) -> None:
        self._render = render
        self._answer: Answer | None = None

    def __call__(self, result: R) -> Answer:
        if self._answer is None:
            self._answer = self._render(result)
        return self._answer


def answer(data: Any, status: int, headers: dict[str, str] | None = None) -> Answer:
    """An answer as it is sent and stored: the model serialized once, here."""
    return Answer(status, pydantic_core.to_json(data).decode(), dict(headers or {}))


def respond(sent: Answer, *, replayed: bool = False) -> Response:
    headers = dict(sent.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(sent.body, status=sent.status, headers=headers, content_type="application/json")


async def replayed_response(replay: Replayed) -> Response:
    """Error-handler shape: a :class:`Replayed` raised anywhere becomes its answer."""
    return respond(replay.answer, replayed=True)
