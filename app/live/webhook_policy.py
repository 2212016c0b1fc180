"""The contract with a webhook receiver: which URLs, what is sent, how answers are read.

Apart from the machinery that delivers it (:mod:`app.live.webhooks`): nothing here sends
anything or touches Trio. Only :func:`build_client` blocks (~40 ms loading the CA bundle):
the dispatcher calls it in a worker thread, once.

Who may ask: :func:`check_webhook` refuses (422), at creation, a URL that does not start
with a ``webhook_allowed_urls`` prefix at a ``/``, ``?`` or ``#`` boundary (none by
default), one with user info or a ``..`` segment, and any webhook while the server has no
``webhook_secret`` (an unsigned POST cannot be told from a forged one).

The POST: the JSON body of :func:`delivery_body`, with :func:`delivery_headers`:
``Content-Type: application/json``, ``User-Agent: trellis/<version>``, ``Trellis-Delivery:
<uuid>`` (the same for every attempt of one delivery, so receivers can de-duplicate) and
``Trellis-Signature: sha256=<hex>``, the HMAC-SHA256 of the exact body bytes under
``webhook_secret`` (:func:`sign`), sent with the client of :func:`build_client`: no
redirects followed, no proxy from the environment.

The answer (:func:`judge_answer`): a 2xx is delivered; 5xx, 408 and 429 are retried (a
``Retry-After`` header says when); any other is final. The answer's body is never read.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime

import httpx
import pydantic_core

from app._version import __version__
from app.errors import InvalidInput
from app.records import RunRecord
from app.settings import Settings

RETRIED_STATUSES = frozenset({408, 429})  # and every 5xx


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST's outcome: delivered (``error`` is None), or why not and whether to retry."""

    status_code: int | None = None
    error: str | None = None
    retry: bool = False
    retry_after: str | None = None


def check_webhook(url: str, settings: Settings) -> None:
    """Refuse a webhook this server will not call (see the module docstring).

    Errors: :class:`~app.errors.InvalidInput` (422) at ``body.webhook.url``, saying why.
    """
    problem = url_problem(url, settings.webhook_allowed_urls)
    if problem is None and not settings.webhook_secret:
        problem = "webhook needs the server setting webhook_secret"
    if problem is not None:
        raise InvalidInput(
            f"invalid input: body.webhook.url: {problem}",
            detail=[{"loc": ["body", "webhook", "url"], "msg": problem, "type": "webhook_url"}],
        )


def url_problem(url: str, allowed: list[str]) -> str | None:
    """Why ``url`` may not be called, or ``None``: it must start with an ``allowed``
    prefix that ends at a boundary of the URL (``http://h:80`` does not allow
    ``http://h:8000`` nor ``http://h:80@elsewhere``)."""
    if not allowed:
        return "webhooks are off: the server setting webhook_allowed_urls is empty"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "not a valid URL"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "not an http(s) URL"
    if parsed.userinfo or any(c.isspace() or ord(c) < 32 for c in url):
        return "the URL may not carry user info, spaces or control characters"
    if ".." in url.split("?", 1)[0].split("#", 1)[0].split("/"):
        return "the URL may not contain a '..' segment"
    for prefix in allowed:
        rest = url[len(prefix) :]
        if url.startswith(prefix) and (prefix.endswith("/") or rest[:1] in ("", "/", "?", "#")):
            return None
    return "the URL does not start with any of the server's webhook_allowed_urls"


def sign(secret: str, body: bytes) -> str:
    """The ``Trellis-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_headers(secret: str, delivery_id: str, body: bytes) -> dict[str, str]:
    """The headers of every attempt of one delivery (see the module docstring)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": f"trellis/{__version__}",
        "Trellis-Delivery": delivery_id,
        "Trellis-Signature": sign(secret, body),
    }


def delivery_body(run: RunRecord, delivery_id: str) -> bytes:
    """The JSON sent for the end of ``run``: ids, status, reason and timings (ms)."""

    def ms(start: datetime | None, end: datetime | None) -> float | None:
        if start is None or end is None:
            return None
        return round((end - start).total_seconds() * 1000, 1)

    return pydantic_core.to_json(
        {
            "delivery_id": delivery_id,
            "conversation_id": run.conversation_id,
            "run_id": run.id,
            "status": run.status,
            "reason": run.reason,
            "queued_at": run.queued_at,
            "started_at": run.started_at,
            "finished_at": run.finished_at,
            "queue_wait_ms": ms(run.queued_at, run.started_at),
            "duration_ms": ms(run.started_at, run.finished_at),
            "steps": run.steps,
        }
    )


def judge_answer(status: int, retry_after: str | None) -> Attempt:
    """What the receiver's answer ``status`` (with its ``Retry-After``) means."""
    if 200 <= status < 300:
        return Attempt(status_code=status)
    retry = status >= 500 or status in RETRIED_STATUSES
    note = " (redirects are not followed)" if 300 <= status < 400 else ""
    return Attempt(status, f"the receiver answered {status}{note}", retry, retry_after)


def build_client(timeout_seconds: float) -> httpx.AsyncClient:
    """The client webhooks are sent with; blocks ~40 ms (its TLS context): call it in a
    worker thread. Redirects are never followed (the allow-list must bind every hop), and
    no proxy from the environment is used (the request goes to the URL that was checked)."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_seconds), follow_redirects=False, trust_env=False
    )
