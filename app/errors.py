"""The one exception tree of Trellis; every error knows its HTTP status and error code.

::

    TrellisError                      500 internal_error
    ├── BadRequest                    400 bad_request       (malformed JSON, duplicate keys,
    │                                                        too deep, a number too long)
    ├── Unauthorized                  401 unauthorized      (no or a wrong API key; +
    │                                                        WWW-Authenticate: Bearer)
    ├── Forbidden                     403 forbidden         (an admin key is needed)
    ├── ForbiddenOrigin               403 forbidden_origin  (Origin not in allowed_origins)
    ├── NotFound                      404 not_found
    ├── RequestTimeout                408 timeout           (a wait that ran out)
    ├── Conflict                      409 conflict
    │   ├── IllegalTransition         409 illegal_transition
    │   ├── ConversationBusy          409 conversation_busy
    │   └── IdempotencyKeyInFlight    409 idempotency_key_in_flight (first request running)
    ├── PayloadTooLarge               413 payload_too_large (body, agent spec)
    ├── UnsupportedMediaType          415 unsupported_media_type (not UTF-8 JSON)
    ├── MisdirectedRequest            421 misdirected_request (Host not this server's)
    ├── InvalidInput                  422 validation_error
    ├── IdempotencyKeyReused          422 idempotency_key_reused (same key, other request)
    ├── RunQueueFull                  429 run_queue_full    (+ Retry-After)
    ├── TenantQuotaExceeded           429 tenant_quota_exceeded (+ Retry-After)
    ├── ShuttingDown                  503 shutting_down
    └── StoreUnavailable              503 store_unavailable (app/store/faults.py: disk
                                                             full, I/O error, read-only)

The supervisor and the store raise these; the HTTP layer (``app/api/errors.py``) maps any of
them to ``{"error": {"code", "message", "detail"}}`` with :attr:`TrellisError.status`.
Embedders catch them like any exception.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError


class TrellisError(Exception):
    """Base class. ``message`` says what happened and what to check; ``detail`` is data."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers that belong with this error (e.g. ``Retry-After``)."""
        return {}


class BadRequest(TrellisError):
    status = 400
    code = "bad_request"


class NotFound(TrellisError):
    status = 404
    code = "not_found"


class RequestTimeout(TrellisError):
    status = 408
    code = "timeout"


class Conflict(TrellisError):
    status = 409
    code = "conflict"


class IllegalTransition(Conflict):
    """A status change the lifecycle table does not allow; nothing was changed."""

    code = "illegal_transition"


class ConversationBusy(Conflict):
    code = "conversation_busy"


class IdempotencyKeyInFlight(Conflict):
    """A request with this Idempotency-Key is still being processed; retry once it has
    answered (draft-ietf-httpapi-idempotency-key-header: 409)."""

    code = "idempotency_key_in_flight"


class IdempotencyKeyReused(TrellisError):
    """The Idempotency-Key was already used with a different request (the draft: 422)."""

    status = 422
    code = "idempotency_key_reused"


class PayloadTooLarge(TrellisError):
    status = 413
    code = "payload_too_large"


class Unauthorized(TrellisError):
    """The request carries no API key, or one that is not configured (never echoed)."""

    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(TrellisError):
    """The key is valid but may not do this (e.g. server details need an admin key)."""

    status = 403
    code = "forbidden"


class ForbiddenOrigin(TrellisError):
    """The request came from a web page whose origin is not in ``allowed_origins``.

    Browsers add ``Origin`` to cross-site requests; a page on another site must not be able
    to drive the API of a server on the user's machine.
    """

    status = 403
    code = "forbidden_origin"


class UnsupportedMediaType(TrellisError):
    """The body is not declared as JSON, or not encoded as UTF-8.

    Refusing every other type is what keeps browsers out: a page may send ``text/plain``
    or a form cross-site without asking first, but never ``application/json``.
    """

    status = 415
    code = "unsupported_media_type"


class MisdirectedRequest(TrellisError):
    """The ``Host`` header names a server this is not (DNS rebinding): neither the bound
    address, a loopback name, nor an ``allowed_hosts`` entry."""

    status = 421
    code = "misdirected_request"


class InvalidInput(TrellisError):
    status = 422
    code = "validation_error"

    @classmethod
    def from_validation_error(
        cls, error: ValidationError, *, prefix: tuple[str | int, ...] = ()
    ) -> InvalidInput:
        """Turn pydantic's errors into one 422 whose message names every bad field."""
        details = [
            {
                "loc": [*prefix, *item["loc"]],
                "msg": item["msg"],
                "type": item["type"],
            }
            for item in error.errors(include_url=False, include_input=False)
        ]
        fields = ", ".join(".".join(str(part) for part in d["loc"]) or "body" for d in details)
        return cls(f"invalid input: {fields}", detail=details)


class RunQueueFull(TrellisError):
    """More runs are waiting for a run slot than ``max_queued_runs`` allows."""

    status = 429
    code = "run_queue_full"

    def __init__(self, message: str, *, retry_after_seconds: int, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_seconds = retry_after_seconds

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class TenantQuotaExceeded(RunQueueFull):
    """The tenant already has ``tenant_max_active_runs`` runs queued or running."""

    code = "tenant_quota_exceeded"


class ShuttingDown(TrellisError):
    """The supervisor is draining: it admits no new runs."""

    status = 503
    code = "shutting_down"
