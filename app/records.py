"""Records of conversations and runs, as the store keeps them and the API returns them;
the smaller summaries that lists return."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.lifecycle import Status
from app.principal import DEFAULT_TENANT


class RunRecord(BaseModel):
    """One run: one stretch of the agent loop in one worker thread.

    ``queue_position`` is 1-based among the runs waiting for a run slot, in the order they
    will start; ``None`` for a run that holds a slot, has ended, or still waits for an
    earlier run of its own conversation to end.
    """

    model_config = ConfigDict(frozen=True)
    id: str
    conversation_id: str
    status: Status
    reason: str | None
    queue_position: int | None = None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: int
    error: str | None
    #: The id of the node that claimed the run (``store.node_id`` of the process whose
    #: supervisor admitted it; ``app/cluster/nodes.py``), on a store several nodes share
    #: (PostgreSQL); always ``None`` on SQLite, where one process owns the database.
    node: str | None = None


class Usage(BaseModel):
    """Language-model tokens used by a conversation, over all its runs."""

    model_config = ConfigDict(frozen=True)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Conversation(BaseModel):
    """What a conversation's record and its summary share."""

    model_config = ConfigDict(frozen=True)
    id: str
    #: The tenant whose key created it (``default`` without keys): only that tenant's keys
    #: and admin keys see it.
    tenant: str = DEFAULT_TENANT
    title: str | None
    status: Status
    max_iterations: int
    #: The directory (under ``workspaces_dir``) where this conversation's tools work.
    workspace: str
    created_at: datetime
    updated_at: datetime
    event_count: int
    usage: Usage = Usage()
    run: RunRecord | None


class Webhook(BaseModel):
    """Where the server POSTs when each of a conversation's runs ends (signed; see
    ``app/live/webhooks.py``). Given at creation; only URLs the operator allows."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    url: str = Field(min_length=1, max_length=2000)


class ConversationRecord(_Conversation):
    """A conversation with its latest run (``run``), or ``None`` before the first one."""

    agent: dict[str, Any]
    webhook: Webhook | None = None


class ConversationSummary(_Conversation):
    """A conversation as lists show it: its record with the agent spec's ``kind`` instead
    of the whole spec (which may be 64 KiB), and at most the first
    ``app.store.queries.SUMMARY_ERROR_CHARS`` characters of its run's error (``…`` marks a cut)."""

    agent_kind: str


class UnreadableConversation(BaseModel):
    """A stored conversation that cannot be shown (a damaged row, or one another program
    wrote). A list shows its ``id`` and an ``error`` marker in its place instead of failing
    as a whole; the server log says what was wrong."""

    model_config = ConfigDict(frozen=True)
    id: str
    error: str


#: An item of the conversation list.
ConversationListItem = ConversationSummary | UnreadableConversation
