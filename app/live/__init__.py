"""Live view: where new events come from (:mod:`app.live.feed`) and the streams built on it."""

from app.live.feed import EventFeed, LocalFeed, StreamEnd, Subscription

__all__ = ["EventFeed", "LocalFeed", "StreamEnd", "Subscription"]
