"""The ``Idempotency-Key`` header of create, message and run requests, as
draft-ietf-httpapi-idempotency-key-header describes it (see ``app/store/idempotency.py``
for how keys and first answers are stored):

- the same key with the same request replays the first answer (``Idempotent-Replayed``);
- the same key with another request is 422 ``idempotency_key_reused``;
- while a request with a key is being processed, another with that key is 409
  ``idempotency_key_in_flight`` (:func:`guarded`);
- a key is scoped to the tenant that sent it, and kept ``idempotency_key_retention_hours``.

Keys in flight are tracked in memory, per process (:class:`KeysInFlight`): two servers on
one database do not see each other's (one server per data directory is enforced today; a
cluster would need the claim in the shared store).
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar

import pydantic_core
from quart import Quart, Response, current_app, request

from app.auth import current_principal
from app.errors import BadRequest, IdempotencyKeyInFlight
from app.store.idempotency import Answer, Replayed, client_key, key_cutoff, scoped_key
from app.supervisor import RunSupervisor

R = TypeVar("R")
P = ParamSpec("P")

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
#: Visible ASCII (a header value may carry nothing else safely; no spaces, no controls).
_KEY_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)
_IN_FLIGHT = "trellis.idempotency_in_flight"


def header_key() -> str | None:
    """The request's ``Idempotency-Key`` scoped to its tenant, or ``None`` without one.

    Errors: :class:`~app.errors.BadRequest` for a key that is empty, longer than
    ``MAX_KEY_CHARS`` or has a character that is not visible ASCII.
    """
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS or not _KEY_CHARS.issuperset(key):
        raise BadRequest(
            f"{HEADER} must be 1 to {MAX_KEY_CHARS} visible ASCII characters (no spaces);"
            " a UUID is a good key",
            detail={"loc": ["header", HEADER], "max_length": MAX_KEY_CHARS},
        )
    return scoped_key(current_principal().tenant, key)


def request_key(raw_body: dict[str, Any]) -> tuple[str, str] | None:
    """The request's scoped key and a hash of the request (method, path, body), or ``None``.

    Errors: as :func:`header_key`.
    """
    key = header_key()
    if key is None:
        return None
    body = json.dumps(raw_body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()
    return key, digest


async def replay_if_known(sup: RunSupervisor, key: tuple[str, str] | None) -> None:
    """Answer a retried request before admission looks at it (a replay must not get a
    429 because the queue filled up since the first request). A key older than the
    retention is deleted first: it is a new key.

    Errors: :class:`~app.store.idempotency.Replayed` carrying the first answer;
    :class:`~app.errors.IdempotencyKeyReused`. The store checks again when it writes.
    """
    if key is not None:
        await sup.io(_forget_expired_then_check, sup, *key)


def _forget_expired_then_check(sup: RunSupervisor, key: str, request_hash: str) -> None:
    """In an I/O thread: two short transactions (the key is claimed in flight, so no
    other request of this process writes it in between)."""
    cutoff = key_cutoff(sup.settings.idempotency_key_retention_hours)
    sup.store.purge_idempotency_keys(cutoff, key)
    sup.store.check_idempotency_key(key, request_hash)


class KeysInFlight:
    """The scoped keys of requests being processed by this process (Trio thread only)."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def claim(self, key: str) -> None:
        """Errors: :class:`~app.errors.IdempotencyKeyInFlight` if ``key`` is claimed."""
        if key in self._keys:
            raise IdempotencyKeyInFlight(
                f"a request with this {HEADER} is still being processed; retry once it has"
                " been answered to get its answer",
                detail={"idempotency_key": client_key(key)},
            )
        self._keys.add(key)

    def release(self, key: str) -> None:
        self._keys.discard(key)

    def __contains__(self, key: str) -> bool:
        return key in self._keys


def keys_in_flight(app: Quart) -> KeysInFlight:
    """The app's keys in flight (created when first asked for)."""
    keys: KeysInFlight = app.extensions.setdefault(_IN_FLIGHT, KeysInFlight())
    return keys


def guarded(view: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """Decorate a keyed write's view: its key is claimed in flight for as long as the view
    runs (409 for a second request with it meanwhile), and released however it ends —
    answer, error, replay or cancellation (a client that disconnects): ``finally``, with
    no checkpoint in between, so a cancelled view cannot leave its key claimed.

    A malformed key is a 400 before anything else is looked at.
    """

    @functools.wraps(view)
    async def claiming(*args: P.args, **kwargs: P.kwargs) -> Response:
        key = header_key()
        if key is None:
            return await view(*args, **kwargs)
        keys = keys_in_flight(current_app)
        keys.claim(key)
        try:
            return await view(*args, **kwargs)
        finally:
            keys.release(key)

    return claiming


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
