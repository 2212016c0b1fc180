"""Storage: the :class:`EventStore` protocol and its implementations, one logic
(:class:`SqlStore`) on two engines: an embedded SQLite file, or a PostgreSQL database."""

from app.store.base import (
    ConversationPage,
    EventPage,
    EventQuery,
    EventStore,
    NewConversation,
    Order,
)
from app.store.faults import StoreUnavailable
from app.store.postgres import PostgresStore
from app.store.sql_store import SqlStore
from app.store.sqlite import SqliteStore

__all__ = [
    "ConversationPage",
    "EventPage",
    "EventQuery",
    "EventStore",
    "NewConversation",
    "Order",
    "PostgresStore",
    "SqlStore",
    "SqliteStore",
    "StoreUnavailable",
]
