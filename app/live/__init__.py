"""Live view: where new events come from (:mod:`app.live.feed`), the server-wide feed
(:mod:`app.live.server_feed`) and the streams built on them."""

from app.live.feed import Delta, EventFeed, LocalFeed, Mailbox, StreamEnd, Subscription
from app.live.server_feed import ServerFeed, ServerFrame, ServerSubscription

__all__ = [
    "Delta",
    "EventFeed",
    "LocalFeed",
    "Mailbox",
    "ServerFeed",
    "ServerFrame",
    "ServerSubscription",
    "StreamEnd",
    "Subscription",
]
