"""When to try a request again: the server's ``Retry-After``, else jittered exponential backoff.

Shared by the model providers' client (:mod:`app.agents.provider`) and the webhook
couriers (:mod:`app.live.webhooks`); each passes its own settings. Pure functions: no I/O,
no Trio.
"""

from __future__ import annotations

import email.utils
import math
import random
from datetime import UTC, datetime


def backoff_seconds(
    retry: int, retry_after: str | None, *, base_seconds: float, max_seconds: float
) -> float:
    """Seconds before retry number ``retry`` (0 for the first): ``retry_after`` (a
    ``Retry-After`` header) if it parses, else ``base_seconds * 2**retry`` with jitter
    (0.5x to 1.5x, so that clients refused together do not come back together); never
    more than ``max_seconds``."""
    seconds = retry_after_seconds(retry_after) if retry_after is not None else None
    if seconds is None:
        seconds = base_seconds * 2**retry * random.uniform(0.5, 1.5)
    return min(seconds, max_seconds)


def retry_after_seconds(value: str, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from ``now``: ``"1.5"`` or an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``); a date in the past is 0. None if it is neither."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None
