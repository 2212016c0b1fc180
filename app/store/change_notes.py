"""What a write transaction tells the other nodes sharing its database: *change notes*.

On PostgreSQL every write transaction that changed conversations sends, inside the
transaction, one note per conversation on the database's changes channel (one statement
for all of them: :data:`NOTIFY_ALL`). PostgreSQL delivers them at ``COMMIT``, in commit
order, and never for a transaction that rolled back. A note is a hint, not data::

    "<node_id> <conversation_id> <last_seq> <count>"

"node ``node_id`` committed ``count`` new events of the conversation, up to ``last_seq``"
(their seqs are ``last_seq - count + 1`` … ``last_seq``: the transaction held the
conversation's row, so nobody else's seq falls between). ``count`` 0 (and ``last_seq`` 0):
the record changed but no event was appended (a run's step count, a deletion). The
receiver (``app/cluster/changes.py``) reads the truth from the store. A note is well under
PostgreSQL's 8000-byte payload limit (a node id, a conversation id, two numbers).

Channels are per *database*, and one database may hold several Trellis schemas (the tests
put one per test in the same database): :func:`channel_name` ties a channel to the schema.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Set
from dataclasses import dataclass

from app.events import Event

#: Sends every note of a transaction with one statement (``?``: channel, text[] of notes).
NOTIFY_ALL = "SELECT pg_notify(?, note) FROM unnest(?::text[]) AS note"


@dataclass(frozen=True, slots=True)
class ChangeNote:
    """One conversation changed by one transaction of node ``node_id`` (module docstring)."""

    node_id: str
    conversation_id: str
    last_seq: int
    count: int

    @property
    def seq_before(self) -> int:
        """The conversation's last seq before this transaction's events (``count`` > 0)."""
        return self.last_seq - self.count

    def payload(self) -> str:
        return f"{self.node_id} {self.conversation_id} {self.last_seq} {self.count}"

    @classmethod
    def parse(cls, payload: str) -> ChangeNote | None:
        """The note in ``payload``, or ``None`` if it is not one (logged by the caller)."""
        node_id, _, rest = payload.partition(" ")
        conversation_id, *numbers = rest.rsplit(" ", 2)
        if not node_id or not conversation_id or len(numbers) != 2:
            return None
        try:
            last_seq, count = int(numbers[0]), int(numbers[1])
        except ValueError:
            return None
        return cls(node_id, conversation_id, last_seq, count)


def change_notes(node_id: str, touched: Set[str], appended: Iterable[Event]) -> list[str]:
    """The payloads for a transaction that changed ``touched`` and appended ``appended``
    (in insert order), one per conversation."""
    last: dict[str, tuple[int, int]] = dict.fromkeys(touched, (0, 0))
    for event in appended:
        count = last.get(event.conversation_id, (0, 0))[1]
        last[event.conversation_id] = (event.seq, count + 1)
    return [
        ChangeNote(node_id, conversation_id, seq, count).payload()
        for conversation_id, (seq, count) in last.items()
    ]


def channel_name(purpose: str, schema: str) -> str:
    """``trellis_<purpose>_<12 hex of the schema's name>``: a LISTEN/NOTIFY channel of the
    Trellis store in ``schema`` (an identifier well under PostgreSQL's 63 bytes)."""
    return f"trellis_{purpose}_{hashlib.sha256(schema.encode()).hexdigest()[:12]}"
