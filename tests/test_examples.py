"""The examples run as documented: each one as a real subprocess, the way a reader runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_process import Server, servers  # noqa: F401 - fixture

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.slow
def test_embed_example_runs_custom_kind_to_the_end() -> None:
    """examples/embed.py registers its own agent kind and both conversations finish."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [
        "hello: finished after 1 step(s): ['echo: hello']",
        "trio: finished after 1 step(s): ['echo: trio', 'echo: trio']",
        "<RunSupervisor runs 0/2 running, 0 queued | io 0/8 | tools 0/16>",
    ]


# Everything examples/supervise.py prints, in order: its waits make every line but the
# shutdown's deterministic, and it prints those per conversation after the block.
SUPERVISE_STORY = [
    "<RunSupervisor runs 0/2 running, 0 queued | io 0/8 | tools 0/16>",
    "alpha: queued (user)",
    "alpha: running (started)",
    "beta: queued (user)",
    "beta: running (started)",
    "alpha says 2",
    "beta says 3",
    "alpha says 1",
    "beta says 2",
    "alpha says liftoff",
    "alpha: finished (agent_finished)",
    "interrupting beta while its step waits for a tick",
    "beta: paused (interrupt)",
    "gamma: queued (user)",
    "gamma: running (started)",
    "delta: queued (user)",
    "delta: running (started)",
    "epsilon: queued (user)",
    "epsilon waits for a run slot, at position 1",
    "<RunSupervisor runs 2/2 running, 1 queued | io 0/8 | tools 0/16>",
    "leaving the supervisor block: every active run is stopped",
    "<RunSupervisor runs 0/2 running, 0 queued | io 0/8 | tools 0/16 | draining>",
    "run threads alive: 0",
    "alpha: stream ended (shutdown)",
    "beta: stream ended (shutdown)",
    "gamma: paused (shutdown)",
    "gamma: stream ended (shutdown)",
    "delta: paused (shutdown)",
    "delta: stream ended (shutdown)",
    "epsilon: paused (shutdown)",
    "epsilon: stream ended (shutdown)",
]


@pytest.mark.slow
def test_supervise_example_streams_interrupts_and_shuts_down() -> None:
    """examples/supervise.py streams its runs live, interrupts one mid-step, and its
    shutdown pauses the running and the queued runs and joins every run thread."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "supervise.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == SUPERVISE_STORY
    assert result.stderr == ""


@pytest.mark.slow
def test_serve_custom_kind_example_serves_echo_over_http(
    tmp_path: Path,
    servers: list[Server],  # noqa: F811 - the fixture imported above
) -> None:
    """examples/serve_custom_kind.py serves the echo kind: listed in /openapi.json, a
    conversation created with it runs to the end, and SIGTERM exits 0 after a drain."""
    servers.append(server := Server(tmp_path, program=EXAMPLES / "serve_custom_kind.py"))
    schemas = server.json("GET", "/openapi.json")["components"]["schemas"]
    agent = schemas["CreateConversation"]["properties"]["agent"]
    assert agent["discriminator"]["mapping"]["echo"] == "#/components/schemas/EchoSpec"
    assert schemas["EchoSpec"]["properties"]["times"]["type"] == "integer"

    created = server.json(
        "POST",
        "/api/conversations",
        json={"agent": {"kind": "echo", "times": 2}, "initial_message": "hi", "run": True},
    )
    run_path = f"/api/conversations/{created['id']}/runs/{created['run']['id']}"
    ended = server.json("GET", f"{run_path}/wait", params={"timeout": 10})
    assert (ended["status"], ended["reason"]) == ("finished", "agent_finished")
    events = server.json(
        "GET", f"/api/conversations/{created['id']}/events", params={"source": "agent"}
    )
    assert [event["payload"]["text"] for event in events["items"]] == ["echo: hi", "echo: hi"]

    code, _, stderr = server.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "SIGTERM received: draining" in stderr
    assert "stopped cleanly" in stderr
    assert "Traceback" not in stderr
