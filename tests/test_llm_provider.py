"""The provider client against the fake provider: its one client, retries, deadline, logs."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from app.agents import provider as provider_module
from app.agents.provider import ProviderClient, ProviderError
from app.backoff import retry_after_seconds
from app.settings import LLMSettings
from app.testing_llm import (
    FakeChatServer,
    error_reply,
    oversized_reply,
    text_reply,
    tool_call_reply,
)
from tests.test_agent_llm import closed_port

pytestmark = pytest.mark.timeout(30)

API_KEY = "sk-test-provider-7777"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def fake() -> Iterator[FakeChatServer]:
    with FakeChatServer() as server:
        yield server


@pytest.fixture
async def client(fake: FakeChatServer) -> AsyncIterator[ProviderClient]:
    settings = LLMSettings(base_url=fake.url, max_retries=2, backoff_base_seconds=0.01)
    provider = ProviderClient(settings, api_key=API_KEY)
    yield provider
    await provider.aclose()


def with_settings(client: ProviderClient, **fields: Any) -> ProviderClient:
    return ProviderClient(client.settings.model_copy(update=fields), api_key=API_KEY)


class ObservedTransport(httpx.AsyncBaseTransport):
    """A real transport that counts the requests through it and notes when it is closed."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests = 0
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


async def test_provider_builds_its_tls_context_in_its_own_worker_thread(
    client: ProviderClient, fake: FakeChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TLS context (CA bundle: ~40 ms) is built once, in a thread on the client's own
    limiter: never on the Trio thread, never on Trio's default limiter."""
    entered, release = threading.Event(), threading.Event()
    built_in: list[int] = []
    real = provider_module._tls_context

    def gated_tls_context() -> Any:
        built_in.append(threading.get_ident())
        entered.set()
        release.wait()
        return real()

    monkeypatch.setattr(provider_module, "_tls_context", gated_tls_context)
    fake.add(text_reply("one"), text_reply("two"))
    waiter = trio.CapacityLimiter(1)  # the test's own wait must not borrow the default limiter
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.complete, BODY)
                assert await trio.to_thread.run_sync(entered.wait, 5, limiter=waiter)
                default = trio.to_thread.current_default_thread_limiter()
                assert default.statistics().borrowed_tokens == 0
                assert client._build_threads.statistics().borrowed_tokens == 1
                release.set()
            await client.complete(BODY)
    finally:
        release.set()
    assert len(built_in) == 1 and built_in[0] != threading.get_ident()


async def test_provider_aclose_closes_its_client_once_and_is_idempotent(
    fake: FakeChatServer,
) -> None:
    """Requests share one client over the given transport; aclose closes it, twice is fine."""
    transport = ObservedTransport()
    client = ProviderClient(LLMSettings(base_url=fake.url, max_retries=0), transport=transport)
    fake.add(text_reply("one"), text_reply("two"))
    with trio.fail_after(10):
        for _ in range(2):
            await client.complete(BODY)
        assert (client.statistics().client_open, transport.requests) == (True, 2)
        await client.aclose()
        await client.aclose()
    assert transport.closed and not client.statistics().client_open
    assert "closed" in repr(client)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("2", 2.0, id="seconds"),
        pytest.param("0.25", 0.25, id="fraction"),
        pytest.param("Wed, 21 Oct 2015 07:28:30 GMT", 30.0, id="http-date"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 -0000", 0.0, id="http-date-now"),
        pytest.param("Wed, 21 Oct 2015 07:00:00 GMT", 0.0, id="http-date-past"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("nan", None, id="nan"),
    ],
)
def test_retry_after_seconds_reads_seconds_and_http_dates(
    value: str, seconds: float | None
) -> None:
    """Retry-After is seconds or an HTTP date (from now; past is 0); anything else is None."""
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert retry_after_seconds(value, now) == seconds


async def test_provider_honours_retry_after_as_an_http_date(
    client: ProviderClient, fake: FakeChatServer
) -> None:
    """A 429 whose Retry-After is a date a second or two away waits until then (the
    backoff alone would be 0.01 s)."""
    now = datetime.now(UTC)
    when = now.replace(microsecond=0) + timedelta(seconds=2)  # 1 to 2 s from now
    fake.add(error_reply(429, retry_after=format_datetime(when, usegmt=True)), text_reply("ok"))
    with trio.fail_after(10):
        await client.complete(BODY)
    first, second = fake.requests
    assert second.received_at - first.received_at >= 0.9


