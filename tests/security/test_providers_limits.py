"""A provider's answer is bounded in size and in time, whatever the provider does.

Real server, real HTTP, a real stand-in provider misbehaving: one answering far more than
``llm.max_response_bytes`` (the read must stop early, the step fail cleanly), one dripping
its answer a byte at a time (``request_timeout_seconds`` is a total deadline, not an idle
timeout).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import LLMSettings, Settings
from app.testing_llm import FakeChatServer, oversized_reply, text_reply
from tests.live import live_server
from tests.security.test_providers_specs import run_over_http

pytestmark = pytest.mark.timeout(30)

LIMIT_BYTES = 64 * 1024
OFFERED_BYTES = 256 * 1024 * 1024
#: What may be in flight once the client stops reading: socket buffers on both sides of a
#: loopback connection (a few MiB at most on Linux) plus the chunk being written.
IN_FLIGHT_BYTES = 16 * 1024 * 1024


@pytest.fixture
def provider() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


def settings_for(tmp_path: Path, provider: FakeChatServer, **llm: float) -> Settings:
    fields = {"base_url": provider.url, "max_retries": 0, **llm}
    return Settings(data_dir=tmp_path / "data", llm=LLMSettings.model_validate(fields))


async def test_providers_oversized_answer_stops_the_read_and_fails_the_step(
    tmp_path: Path, provider: FakeChatServer
) -> None:
    """A 256 MiB answer (no Content-Length) with max_response_bytes = 64 KiB ends the run
    error naming the setting, and the server stopped reading long before the end."""
    provider.add(oversized_reply(OFFERED_BYTES))
    settings = settings_for(tmp_path, provider, max_response_bytes=LIMIT_BYTES)
    async with live_server(settings) as server:
        run = await run_over_http(server, {"kind": "llm"})
    provider.close()  # joins the thread that wrote the answer: its count is final
    assert run["status"] == "error"
    assert f"larger than llm.max_response_bytes ({LIMIT_BYTES} bytes)" in run["error"]
    (sent,) = provider.body_bytes_sent
    assert sent < IN_FLIGHT_BYTES


async def test_providers_dripping_answer_ends_at_the_request_deadline(
    tmp_path: Path, provider: FakeChatServer
) -> None:
    """A provider sending its answer a byte every 50 ms (never idle for long, done after
    ~15 s) is cut at request_timeout_seconds (0.5 s): the run ends error saying so."""
    provider.add(dataclasses.replace(text_reply("a fine answer, sent slowly"), drip_seconds=0.05))
    settings = settings_for(tmp_path, provider, request_timeout_seconds=0.5)
    async with live_server(settings) as server:
        started = time.monotonic()
        run = await run_over_http(server, {"kind": "llm"})
        elapsed = time.monotonic() - started
    assert run["status"] == "error"
    assert "no complete answer within llm.request_timeout_seconds (0.5 s)" in run["error"]
    assert elapsed < 5  # the drip alone would take ~15 s; the deadline is 0.5 s
