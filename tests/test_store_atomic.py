"""Writes that record a run with something else commit all of it or none of it (on each
engine: ``tests/store_kinds.py``)."""

from __future__ import annotations

import sqlite3
from typing import Any

import psycopg
import pytest

from app.errors import IdempotencyKeyReused
from app.events import MessagePayload
from app.store import NewConversation
from app.store.base import NewRun
from app.store.idempotency import Answer, IdempotentWrite, Replayed
from app.store.sql_store import SqlStore
from tests.store_kinds import any_store_fixture

store = any_store_fixture()

#: A duplicate run id, as each engine reports it.
INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)


def new(**fields: Any) -> NewConversation:
    agent = {"kind": "script", "steps": [{"say": "x"}]}
    return NewConversation(agent=agent, title=None, max_iterations=5, **fields)


def counts(store: SqlStore) -> tuple[int, int, int, int]:
    with store._read() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("conversations", "runs", "events", "idempotency_keys")
        )


def test_create_with_a_run_that_fails_stores_nothing(store: SqlStore) -> None:
    """If the run of a create+run cannot be inserted, the conversation, its first message
    and its key are not stored either."""
    first, _ = store.create_conversation(new(run=NewRun("run-1")))
    before = counts(store)
    with pytest.raises(INTEGRITY_ERRORS):
        store.create_conversation(
            new(run=NewRun("run-1"), initial_message="hi", idempotency_key="k", request_hash="h")
        )
    assert counts(store) == before
    assert store.get_conversation(first.id).run is not None


def test_message_with_a_run_that_fails_stores_no_message(store: SqlStore) -> None:
    """A message+run whose run cannot be recorded leaves no message behind."""
    conversation, _ = store.create_conversation(new(run=NewRun("run-1")))
    before = counts(store)
    with pytest.raises(INTEGRITY_ERRORS):
        store.append_message(conversation.id, MessagePayload(text="again"), run=NewRun("run-1"))
    assert counts(store) == before
    assert store.get_conversation(conversation.id).event_count == conversation.event_count


def test_keyed_message_replays_its_stored_answer(store: SqlStore) -> None:
    """The answer rendered inside the transaction is stored with the key; the same key
    and request replays it, another request with it is refused."""
    conversation, _ = store.create_conversation(new())

    def render(written: Any) -> Answer:
        return Answer(202, f'{{"seq": {written.event.seq}}}')

    keyed = IdempotentWrite("k1", "hash-a", render)
    written = store.append_message(conversation.id, MessagePayload(text="a"), idempotent=keyed)
    with pytest.raises(Replayed) as replay:
        store.append_message(conversation.id, MessagePayload(text="a"), idempotent=keyed)
    assert replay.value.answer == Answer(202, f'{{"seq": {written.event.seq}}}')
    other = IdempotentWrite("k1", "hash-b", render)
    with pytest.raises(IdempotencyKeyReused):
        store.append_message(conversation.id, MessagePayload(text="b"), idempotent=other)
    assert store.get_conversation(conversation.id).event_count == 1