@pytest.mark.parametrize(
    ("replies", "last"),
    [
        pytest.param([text_reply("late", delay_seconds=60)], "still waiting", id="slow-answer"),
        pytest.param([error_reply(503, "busy")] * 200, "answered 503: busy", id="retrying"),
    ],
)
async def test_provider_step_deadline_covers_every_attempt(
    client: ProviderClient, fake: FakeChatServer, replies: list[Any], last: str
) -> None:
    """llm.step_timeout_seconds bounds all attempts and backoffs together, and the error
    says so, with the last failure."""
    slow = with_settings(client, step_timeout_seconds=0.3, max_retries=20)
    fake.add(*replies)
    started = time.monotonic()
    with trio.fail_after(10), pytest.raises(ProviderError) as raised:
        await slow.complete(BODY)
    await slow.aclose()
    assert time.monotonic() - started < 2
    message = str(raised.value)
    assert "within llm.step_timeout_seconds (0.3 s)" in message
    assert last in message


async def test_provider_logs_one_line_per_retry_without_key_or_body(
    client: ProviderClient, fake: FakeChatServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry logs attempt, status and delay on trellis.llm; never the key or a body."""
    caplog.set_level(logging.DEBUG, logger="trellis.llm")
    fake.add(
        error_reply(429, "secret-body-text", retry_after=0), error_reply(503), text_reply("ok")
    )
    with trio.fail_after(10):
        await client.complete(BODY)
    lines = [r.getMessage() for r in caplog.records if r.name == "trellis.llm"]
    assert lines[0] == "llm request attempt 1 of 3 failed (status 429); retrying in 0.00 s"
    assert lines[1].startswith("llm request attempt 2 of 3 failed (status 503); retrying in ")
    assert len(lines) == 2
    assert API_KEY not in caplog.text and "secret-body-text" not in caplog.text
    assert "hi" not in caplog.text  # the request body's message


async def test_provider_logs_transport_errors_by_class(
    client: ProviderClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable provider's retries are logged with the error's class name."""
    caplog.set_level(logging.DEBUG, logger="trellis.llm")
    unreachable = with_settings(client, base_url=f"http://127.0.0.1:{closed_port()}/v1")
    with trio.fail_after(10), pytest.raises(ProviderError, match="cannot reach"):
        await unreachable.complete(BODY)
    await unreachable.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "trellis.llm"]
    assert [line.split(" failed ")[1].split(";")[0] for line in lines] == ["(ConnectError)"] * 2


async def test_provider_streamed_completion_is_the_plain_one(
    client: ProviderClient, fake: FakeChatServer
) -> None:
    """With on_text the request asks for a stream, the text arrives in pieces, and the
    result is the completion the same reply gives without streaming."""
    reply = tool_call_reply([("terminal", {"command": "ls"})], text="Listing it now.")
    fake.add(reply, reply)
    pieces: list[str] = []
    with trio.fail_after(10):
        plain = await client.complete(BODY)
        streamed = await client.complete(BODY, pieces.append)
    assert "stream" not in fake.requests[0].body
    assert fake.requests[1].body["stream_options"] == {"include_usage": True}
    assert pieces == ["Listing ", "it ", "now."]  # whole words (the last: at the end)
    for key in ("model", "choices", "usage"):
        assert streamed[key] == plain[key]
    assert client.statistics().requests == 2


async def test_provider_stream_is_bounded_by_the_limit_and_the_deadline(
    client: ProviderClient, fake: FakeChatServer
) -> None:
    """max_response_bytes counts a stream's bytes (reading stops past it) and
    request_timeout_seconds covers the whole stream (a dripping one is cut)."""
    small = with_settings(client, max_response_bytes=64 * 1024, max_retries=0)
    slow = with_settings(client, request_timeout_seconds=0.3, max_retries=0)
    dripping = dataclasses.replace(text_reply("slowly, slowly"), drip_seconds=0.02)
    fake.add(oversized_reply(256 * 1024 * 1024), dripping)
    with trio.fail_after(10):
        with pytest.raises(ProviderError, match=r"larger than llm.max_response_bytes \(65536"):
            await small.complete(BODY, lambda _: None)
        with pytest.raises(ProviderError, match=r"no complete answer within .* \(0.3 s\)"):
            await slow.complete(BODY, lambda _: None)
    await small.aclose()
    await slow.aclose()
    fake.close()  # joins the thread that wrote the answer: its count is final
    assert fake.body_bytes_sent[0] < 16 * 1024 * 1024
