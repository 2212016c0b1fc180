"""Following a conversation's live stream: the SSE parser and the resume logic (sans-IO).

``GET /api/conversations/{id}/events/stream`` sends each stored event as one Server-Sent
Event whose ``id`` is the event's ``seq`` (``app/api/streams.py``). :class:`Follow` is what
both clients' ``stream()`` loops drive; it does no I/O, so the same rules hold for the
sync and the async client:

- **No gap:** every (re)connection asks for the events after the last ``seq`` this
  iterator has *yielded* (``Last-Event-ID``). A frame is used only once its blank line has
  arrived, so a connection cut in the middle of a frame loses nothing: that event comes
  again, whole, on the next connection.
- **No duplicate:** an event whose ``seq`` is not above the last one is dropped (the
  server already avoids resending; this holds even if it did not).
- **Bounded backoff:** after a dropped connection (reset, timeout, a body cut short, or
  the body ending without an ``end`` frame) the first reconnect is immediate, the next
  ones wait 0.25 s, 0.5 s … (with jitter, at most 5 s). An event received resets the
  count; ``reconnect_attempts`` drops in a row without one raise
  :class:`~app.client.TrellisConnectionError`. A failure to connect *before* the stream
  was ever open is raised at once (a wrong address should not look like a slow server).
- **The end:** an ``end`` frame with reason ``deleted`` or ``shutdown`` ends the
  iteration; ``slow_consumer`` (the reader fell too far behind) is resumed like a drop.
- **Deltas** (``event: delta``, text a model is producing; no ``id``, never stored) are
  yielded as :class:`Delta` when asked for, and never move the resume point.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from app.backoff import backoff_seconds
from app.client._calls import conversation_path
from app.client._errors import ResponseFormatError, TrellisConnectionError
from app.client._requests import Call
from app.events import Event

#: Reconnect backoff after the first (immediate) retry: 0.25 s doubling, with jitter,
#: at most 5 s — a restarting server on this machine answers again within a second or two.
RECONNECT_BASE_SECONDS = 0.25
RECONNECT_MAX_SECONDS = 5.0
#: End reasons after which the stream is over for good; any other one is resumed.
FINAL_REASONS = frozenset({"deleted", "shutdown"})


@dataclass(frozen=True, slots=True)
class Delta:
    """A fragment of text an agent is producing right now (a model's tokens): not stored,
    no ``seq``. ``after_seq`` is the last event the run had committed when it was made;
    the whole message arrives later as an ordinary ``message`` event."""

    run_id: str
    text: str
    after_seq: int = 0


@dataclass(frozen=True, slots=True)
class Frame:
    """One dispatched Server-Sent Event."""

    event: str
    data: str
    id: str | None


class SSEParser:
    """Lines in, frames out, as the SSE spec's parsing rules say (comments and ``retry``
    ignored). Feed it the body's lines without their line endings."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Frame | None:
        """The frame that ``line`` completes (a blank line), else ``None``."""
        if line == "":
            if not self._data:
                self._event, self._id = "", None
                return None
            frame = Frame(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return frame
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


class Follow:
    """Where a stream stands: the resume point, whether it ended, drops in a row."""

    def __init__(
        self,
        conversation_id: str,
        *,
        after_seq: int = 0,
        kinds: Sequence[str] | None = None,
        deltas: bool = False,
        reconnect_attempts: int = 5,
    ) -> None:
        self.conversation_id = conversation_id
        self.last_seq = after_seq
        self.kinds = ",".join(kinds) if kinds else None
        self.deltas = deltas
        self.reconnect_attempts = reconnect_attempts
        self.ended = False
        self.end_reason: str | None = None
        self.connections = 0  # successful ones
        self.drops = 0  # in a row, without an event in between
        self._parser = SSEParser()

    def call(self) -> Call[None]:
        """The request of the next connection: resume after :attr:`last_seq`."""
        params = {"kinds": self.kinds} if self.kinds else {}
        headers = {"Last-Event-ID": str(self.last_seq), "Accept": "text/event-stream"}
        path = conversation_path(self.conversation_id, "/events/stream")
        return Call("GET", path, lambda _: None, params=params, headers=headers)

    def connected(self) -> None:
        """The server accepted the stream (200): start reading frames afresh."""
        self.connections += 1
        self._parser = SSEParser()  # a frame cut by the last drop is dropped with it

    def feed(self, line: str) -> Event | Delta | None:
        """The item ``line`` completes, if any; sets :attr:`ended` on a final ``end``."""
        frame = self._parser.feed(line)
        if frame is None:
            return None
        if frame.event == "message":
            try:
                event = Event.model_validate_json(frame.data)
            except ValidationError as error:
                raise ResponseFormatError(f"a stream frame is not an event: {error}") from error
            if event.seq <= self.last_seq:
                return None  # already yielded
            self.last_seq, self.drops = event.seq, 0
            return event
        if frame.event == "delta" and self.deltas:
            data = _object(frame)
            return Delta(str(data.get("run_id")), str(data.get("text")), data.get("after_seq", 0))
        if frame.event == "end":
            self.end_reason = _object(frame).get("reason")
            self.ended = self.end_reason in FINAL_REASONS
        return None

    def dropped(self, error: httpx.TransportError | None) -> float:
        """The connection broke (``error``) or its body ended without a final ``end``
        (``None``): the seconds to wait before reconnecting.

        Errors: :class:`~app.client.TrellisConnectionError` when the stream never opened,
        or after ``reconnect_attempts`` drops in a row without an event.
        """
        why = f"{type(error).__name__}: {error}" if error else "the stream ended without 'end'"
        if self.connections == 0 and error is not None:
            raise TrellisConnectionError(why) from error
        self.drops += 1
        if self.drops > self.reconnect_attempts:
            raise TrellisConnectionError(
                f"the stream of conversation {self.conversation_id} could not be resumed:"
                f" {self.reconnect_attempts} reconnections in a row without an event (last:"
                f" {why}); the last seq received was {self.last_seq}"
            ) from error
        if self.drops == 1 or self.end_reason == "slow_consumer":
            self.end_reason = None
            return 0.0
        return backoff_seconds(
            self.drops - 2,
            None,
            base_seconds=RECONNECT_BASE_SECONDS,
            max_seconds=RECONNECT_MAX_SECONDS,
        )


def _object(frame: Frame) -> dict[str, Any]:
    """The frame's data as a JSON object. Errors: :class:`ResponseFormatError`."""
    try:
        data = json.loads(frame.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ResponseFormatError(f"a stream {frame.event!r} frame is not a JSON object")
    return data
