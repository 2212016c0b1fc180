"""A streamed Chat Completion, read: Server-Sent Events in, the completion dict out.

Asked for ``"stream": true``, an OpenAI-compatible provider answers ``text/event-stream``:
one ``data: {json}`` event per *chunk*, then ``data: [DONE]``. A chunk carries a *delta* of
the first choice — a piece of the content; pieces of tool calls, by ``index`` (the call's
``id`` and function ``name`` once, its ``arguments`` in pieces); at the end the
``finish_reason`` — and, when ``stream_options.include_usage`` asked for it, a last chunk
with the ``usage`` and no choices.

Three small parts, which :class:`CompletionStream` chains for the provider client:

* :class:`EventStreamDecoder`: the body's bytes as they arrive → each event's ``data``;
* :class:`CompletionAssembler`: chunks → the very dict a non-streamed request returns
  (``choices[0].message`` with ``content`` and ``tool_calls``, ``finish_reason``,
  ``usage``, ``model``), so whoever reads a completion cannot tell how it came;
* :class:`WordRelease`: content pieces → fragments fit to show live. A fragment is released
  at a word boundary (up to its last whitespace) and redacted, so a secret or a URL with a
  password that the provider splits across pieces is never shown in part; the released
  fragments, joined, equal the whole content redacted. The rest of a word waits for the
  next whitespace or the end of the completion.

Nothing here does I/O or blocks: the caller owns the connection, its limits and its
cancellation.

Errors::

    ValueError
    └── StreamError    an event's data is not a JSON object, a chunk carries an ``error``,
                       or the stream ended before the completion did
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

#: The ``data`` of the event that ends a stream.
DONE = "[DONE]"


class StreamError(ValueError):
    """The stream is not a usable completion; the message says why."""


class EventStreamDecoder:
    """Server-Sent Events, incrementally: feed it bytes, get the ``data`` of each event.

    An event ends at a blank line; its ``data:`` lines are joined with newlines; comments
    (``: keep-alive``) and other fields (``event``, ``id``, ``retry``) are ignored. Lines end
    with LF or CRLF. Bytes are decoded a whole line at a time, so a character split across
    network reads arrives intact.
    """

    def __init__(self) -> None:
        self._pending = bytearray()  # the start of a line whose end has not arrived
        self._data: list[str] = []  # the data lines of the event being read

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event ``chunk`` completed, in order."""
        if b"\n" not in chunk:  # no line ends here: no rescanning of a long pending line
            self._pending += chunk
            return []
        self._pending += chunk
        *lines, rest = bytes(self._pending).split(b"\n")
        self._pending = bytearray(rest)
        return [data for line in lines if (data := self._line(line)) is not None]

    def close(self) -> list[str]:
        """At the end of the body: the last event, if the body did not end with a blank line."""
        lines = [bytes(self._pending), b""] if self._pending else [b""]
        self._pending = bytearray()
        return [data for line in lines if (data := self._line(line)) is not None]

    def _line(self, raw: bytes) -> str | None:
        line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None


class CompletionAssembler:
    """Chunks → one completion, shaped like a non-streamed answer (see the module doc)."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._head: dict[str, Any] = {}  # id, model, created: from the first chunk saying so
        self.done = False  # ``[DONE]`` arrived

    @property
    def complete(self) -> bool:
        """The stream said the completion ended: ``[DONE]`` or a ``finish_reason``."""
        return self.done or self._finish_reason is not None

    def add(self, data: str) -> str:
        """One event's data; returns the piece of content it carries (``""`` if none).

        Errors: :class:`StreamError` for data that is not a JSON object, or an error chunk.
        """
        if data.strip() == DONE:
            self.done = True
            return ""
        chunk = _json_object(data)
        if chunk.get("error") is not None:
            raise StreamError(f"the model provider sent an error mid-stream: {data[:500]}")
        for key in ("id", "model", "created"):
            if chunk.get(key) is not None:
                self._head.setdefault(key, chunk[key])
        if isinstance(usage := chunk.get("usage"), dict):
            self._usage = usage
        return self._add_choice(chunk.get("choices"))

    def completion(self) -> dict[str, Any]:
        """The completion so far, as ``POST /chat/completions`` without streaming returns it."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content) or None}
        if self._calls:
            message["tool_calls"] = [self._calls[index] for index in sorted(self._calls)]
        choice = {"index": 0, "message": message, "finish_reason": self._finish_reason}
        result = {"object": "chat.completion", **self._head, "choices": [choice]}
        if self._usage is not None:
            result["usage"] = self._usage
        return result

    def _add_choice(self, choices: Any) -> str:
        first = next(
            (c for c in choices or () if isinstance(c, dict) and c.get("index", 0) == 0), None
        )
        if first is None:
            return ""
        if first.get("finish_reason"):
            self._finish_reason = str(first["finish_reason"])
        delta = first.get("delta")
        if not isinstance(delta, dict):
            return ""
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._add_call(call)
        text = delta.get("content")
        if not isinstance(text, str) or not text:
            return ""
        self._content.append(text)
        return text

    def _add_call(self, piece: dict[str, Any]) -> None:
        """The call at ``piece["index"]``: ``id``, ``type`` and ``name`` are set, ``arguments``
        appended. Without an ``index`` (some providers send each call whole), a piece with an
        ``id`` starts a new call and one without continues the last."""
        index = piece.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            last = max(self._calls, default=-1)
            index = last + 1 if piece.get("id") or last < 0 else last
        call = self._calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        for key in ("id", "type"):
            if piece.get(key):
                call[key] = str(piece[key])
        function = piece.get("function")
        if isinstance(function, dict):
            if function.get("name"):
                call["function"]["name"] = str(function["name"])
            if isinstance(arguments := function.get("arguments"), str):
                call["function"]["arguments"] += arguments


