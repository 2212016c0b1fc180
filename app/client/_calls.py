"""Every call of the API as data: the route it maps to, and how its answer is read.

One function per client method, of the same name and arguments, returning the
:class:`~app.client._requests.Call` that method sends. Their docstrings are the docstrings
of both clients' methods (:func:`~app.client._requests.documented_by`): what each call maps
to, what it returns, which errors it raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from app.api.schemas import (
    ConversationList,
    Count,
    EventList,
    MessageAccepted,
    RunList,
    ServerInfo,
    ServerLimits,
)
from app.client._errors import error_from_response
from app.client._requests import IDEMPOTENCY_KEY, Call
from app.events import Event
from app.records import ConversationRecord, RunRecord
from app.settings import Settings

M = TypeVar("M", bound=BaseModel)


# -- reading answers --------------------------------------------------------------------


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate_json(response.content)


def _nothing(response: httpx.Response) -> None:
    return None


def _count(response: httpx.Response) -> int:
    return Count.model_validate_json(response.content).count


def _runs(response: httpx.Response) -> list[RunRecord]:
    return RunList.model_validate_json(response.content).items


def _server_info(response: httpx.Response) -> ServerInfo:
    """``ServerInfo`` with everything validated but ``settings``: secrets in it arrive
    masked (``***``), which no :class:`~app.settings.Settings` accepts, so the settings are
    the server's JSON values as they are (nested tables stay plain dicts)."""
    data = response.json()
    shown = Settings.model_construct(**data.pop("settings", {}))
    return ServerInfo.model_validate({**data, "settings": shown})


def _limits(response: httpx.Response) -> ServerLimits:
    return _server_info(response).limits


def _ok(response: httpx.Response) -> bool:
    return response.status_code == 200


def _ready(response: httpx.Response) -> bool:
    if response.status_code == 503:
        return False
    if response.is_error:
        raise error_from_response(response)
    return True


