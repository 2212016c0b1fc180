"""A crash mid tool batch never bricks a conversation: the real process, SIGKILL, restart."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.agents.llm_messages import INTERRUPTED_CONTENT
from app.testing_llm import FakeChatServer, message_sequence_error, text_reply, tool_call_reply
from tests import test_process
from tests.test_process import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

servers = test_process.servers  # the fixture: every server started is gone at the end


# The second call records its shell's pid (the group id: a session of its own) and blocks.
BLOCKING_COMMAND = "echo $$ > pid.tmp && mv pid.tmp pid; sleep 300"


@pytest.fixture
def provider() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


def wait_for_file(path: Path, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.01)  # poll interval: the command writes the file
    return path.read_text()


def test_llm_run_resumes_after_sigkill_mid_tool_batch(
    tmp_path: Path, servers: list[Server], provider: FakeChatServer
) -> None:
    """SIGKILL while a batch of two calls runs leaves both without an observation; after a
    restart, a new run sends a valid history (each call answered "interrupted") and
    finishes."""
    provider.add(
        tool_call_reply(
            [("terminal", {"command": "echo quick"}), ("terminal", {"command": BLOCKING_COMMAND})]
        )
    )
    agent = {"kind": "llm", "model": "m"}
    provider_flags = ("--llm-base-url", provider.url, "--sandbox", "none")  # $$: a host pid
    servers.append(server := Server(tmp_path, *provider_flags))
    conversation = server.json(
        "POST", "/api/conversations", json={"agent": agent, "run": True, "initial_message": "go"}
    )
    pgid = int(wait_for_file(tmp_path / "workspaces" / "by-id" / conversation["id"] / "pid"))
    try:
        assert server.stop(signal.SIGKILL)[0] == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # the orphaned command: nobody else will

    provider.add(text_reply("resumed"))
    servers.append(restarted := Server(tmp_path, *provider_flags))
    path = f"/api/conversations/{conversation['id']}/runs"
    run = restarted.json("POST", path)
    ended = restarted.json("GET", f"{path}/{run['id']}/wait", params={"timeout": 15})
    assert (ended["status"], ended["reason"]) == ("finished", "agent_finished")

    messages = provider.requests[-1].body["messages"]
    assert message_sequence_error(messages) is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert [(m["tool_call_id"], m["content"]) for m in messages[3:]] == [
        ("call_0", INTERRUPTED_CONTENT),
        ("call_1", INTERRUPTED_CONTENT),
    ]
    assert restarted.stop(signal.SIGTERM)[0] == 0
