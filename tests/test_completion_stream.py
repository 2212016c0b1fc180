"""Reading a streamed completion: events from bytes, the completion from chunks, live text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.agents.completion_stream import (
    CompletionAssembler,
    CompletionStream,
    EventStreamDecoder,
    StreamError,
    WordRelease,
)
from app.testing_llm import stream_chunks, text_reply, tool_call_reply

SECRET = "sk-live-0123456789abcdef"


def redact(text: str) -> str:
    return text.replace(SECRET, "***")


def sse(chunks: list[dict[str, Any]]) -> bytes:
    """The body a provider sends for ``chunks``, ``[DONE]`` included."""
    events = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return "".join(events).encode()


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    assembler = CompletionAssembler()
    for chunk in chunks:
        assembler.add(json.dumps(chunk))
    assert assembler.complete
    return assembler.completion()


def test_event_stream_decoder_gives_the_same_events_however_the_bytes_are_split() -> None:
    """Events split at every byte (inside a UTF-8 character, between CR and LF) decode the
    same: data lines joined by newlines, comments and other fields ignored."""
    body = (
        ": keep-alive\r\n\r\n"
        'event: message\r\nid: 7\r\ndata: {"a": "é€"}\r\n\r\n'
        "data: line one\ndata:line two\n\n"
        "retry: 10\n\n"
        "data: [DONE]\n\n"
    ).encode()
    expected = ['{"a": "é€"}', "line one\nline two", "[DONE]"]
    for size in (1, 2, 3, 7, len(body)):
        decoder = EventStreamDecoder()
        events = [e for at in range(0, len(body), size) for e in decoder.feed(body[at : at + size])]
        assert events + decoder.close() == expected, size


def test_event_stream_decoder_close_yields_an_event_without_its_blank_line() -> None:
    """A body ending right after a data line still delivers that event."""
    decoder = EventStreamDecoder()
    assert decoder.feed(b"data: first\n\ndata: last") == ["first"]
    assert decoder.close() == ["last"]


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(text_reply("Hello there, a streaming world!"), id="text"),
        pytest.param(
            tool_call_reply(
                [("terminal", {"command": "ls -la"}), ("finish", {"message": "done"})],
                text="Two calls.",
                prompt_tokens=31,
                completion_tokens=7,
            ),
            id="tool-calls",
        ),
    ],
)
def test_completion_assembler_rebuilds_the_non_streamed_completion(reply: Any) -> None:
    """A completion streamed the way OpenAI does (content in pieces, each call's arguments
    in pieces, usage last) is assembled back into the very same message, reason, usage."""
    completion = reply.body
    chunks = stream_chunks(completion)
    assert len(chunks) > 4  # really split
    assembled = assemble(chunks)
    assert assembled["choices"][0]["message"] == completion["choices"][0]["message"]
    assert assembled["choices"][0]["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert (assembled["usage"], assembled["model"]) == (completion["usage"], completion["model"])


def test_completion_assembler_accepts_calls_without_index_and_no_usage() -> None:
    """Calls sent whole without an ``index`` are told apart by their ``id``; without a
    usage chunk the completion has no ``usage``."""
    calls = [
        {"id": "a", "function": {"name": "terminal", "arguments": '{"command"'}},
        {"function": {"arguments": ': "ls"}'}},
        {"id": "b", "function": {"name": "finish", "arguments": "{}"}},
    ]
    chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]} for call in calls]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    assembled = assemble(chunks)
    message = assembled["choices"][0]["message"]
    assert [(c["id"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("a", '{"command": "ls"}'),
        ("b", "{}"),
    ]
    assert "usage" not in assembled and message["content"] is None


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param("{not json", "not a JSON object", id="not-json"),
        pytest.param("[1, 2]", "not a JSON object", id="not-an-object"),
        pytest.param('{"error": {"message": "overloaded"}}', "error mid-stream", id="error"),
    ],
)
def test_completion_assembler_refuses_unusable_events(data: str, error: str) -> None:
    """An event that is not a chunk, or an error chunk, raises StreamError saying so."""
    with pytest.raises(StreamError, match=error):
        CompletionAssembler().add(data)


def test_word_release_never_shows_part_of_a_secret() -> None:
    """A secret split across pieces is released only whole, redacted; the fragments
    joined are the whole text redacted, and nothing is held once flushed."""
    shown: list[str] = []
    release = WordRelease(shown.append, redact)
    text = f"Your key is {SECRET} — keep it.\nBye"
    pieces = [text[at : at + 3] for at in range(0, len(text), 3)]
    for piece in pieces:
        release.add(piece)
    assert "".join(shown) == redact(text[: text.rindex("\n") + 1])  # up to the last space
    release.flush()
    assert "".join(shown) == redact(text)
    assert not any(SECRET[:4] in fragment for fragment in shown)
    assert len(shown) > 3  # released along the way, not all at the end


def test_completion_stream_hands_on_text_as_words_complete() -> None:
    """Fed a streamed body a few bytes at a time, on_text gets words as they complete and
    finish() returns the completion; ``shown`` says text went out."""
    shown: list[str] = []
    stream = CompletionStream(shown.append, redact)
    body = sse(stream_chunks(text_reply(f"one two {SECRET} three").body))
    assert not stream.shown
    for at in range(0, len(body), 5):
        assert stream.feed(body[at : at + 5])
    assert stream.shown and "".join(shown) == "one two *** "
    completion = stream.finish()
    assert "".join(shown) == "one two *** three"
    assert completion["choices"][0]["message"]["content"] == f"one two {SECRET} three"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param(
            b'data: {"choices": [{"index": 0, "delta": {"content": "cut "}}]}\n\n',
            "ended before the completion did",
            id="no-end",
        ),
        pytest.param(b"data: {oops\n\n", "not a JSON object", id="bad-event"),
    ],
)
def test_completion_stream_finish_raises_for_an_unusable_stream(body: bytes, error: str) -> None:
    """A body that stops before [DONE] or a finish_reason, or carries a bad event, makes
    finish() raise StreamError; a bad event also stops the reading (feed is False)."""
    stream = CompletionStream(lambda _: None, redact)
    assert stream.feed(body) is (error != "not a JSON object")
    with pytest.raises(StreamError, match=error):
        stream.finish()
