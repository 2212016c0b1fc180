"""The store protocol: what the supervisor, the run loop and the API need from storage.

Every method is *blocking* and thread-safe. Callers on the Trio side run them in a worker
thread on the I/O limiter; the run loop calls them directly from its own run thread.

Ordering and durability: each write method is one transaction. An event is committed
before the method returns it, so anything returned or published is already durable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from app.events import EVENT_KINDS, Event, Payload, Source
from app.lifecycle import Status, Trigger
from app.principal import DEFAULT_TENANT
from app.records import ConversationListItem, ConversationRecord, RunRecord, Webhook
from app.store.faults import StoreHealth
from app.store.idempotency import Answer, IdempotentWrite

MAX_PAGE_SIZE = 1000
INT64_MAX = 2**63 - 1  # the largest integer SQLite stores (a larger parameter: OverflowError)


class Order(enum.StrEnum):
    ASC = "asc"
    DESC = "desc"


class EventQuery(BaseModel):
    """Filters shared by event search and count (``limit``/``order`` only matter to search)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str | None = Field(None, pattern="^(" + "|".join(EVENT_KINDS) + ")$")
    source: Source | None = None
    run_id: str | None = Field(None, max_length=64)
    q: str | None = Field(None, min_length=1, max_length=256)
    after_seq: int | None = Field(None, ge=0, le=INT64_MAX)
    before_seq: int | None = Field(None, ge=1, le=INT64_MAX)
    order: Order = Order.ASC
    limit: int = Field(100, ge=1, le=MAX_PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class EventPage:
    items: list[Event]
    #: Pass back as ``after_seq`` (ascending) or ``before_seq`` (descending); None at the end.
    next_seq: int | None


@dataclass(frozen=True, slots=True)
class ConversationPage:
    items: list[ConversationListItem]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class NewRun:
    """A run to record together with another write (a new conversation, a message)."""

    run_id: str
    reason: str = "user"
    #: Becomes the conversation's current run at once (false: it waits for an earlier
    #: active run of the conversation and is activated later).
    activate: bool = True
    #: Recorded ``running`` at once, in the same transaction (it was given a run slot at
    #: admission, so its thread starts without waiting): saves the run thread a write.
    #: Only with ``activate``.
    started: bool = False


@dataclass(frozen=True, slots=True)
class NewConversation:
    """What ``create_conversation`` needs; ``request_hash`` guards idempotency keys.

    With ``run``, the conversation's first run is recorded in the same transaction.
    """

    agent: dict[str, Any]
    title: str | None
    max_iterations: int
    initial_message: str | None = None
    workspace: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    run: NewRun | None = None
    #: The new conversation's id (a UUID); ``None``: the store makes one.
    id: str | None = None
    #: Where to POST when each of its runs ends (the caller checked it is allowed).
    webhook: Webhook | None = None
    #: The tenant it belongs to (see ``app/principal.py``).
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class MessageWritten:
    """What ``append_message`` wrote: the user's message event, and the run recorded with
    it (if one was asked for) with the conversation as the write left it."""

    event: Event
    run: RunRecord | None
    conversation: ConversationRecord


class EventStore(Protocol):
    #: This process's id among the nodes that share the database (see ``cluster_url``).
    node_id: str
    #: The URL of a database several nodes share (PostgreSQL), or ``None`` (SQLite).
    cluster_url: str | None

    def close(self) -> None: ...
    def add_listener(self, listener: Callable[[list[Event]], None]) -> None:
        """``listener(events)`` after each commit that appended events (must not block)."""
        ...

    def remove_listener(self, listener: Callable[[list[Event]], None]) -> None: ...
    def health(self) -> StoreHealth:
        """Whether writes are failing for a storage reason; never blocks."""
        ...

    def probe(self) -> StoreHealth:
        """Try a tiny write and report the health it leaves (blocking)."""
        ...

    # conversations
    def create_conversation(
        self,
        new: NewConversation,
        answer: Callable[[ConversationRecord], Answer] | None = None,
    ) -> tuple[ConversationRecord, bool]: ...
    def check_idempotency_key(self, key: str, request_hash: str) -> None: ...
    def purge_idempotency_keys(self, created_before: str, key: str | None = None) -> int:
        """Delete keys created before ``created_before`` (ISO 8601 UTC; only ``key``, if
        given); their conversations stay. Returns how many were deleted."""
        ...

    def get_conversation(self, conversation_id: str) -> ConversationRecord: ...
    def cached_conversation(self, conversation_id: str) -> ConversationRecord | None:
        """A record held in memory, or ``None``; never blocks (callable from Trio)."""
        ...

    def list_conversations(
        self, *, status: Status | None, limit: int, cursor: str | None, tenant: str | None = None
    ) -> ConversationPage:
        """Summaries, newest first; only ``tenant``'s conversations when given."""
        ...

    def delete_conversation(self, conversation_id: str) -> None: ...
    def get_agent_state(self, conversation_id: str) -> dict[str, Any]: ...
    def count_conversations_with_workspace(self, name: str, tenant: str = DEFAULT_TENANT) -> int:
        """Conversations of ``tenant`` that name the workspace ``name`` (own-id workspaces
        not counted)."""
        ...

    # runs
    def create_run(
        self,
        conversation_id: str,
        *,
        run_id: str,
        activate: bool,
        reason: str,
        idempotent: IdempotentWrite[RunRecord] | None = None,
        started: bool = False,
    ) -> tuple[RunRecord, ConversationRecord]: ...
    def get_runs(self, run_ids: list[str]) -> list[RunRecord]: ...
    def activate_run(self, run_id: str, *, reason: str) -> RunRecord: ...
    def transition_run(
        self, run_id: str, trigger: Trigger, *, reason: str, error: str | None = None
    ) -> RunRecord: ...
    def stop_runs(self, run_ids: list[str], *, reason: str) -> list[RunRecord]:
        """``Trigger.STOP`` for every listed run still active (and its conversation where it
        is the current run), in one transaction; ended or missing runs are skipped.
        Returns the records it changed."""
        ...

    def save_progress(self, run_id: str, *, steps: int, agent_state: dict[str, Any]) -> None: ...
    def get_run(self, conversation_id: str, run_id: str) -> RunRecord: ...
    def list_runs(
        self, conversation_id: str, *, limit: int, after: int | None
    ) -> tuple[list[RunRecord], int | None]: ...
    def list_active_runs(self) -> list[RunRecord]: ...
    def recover_interrupted(self, *, reason: str) -> list[str]: ...

    # events
    def append_event(
        self, conversation_id: str, run_id: str | None, source: Source, payload: Payload
    ) -> Event: ...
    def append_message(
        self,
        conversation_id: str,
        payload: Payload,
        *,
        run: NewRun | None = None,
        idempotent: IdempotentWrite[MessageWritten] | None = None,
    ) -> MessageWritten: ...
    def search_events(self, conversation_id: str, query: EventQuery) -> EventPage: ...
    def count_events(self, conversation_id: str, query: EventQuery) -> int: ...
    def get_event(self, conversation_id: str, event_id: str) -> Event: ...