def _query(**values: Any) -> dict[str, str]:
    """Query parameters: ``None`` left out, booleans as ``true``/``false``."""
    params = {}
    for name, value in values.items():
        if value is None:
            continue
        params[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return params


def conversation_path(conversation_id: str, rest: str = "") -> str:
    return f"/api/conversations/{quote(conversation_id, safe='')}{rest}"


# -- conversations ----------------------------------------------------------------------


def create_conversation(
    agent: dict[str, Any],
    *,
    title: str | None = None,
    initial_message: str | None = None,
    max_iterations: int | None = None,
    workspace: str | None = None,
    run: bool = False,
    webhook_url: str | None = None,
    idempotency_key: str | None = None,
) -> Call[ConversationRecord]:
    """Create a conversation: ``POST /api/conversations`` → 201.

    ``agent`` is the agent spec, e.g. ``{"kind": "script", "steps": [{"say": "hi"}]}``.
    With ``run=True`` its first run starts at once, atomically: a refused run (429 queue
    full, 503 draining) stores nothing. ``webhook_url`` gets a POST when each run ends.
    ``idempotency_key`` makes the request safe to repeat (the same key gets the first
    answer again); with ``retries_on_429`` one is made up when none is given.

    Returns the :class:`~app.records.ConversationRecord`, with its ``run`` when started.
    Errors: 413 ``PayloadTooLarge``, 422 ``UnprocessableEntity`` (a field, e.g. a step the
    agent kind does not know), 429 ``QueueFull``, 503 ``ServiceUnavailable``.
    """
    body: dict[str, Any] = {"agent": agent, "run": run}
    optional = {
        "title": title,
        "initial_message": initial_message,
        "max_iterations": max_iterations,
        "workspace": workspace,
        "webhook": {"url": webhook_url} if webhook_url is not None else None,
    }
    body.update((name, value) for name, value in optional.items() if value is not None)
    headers = {IDEMPOTENCY_KEY: idempotency_key} if idempotency_key else {}
    return Call(
        "POST",
        "/api/conversations",
        _model(ConversationRecord),
        body=body,
        headers=headers,
        creates=True,
    )


def list_conversations(
    *, status: str | None = None, limit: int | None = None, cursor: str | None = None
) -> Call[ConversationList]:
    """One page of conversations, newest first: ``GET /api/conversations``.

    Items are summaries (``agent_kind`` instead of the spec). Pass ``next_cursor`` back as
    ``cursor`` for the next page; ``iter_conversations`` does that for you.
    """
    params = _query(status=status, limit=limit, cursor=cursor)
    return Call("GET", "/api/conversations", _model(ConversationList), params=params)


def get_conversation(conversation_id: str) -> Call[ConversationRecord]:
    """A conversation with its current run (and its live ``queue_position``):
    ``GET /api/conversations/{id}``. Errors: 404 ``NotFound`` (also another tenant's)."""
    return Call("GET", conversation_path(conversation_id), _model(ConversationRecord))


def delete_conversation(conversation_id: str, *, delete_workspace: bool = False) -> Call[None]:
    """Stop the conversation's runs and delete its data: ``DELETE /api/conversations/{id}``
    → 204. ``delete_workspace=True`` also removes its workspace directory (a shared one only
    when no other conversation names it). Open streams of it end (reason ``deleted``).
    Errors: 404 ``NotFound``; 409 ``Conflict`` (``workspace_in_use``)."""
    params = _query(delete_workspace=True) if delete_workspace else {}
    return Call("DELETE", conversation_path(conversation_id), _nothing, params=params)


def send_message(
    conversation_id: str,
    content: str,
    *,
    run: bool = False,
    if_busy: str | None = None,
    idempotency_key: str | None = None,
) -> Call[MessageAccepted]:
    """Append a user message: ``POST /api/conversations/{id}/messages`` → 202.

    With ``run=True`` a run starts too (``if_busy`` defaults to ``enqueue`` here: after
    the active run), atomically: a refused run stores no message. Returns the stored
    ``event`` and the ``run`` (or ``None``). Errors: 404, 409, 429 ``QueueFull``, 503.
    """
    body: dict[str, Any] = {"content": content, "run": run}
    if if_busy is not None:
        body["if_busy"] = if_busy
    headers = {IDEMPOTENCY_KEY: idempotency_key} if idempotency_key else {}
    return Call(
        "POST",
        conversation_path(conversation_id, "/messages"),
        _model(MessageAccepted),
        body=body,
        headers=headers,
        creates=True,
    )


# -- runs -------------------------------------------------------------------------------


def start_run(
    conversation_id: str, *, if_busy: str = "reject", idempotency_key: str | None = None
) -> Call[RunRecord]:
    """Start a run: ``POST /api/conversations/{id}/runs`` → 202 with the run (``queued``,
    with its ``queue_position`` while it waits for a run slot).

    ``if_busy`` says what happens while a run is active: ``reject`` (409 ``Conflict``,
    code ``conversation_busy``), ``enqueue`` (run after it) or ``interrupt`` (replace it).
    Errors: 404, 409, 429 ``QueueFull`` (``retry_after`` says when to try again), 503.
    """
    headers = {IDEMPOTENCY_KEY: idempotency_key} if idempotency_key else {}
    return Call(
        "POST",
        conversation_path(conversation_id, "/runs"),
        _model(RunRecord),
        body={"if_busy": if_busy},
        headers=headers,
        creates=True,
    )


def list_runs(
    conversation_id: str, *, limit: int | None = None, after: int | None = None
) -> Call[RunList]:
    """The conversation's runs, oldest first: ``GET /api/conversations/{id}/runs``; pass
    ``next_after`` back as ``after`` for the next page."""
    params = _query(limit=limit, after=after)
    return Call("GET", conversation_path(conversation_id, "/runs"), _model(RunList), params=params)


def get_run(conversation_id: str, run_id: str) -> Call[RunRecord]:
    """One run, with its live queue position: ``GET /api/conversations/{id}/runs/{run_id}``."""
    path = conversation_path(conversation_id, f"/runs/{quote(run_id, safe='')}")
    return Call("GET", path, _model(RunRecord))


def wait_run(conversation_id: str, run_id: str, *, timeout: float = 30.0) -> Call[RunRecord]:
    """Wait until the run has ended, for at most ``timeout`` seconds (≤ 3600):
    ``GET /api/conversations/{id}/runs/{run_id}/wait``. The server holds the request; the
    client's read timeout is stretched by ``timeout`` for it.

    Returns the ended run (``finished``, ``paused``, ``error`` …). Errors: 408
    ``WaitTimedOut`` if it has not ended by then (call again to keep waiting), 404.
    """
    path = conversation_path(conversation_id, f"/runs/{quote(run_id, safe='')}/wait")
    return Call(
        "GET", path, _model(RunRecord), params=_query(timeout=timeout), wait_seconds=timeout
    )


def pause(conversation_id: str) -> Call[RunRecord]:
    """Stop the active run at its next step boundary: ``POST …/{id}/pause`` → 202 with the
    run, ``pausing`` until the current step ends, then ``paused``. Errors: 404, 409
    ``Conflict`` (no active run)."""
    return Call("POST", conversation_path(conversation_id, "/pause"), _model(RunRecord))


def interrupt(conversation_id: str) -> Call[RunRecord]:
    """Stop the active and enqueued runs now, even mid-step: ``POST …/{id}/interrupt`` →
    202 once stopped, with the run ``paused`` (reason ``interrupt``). Errors: 404, 409."""
    return Call("POST", conversation_path(conversation_id, "/interrupt"), _model(RunRecord))


def server_runs(*, status: str | None = None, limit: int | None = None) -> Call[list[RunRecord]]:
    """Active runs server-wide: ``GET /api/runs`` — running first, then the queued ones in
    the order they will start (``status``: ``running`` or ``queued``). A non-admin key sees
    its own tenant's runs."""
    params = _query(status=status, limit=limit)
    return Call("GET", "/api/runs", _runs, params=params)


# -- events -----------------------------------------------------------------------------


def search_events(
    conversation_id: str,
    *,
    kind: str | None = None,
    source: str | None = None,
    run_id: str | None = None,
    q: str | None = None,
    after_seq: int | None = None,
    before_seq: int | None = None,
    order: str | None = None,
    limit: int | None = None,
) -> Call[EventList]:
    """Search a conversation's events: ``GET /api/conversations/{id}/events``.

    Filters: ``kind`` (``message``, ``status`` …), ``source`` (``user``, ``agent``, ``tool``,
    ``system``), ``run_id``, ``q`` (text), ``after_seq``/``before_seq``; ``order`` ``asc``
    (default) or ``desc``; ``limit`` 1..1000. Pages end with ``next_after_seq`` (ascending)
    or ``next_before_seq`` (descending). Errors: 404, 422 (a bad filter value).
    """
    params = _query(
        kind=kind,
        source=source,
        run_id=run_id,
        q=q,
        after_seq=after_seq,
        before_seq=before_seq,
        order=order,
        limit=limit,
    )
    return Call(
        "GET", conversation_path(conversation_id, "/events"), _model(EventList), params=params
    )


def count_events(
    conversation_id: str,
    *,
    kind: str | None = None,
    source: str | None = None,
    run_id: str | None = None,
    q: str | None = None,
    after_seq: int | None = None,
    before_seq: int | None = None,
) -> Call[int]:
    """How many events match the filters of ``search_events``:
    ``GET /api/conversations/{id}/events/count``."""
    params = _query(
        kind=kind, source=source, run_id=run_id, q=q, after_seq=after_seq, before_seq=before_seq
    )
    return Call("GET", conversation_path(conversation_id, "/events/count"), _count, params=params)


def get_event(conversation_id: str, event_id: str) -> Call[Event]:
    """One event by its id: ``GET /api/conversations/{id}/events/{event_id}``."""
    path = conversation_path(conversation_id, f"/events/{quote(event_id, safe='')}")
    return Call("GET", path, _model(Event))


# -- the server -------------------------------------------------------------------------


def server_info() -> Call[ServerInfo]:
    """Version, limits, live statistics (run slots, the line, threads, limiters) and the
    effective settings: ``GET /api/server``. With API keys, admin keys only (403).

    ``settings`` holds the values as the server shows them — secrets masked (``***``) —
    so they are not validated again: nested tables are plain dicts.
    """
    return Call("GET", "/api/server", _server_info)


def set_limits(
    *, max_concurrent_runs: int | None = None, max_queued_runs: int | None = None
) -> Call[ServerLimits]:
    """Change the run limits at runtime: ``PATCH /api/server/limits``. Raising
    ``max_concurrent_runs`` starts queued runs at once; 0 holds them all (running runs keep
    their slots). Returns the limits now in force. Errors: 403 (admin keys only), 422."""
    body = {"max_concurrent_runs": max_concurrent_runs, "max_queued_runs": max_queued_runs}
    body = {name: value for name, value in body.items() if value is not None}
    return Call("PATCH", "/api/server/limits", _limits, body=body)


def health() -> Call[bool]:
    """Liveness: ``GET /health`` answers 200 while the process runs (also while draining).
    Errors: :class:`~app.client.TrellisConnectionError` when nothing answers."""
    return Call("GET", "/health", _ok)


def ready() -> Call[bool]:
    """Readiness: ``GET /ready`` — ``False`` (503) while the server drains or its store
    cannot write, ``True`` (200) when it takes work. Errors: as :func:`health`."""
    return Call("GET", "/ready", _ready, reads_errors=True)
