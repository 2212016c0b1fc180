"""Storage: the :class:`EventStore` protocol and its embedded SQLite implementation."""

from app.store.base import (
    ConversationPage,
    EventPage,
    EventQuery,
    EventStore,
    NewConversation,
    Order,
)
from app.store.faults import StoreUnavailable
from app.store.sqlite import SqliteStore

__all__ = [
    "ConversationPage",
    "EventPage",
    "EventQuery",
    "EventStore",
    "NewConversation",
    "Order",
    "SqliteStore",
    "StoreUnavailable",
]
