"""Request bodies and query strings of the HTTP API (responses are the records)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.handles import IfBusy
from app.lifecycle import Status
from app.store.base import MAX_PAGE_SIZE

MAX_TEXT_CHARS = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateConversation(_Strict):
    agent: dict[str, Any]
    title: str | None = Field(None, max_length=200)
    initial_message: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    max_iterations: int | None = Field(None, ge=1, le=1_000_000)
    run: bool = False


class PostMessage(_Strict):
    content: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    run: bool = False
    #: With ``run: true`` while a run is active; a message usually asks for a turn after it.
    if_busy: IfBusy = IfBusy.ENQUEUE


class StartRun(_Strict):
    if_busy: IfBusy = IfBusy.REJECT


class ListConversations(_Strict):
    status: Status | None = None
    limit: int = Field(100, ge=1, le=MAX_PAGE_SIZE)
    cursor: str | None = Field(None, max_length=32)


class ListRuns(_Strict):
    limit: int = Field(100, ge=1, le=MAX_PAGE_SIZE)
    after: int | None = Field(None, ge=0)


class ServerRuns(_Strict):
    status: Literal["queued", "running"] | None = None


class WaitRun(_Strict):
    timeout: float = Field(30.0, ge=0, le=3600)


class Limits(_Strict):
    max_concurrent_runs: int | None = Field(None, ge=0, le=10_000)
    max_queued_runs: int | None = Field(None, ge=0, le=1_000_000)

    @model_validator(mode="after")
    def _at_least_one(self) -> Limits:
        if self.max_concurrent_runs is None and self.max_queued_runs is None:
            raise ValueError("give max_concurrent_runs, max_queued_runs or both")
        return self
