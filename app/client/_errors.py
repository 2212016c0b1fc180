"""The client's one exception tree; an API error carries the server's status and code.

::

    ClientError                     anything the client raises on purpose
    ├── TrellisConnectionError      no answer: refused, reset, timed out, cut mid-answer
    ├── ResponseFormatError         an answer that does not fit its model (versions differ)
    └── APIError                    the server answered with an error status
        ├── BadRequest              400 bad_request (malformed JSON, a bad Idempotency-Key)
        ├── Unauthorized            401 unauthorized (no API key, or a wrong one)
        ├── Forbidden               403 forbidden (an admin key is needed), forbidden_origin
        ├── NotFound                404 not_found (or another tenant's conversation)
        ├── WaitTimedOut            408 timeout (wait_run: the run had not ended yet)
        ├── Conflict                409 conversation_busy, illegal_transition,
        │                               idempotency_key_in_flight, workspace_in_use
        ├── PayloadTooLarge         413 payload_too_large
        ├── UnprocessableEntity     422 validation_error, idempotency_key_reused
        ├── QueueFull               429 run_queue_full, tenant_quota_exceeded (+ retry_after)
        └── ServiceUnavailable      503 shutting_down, store_unavailable

Any other error status (415, 421, 500 …) is a plain :class:`APIError`. The class says
*how* the request failed; ``code`` (the server's ``error.code``) says *why*, e.g.::

    try:
        client.start_run(conversation_id)
    except Conflict as error:
        if error.code != "conversation_busy":
            raise

The server's answers are documented in ``app/errors.py`` (its own tree, from which these
statuses and codes come) and the README's API reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx

from app.backoff import retry_after_seconds


class ClientError(Exception):
    """Base class of every error the client raises."""


class TrellisConnectionError(ClientError):
    """The server could not be reached, or the connection broke before the answer was
    complete (refused, reset, timed out). The request may or may not have been processed:
    a create retried after this should carry the same ``idempotency_key``."""


class ResponseFormatError(ClientError):
    """A successful answer did not fit its model: the client and the server are probably
    different versions of Trellis."""


class APIError(ClientError):
    """The server answered with an error: ``{"error": {"code", "message", "detail"}}``.

    ``status`` is the HTTP status, ``code`` the server's error code (``"not_found"``,
    ``"run_queue_full"`` …), ``message`` what happened and what to check, ``detail`` the
    server's data about it (e.g. the fields a 422 refused), and ``retry_after`` the seconds
    of a ``Retry-After`` header (429), else ``None``. ``str(error)`` is ``"code: message"``.
    """

    status_hint: ClassVar[int | None] = None

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r})"


class BadRequest(APIError):
    status_hint = 400


class Unauthorized(APIError):
    status_hint = 401


class Forbidden(APIError):
    status_hint = 403


class NotFound(APIError):
    status_hint = 404


class WaitTimedOut(APIError):
    status_hint = 408


class Conflict(APIError):
    status_hint = 409


class PayloadTooLarge(APIError):
    status_hint = 413


class UnprocessableEntity(APIError):
    status_hint = 422


class QueueFull(APIError):
    status_hint = 429


class ServiceUnavailable(APIError):
    status_hint = 503


_BY_STATUS: dict[int, type[APIError]] = {
    cls.status_hint: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        WaitTimedOut,
        Conflict,
        PayloadTooLarge,
        UnprocessableEntity,
        QueueFull,
        ServiceUnavailable,
    )
    if cls.status_hint is not None
}


def error_from_response(response: httpx.Response) -> APIError:
    """The :class:`APIError` subclass for an error answer whose body has been read.

    A body that is not the server's error shape (a proxy's HTML page, say) still gives an
    error: code ``http_error`` and the start of the body as the message.
    """
    code, message, detail = "http_error", response.text[:500] or response.reason_phrase, None
    try:
        error = response.json()["error"]
        code, message, detail = str(error["code"]), str(error["message"]), error.get("detail")
    except (ValueError, KeyError, TypeError):
        pass
    header = response.headers.get("Retry-After")
    retry_after = retry_after_seconds(header) if header is not None else None
    cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(response.status_code, code, message, detail, retry_after)


@contextlib.contextmanager
def connection_errors() -> Iterator[None]:
    """Turn httpx's transport errors (no complete answer) into
    :class:`TrellisConnectionError`, keeping the original as ``__cause__``."""
    try:
        yield
    except httpx.TransportError as error:
        raise TrellisConnectionError(f"{type(error).__name__}: {error}") from error
