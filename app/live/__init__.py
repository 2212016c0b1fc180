"""Live view: where new events come from (:mod:`app.live.feed`) and the streams built on it."""

from app.live.feed import Delta, EventFeed, LocalFeed, StreamEnd, Subscription

__all__ = ["Delta", "EventFeed", "LocalFeed", "StreamEnd", "Subscription"]