class WordRelease:
    """Content pieces → live fragments, released whole words at a time and redacted.

    ``emit`` gets each fragment; ``redact`` hides secrets (neither may block). A secret
    never contains whitespace, so cutting only after whitespace never cuts one: the
    fragments, joined, are exactly ``redact(whole content)``.
    """

    def __init__(self, emit: Callable[[str], None], redact: Callable[[str], str]) -> None:
        self._emit = emit
        self._redact = redact
        self._held: list[str] = []  # pieces since the last whitespace
        self.released = False  # something was emitted (it cannot be taken back)

    def add(self, piece: str) -> None:
        cut = _after_last_space(piece)
        if cut == 0:
            self._held.append(piece)
            return
        ready = "".join([*self._held, piece[:cut]])
        self._held = [piece[cut:]] if cut < len(piece) else []
        self._release(ready)

    def flush(self) -> None:
        """Release what is held (the completion ended)."""
        ready, self._held = "".join(self._held), []
        self._release(ready)

    def _release(self, text: str) -> None:
        if text:
            self.released = True
            self._emit(self._redact(text))


class CompletionStream:
    """One streamed answer being read: bytes in (:meth:`feed`), the completion out
    (:meth:`finish`); content fragments go to ``on_text`` as they become safe to show.

    Owned by one attempt of the provider client; a retry starts a new one, so nothing held
    from a failed attempt is ever shown.
    """

    def __init__(self, on_text: Callable[[str], None], redact: Callable[[str], str]) -> None:
        self._decoder = EventStreamDecoder()
        self._assembler = CompletionAssembler()
        self._release = WordRelease(on_text, redact)
        self._failure: StreamError | None = None  # why feed() stopped the read

    @property
    def shown(self) -> bool:
        """Some text of this answer was handed to ``on_text`` already."""
        return self._release.released

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes of the body; False once the stream turned out unusable
        (:meth:`finish` then raises why) and reading should stop."""
        try:
            self._take(self._decoder.feed(chunk))
        except StreamError as exc:
            self._failure = exc
            return False
        return True

    def finish(self) -> dict[str, Any]:
        """The body ended (or reading stopped): the completion; what is still held goes
        to ``on_text``.

        Errors: :class:`StreamError` when the stream was unusable (see :meth:`feed`) or
        did not say the completion ended.
        """
        if self._failure is not None:
            raise self._failure
        self._take(self._decoder.close())
        if not self._assembler.complete:
            raise StreamError(
                "the model provider's stream ended before the completion did"
                " (no finish_reason, no [DONE])"
            )
        self._release.flush()
        return self._assembler.completion()

    def _take(self, events: list[str]) -> None:
        for data in events:
            if text := self._assembler.add(data):
                self._release.add(text)


def _after_last_space(text: str) -> int:
    """The index just after the last whitespace character of ``text`` (0: none)."""
    for index in range(len(text) - 1, -1, -1):
        if text[index].isspace():
            return index + 1
    return 0


def _json_object(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise StreamError(
            f"the model provider sent a stream event that is not a JSON object: {data[:300]}"
        )
    return chunk
