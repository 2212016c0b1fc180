"""A write-through cache of conversation records, read without I/O.

Why: ``GET /api/conversations/{id}`` is the most frequent control-plane call (dashboards,
clients polling a run). Reading SQLite means a hop to a worker thread, which costs more than
the lookup itself. A cached record is answered from the Trio thread directly.

Rule: only a thread holding the store's write lock changes the cache (``put``/``drop``).
Writers refresh the records of conversations they touched right after ``COMMIT``, and a
cache miss fills its entry under the same lock, so an entry can never be older than the
last committed write — no reader can insert a stale record behind a writer's back.
``get`` takes no lock: a dict lookup is atomic, and records are immutable.
"""

from __future__ import annotations

from collections import OrderedDict

from app.records import ConversationRecord

#: Records kept (1 to 2 KiB each): ample for the conversations a server has in play.
DEFAULT_CAPACITY = 4096


class RecordCache:
    """Conversation records by id, oldest-filled evicted first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, ConversationRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._records

    def get(self, conversation_id: str) -> ConversationRecord | None:
        """Any thread, no lock, never blocks."""
        return self._records.get(conversation_id)

    def put(self, record: ConversationRecord) -> None:
        """Write lock held."""
        self._records[record.id] = record
        if len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def drop(self, conversation_id: str) -> None:
        """Write lock held."""
        self._records.pop(conversation_id, None)

    def clear(self) -> None:
        """Write lock held: forget every record (after a failed refresh, none is trusted)."""
        self._records.clear()
