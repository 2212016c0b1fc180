"""Records of conversations and runs, as the store keeps them and the API returns them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.lifecycle import Status


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


class Usage(BaseModel):
    """Language-model tokens used by a conversation, over all its runs."""

    model_config = ConfigDict(frozen=True)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ConversationRecord(BaseModel):
    """A conversation with its latest run (``run``), or ``None`` before the first one."""

    model_config = ConfigDict(frozen=True)
    id: str
    title: str | None
    status: Status
    agent: dict[str, Any]
    max_iterations: int
    #: The directory (under ``workspaces_dir``) where this conversation's tools work.
    workspace: str
    created_at: datetime
    updated_at: datetime
    event_count: int
    usage: Usage = Usage()
    run: RunRecord | None
