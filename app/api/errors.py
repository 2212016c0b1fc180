"""One JSON error shape for every failure: ``{"error": {"code", "message", "detail"}}``."""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response, current_app
from werkzeug.exceptions import HTTPException

from app.api.http import json_response
from app.api.idempotency import replayed_response
from app.errors import TrellisError
from app.store.idempotency import Replayed

log = logging.getLogger("trellis.api")

# Codes for errors raised by Quart/Werkzeug themselves (routing, method, body size).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> Response:
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return json_response(body, status, headers)


async def _trellis_error(error: TrellisError) -> Response:
    return error_response(error.status, error.code, error.message, error.detail, error.headers())


async def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    allowed = getattr(error, "valid_methods", None)
    headers = {"Allow": ", ".join(allowed)} if allowed else None
    message, detail = error.description or error.name, None
    if status == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]  # max_request_bytes (app/web.py)
        message = f"the request body is larger than max_request_bytes ({limit} bytes)"
        detail = {"max_request_bytes": limit}
    return error_response(status, code, message, detail, headers=headers)


async def _unexpected_error(error: Exception) -> Response:
    log.exception("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "an unexpected error occurred; see the server log")


def register_error_handlers(app: Quart) -> None:
    app.register_error_handler(TrellisError, _trellis_error)
    app.register_error_handler(Replayed, replayed_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
