"""Idempotency keys: a retried write answers exactly what the first one answered.

A client that did not get an answer (a timeout, a dropped connection) cannot know whether
its ``POST`` was applied. With an ``Idempotency-Key`` header it can simply retry: the first
request stores its key *in the same transaction* as the data it wrote, together with the
exact answer it gave (status, headers, JSON body); a retry with the same key and the same
request finds the key and gets that answer back, byte for byte, without writing anything.
The same key with a different request is 422 ``idempotency_key_reused``
(draft-ietf-httpapi-idempotency-key-header; a request still in flight is the HTTP layer's
409, see ``app/api/idempotency.py``).

Because the key and the data commit together, there is no window in which the data exists
without its key (a retry would duplicate it) or the key without its data.

Keys are scoped per tenant without a column of their own: the stored key is
``<tenant>\x1f<key>`` (:func:`scoped_key`; the unit separator cannot occur in a header
value). They are kept for a retention (``idempotency_key_retention_hours``): older rows are
deleted by :func:`purge_keys` (at start-up and periodically by the supervisor, and for one
key just before it is looked up), so an expired key is a new key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Generic, TypeVar

from app.errors import IdempotencyKeyReused
from app.events import utc_now
from app.store.engine import Connection

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as it was sent: status, headers and the JSON body (text)."""

    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "headers": self.headers, "body": self.body})

    @classmethod
    def from_json(cls, text: str) -> Answer:
        data = json.loads(text)
        return cls(status=data["status"], body=data["body"], headers=data["headers"])


@dataclass(frozen=True, slots=True)
class IdempotentWrite(Generic[R]):
    """The key of a write, a hash of the request it came with, and how to render the
    write's result as the answer to store with it."""

    key: str
    request_hash: str
    answer: Callable[[R], Answer]


class Replayed(Exception):
    """The key was already used for this same request: here is the answer it got.

    Raised by store writes instead of writing anything; the HTTP layer sends ``answer``.
    """

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"replay of an idempotent request ({answer.status})")
        self.answer = answer


#: Between the tenant and the client's key in a stored key.
SCOPE_SEPARATOR = "\x1f"


def scoped_key(tenant: str, key: str) -> str:
    """The key as stored: the same client key of two tenants is two keys."""
    return f"{tenant}{SCOPE_SEPARATOR}{key}"


def client_key(stored: str) -> str:
    """The key as the client sent it (what errors may echo; never the tenant)."""
    return stored.rpartition(SCOPE_SEPARATOR)[2]


def check_key(conn: Connection, key: str, request_hash: str) -> str | None:
    """Before a keyed write (write lock held): the conversation the key created, if the
    key was used for this request without a stored answer; ``None`` for a new key.

    Errors:
        :class:`Replayed` when the key has a stored answer;
        :class:`~app.errors.IdempotencyKeyReused` when it came with another request.
    """
    row = conn.execute(
        "SELECT request_hash, conversation_id, answer FROM idempotency_keys WHERE key = ?",
        (key,),
    ).fetchone()
    if row is None:
        return None
    if row["request_hash"] != request_hash:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used with a different request; use a new key"
            " for a new request",
            detail={"idempotency_key": client_key(key)},
        )
    if row["answer"] is not None:
        raise Replayed(Answer.from_json(row["answer"]))
    conversation_id: str = row["conversation_id"]
    return conversation_id


def save_key(
    conn: Connection,
    key: str,
    request_hash: str,
    conversation_id: str,
    created_at: str,
    answer: Answer | None,
) -> None:
    """Store the key with the write it belongs to (same transaction)."""
    conn.execute(
        "INSERT INTO idempotency_keys (key, request_hash, conversation_id, created_at, answer)"
        " VALUES (?, ?, ?, ?, ?)",
        (key, request_hash, conversation_id, created_at, answer.to_json() if answer else None),
    )


def key_cutoff(retention_hours: float) -> str:
    """The ``created_at`` before which a key has expired (ISO 8601 UTC, as stored: such
    strings sort as the times they name)."""
    return (utc_now() - timedelta(hours=retention_hours)).isoformat()


def purge_keys(conn: Connection, created_before: str, key: str | None = None) -> int:
    """Delete the keys created before ``created_before`` (ISO 8601, UTC), or only ``key``
    if it is that old; how many were deleted. The conversations they created stay."""
    if key is None:
        sql = "DELETE FROM idempotency_keys WHERE created_at < ?"
        return conn.execute(sql, (created_before,)).rowcount
    sql = "DELETE FROM idempotency_keys WHERE key = ? AND created_at < ?"
    return conn.execute(sql, (key, created_before)).rowcount
