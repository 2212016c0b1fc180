"""Request bodies, query strings and response bodies of the HTTP API.

Handlers validate input with these models and build their answers with them, and
``/openapi.json`` is generated from the same models: the documentation cannot drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from app.events import Event
from app.handles import IfBusy, SupervisorStatistics
from app.lifecycle import Status
from app.records import ConversationListItem, RunRecord, Webhook
from app.settings import Settings
from app.store.base import INT64_MAX, MAX_PAGE_SIZE

MAX_TEXT_CHARS = 100_000
#: Marks a field whose value is an agent spec: ``/openapi.json`` replaces its free-form
#: schema with the discriminated union (on ``kind``) over the registry's spec models, which
#: are known only when the app serves (embedders register their own kinds).
AGENT_SPEC_MARKER = "x-trellis-agent-spec"


class _Strict(BaseModel):
    """A request body or query string: unknown fields are errors.

    Body numbers and booleans are ``Strict*`` types (``"5"`` is not a number, ``true`` is
    not 1), and pydantic never turns a number into a ``str``. Query values arrive as text,
    so their integers are parsed — and bounded, at most by 2^63 - 1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateConversation(_Strict):
    #: Validated against its kind's spec model by the registry (``app/agents/registry.py``).
    agent: dict[str, Any] = Field(
        description="The agent spec: `kind` picks the agent and its fields.",
        json_schema_extra={AGENT_SPEC_MARKER: True},
    )
    title: str | None = Field(None, max_length=200)
    initial_message: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    max_iterations: StrictInt | None = Field(None, ge=1, le=1_000_000)
    #: A directory name under workspaces_dir (no leading dot, no slash), shared by the
    #: conversations that name it; default: a directory of the conversation's own.
    workspace: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")
    run: StrictBool = False
    #: POSTed to when each run ends; the URL must start with a webhook_allowed_urls prefix.
    webhook: Webhook | None = None


class PostMessage(_Strict):
    content: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    run: StrictBool = False
    #: With ``run: true`` while a run is active; a message usually asks for a turn after it.
    if_busy: IfBusy = IfBusy.ENQUEUE


class StartRun(_Strict):
    if_busy: IfBusy = IfBusy.REJECT


class ListConversations(_Strict):
    status: Status | None = None
    limit: int = Field(100, ge=1, le=MAX_PAGE_SIZE)
    cursor: str | None = Field(None, max_length=32)


class DeleteConversation(_Strict):
    #: Also delete the conversation's workspace directory (shared by name: all of it).
    delete_workspace: bool = False


class ListRuns(_Strict):
    limit: int = Field(100, ge=1, le=MAX_PAGE_SIZE)
    after: int | None = Field(None, ge=0, le=INT64_MAX)


class ServerRuns(_Strict):
    status: Literal["queued", "running"] | None = None
    limit: int = Field(MAX_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)


class WaitRun(_Strict):
    timeout: float = Field(30.0, ge=0, le=3600)


class Limits(_Strict):
    max_concurrent_runs: StrictInt | None = Field(None, ge=0, le=10_000)
    max_queued_runs: StrictInt | None = Field(None, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _at_least_one(self) -> Limits:
        if self.max_concurrent_runs is None and self.max_queued_runs is None:
            raise ValueError("give max_concurrent_runs, max_queued_runs or both")
        return self


# -- responses --------------------------------------------------------------------------


class ConversationList(BaseModel):
    #: Summaries (no agent spec); a stored record that cannot be read is listed as its id
    #: with an ``error``. A page may hold fewer than ``limit`` items: it stays under 1 MiB.
    items: list[ConversationListItem]
    #: Pass back as ``cursor`` for the next (older) page; null on the last page.
    next_cursor: str | None


class RunList(BaseModel):
    items: list[RunRecord]
    #: Pass back as ``after`` for the next page; null on the last page.
    next_after: int | None = None


class EventList(BaseModel):
    items: list[Event]
    #: Ascending search: pass back as ``after_seq``. Descending: ``next_before_seq``.
    next_after_seq: int | None = None
    next_before_seq: int | None = None


class Count(BaseModel):
    count: int


class MessageAccepted(BaseModel):
    event: Event
    run: RunRecord | None


class ServerLimits(BaseModel):
    max_concurrent_runs: int
    max_queued_runs: int
    io_threads: int
    tool_threads: int
    max_iterations: int


class ServerInfo(BaseModel):
    version: str
    limits: ServerLimits
    statistics: SupervisorStatistics
    settings: Settings = Field(
        description="The effective settings, with the run limits as changed at runtime."
        " Nothing secret: settings name the environment variables that hold API keys (read"
        " once at start-up, then removed from the environment), passwords in URLs are"
        " masked, and webhook_secret is shown as ***."
    )
    sandbox: Literal["bwrap", "none"] = Field(
        description="Where terminal commands run: bwrap (sandboxed) or none; the sandbox"
        ' setting "auto" resolves to one of them at start-up.'
    )


class Health(BaseModel):
    status: Literal["ok", "ready"]


class Ready(Health):
    #: Where terminal commands run: ``bwrap`` (sandboxed) or ``none`` (see ``sandbox``).
    sandbox: Literal["bwrap", "none"]


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail
