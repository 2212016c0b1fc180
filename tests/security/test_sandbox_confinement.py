"""Commands run in a bubblewrap sandbox: they cannot see the data directory, other
workspaces or the server's processes, cannot write outside their workspace, and get no
network with ``sandbox_network = false``. Every test drives a real server (Hypercorn on port
0, httpx) with script agents whose steps are ``terminal`` commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from app.settings import Settings
from app.tools import sandbox
from tests.live import live_server

pytestmark = pytest.mark.timeout(60)

requires_bwrap = pytest.mark.skipif(
    sandbox.bwrap_problem() is not None,
    reason=f"bubblewrap cannot run here: {sandbox.bwrap_problem()}",
)


def terminal_steps(*commands: str) -> dict[str, Any]:
    steps = [{"tool": "terminal", "args": {"command": command}} for command in commands]
    return {"kind": "script", "steps": steps}


async def run_commands(
    client: httpx.AsyncClient, *commands: str, **fields: Any
) -> tuple[dict[str, Any], list[str]]:
    """Create a conversation running one terminal step per command, wait for its run to
    finish; return the conversation and what each command printed (its observations)."""
    body = {"agent": terminal_steps(*commands), "run": True, **fields}
    created = await client.post("/api/conversations", json=body)
    assert created.status_code == 201, created.text
    conversation: dict[str, Any] = created.json()
    path = f"/api/conversations/{conversation['id']}"
    ended = await client.get(
        f"{path}/runs/{conversation['run']['id']}/wait", params={"timeout": 30}
    )
    assert ended.status_code == 200 and ended.json()["status"] == "finished", ended.text
    events = await client.get(f"{path}/events", params={"kind": "observation"})
    assert events.status_code == 200, events.text
    return conversation, [event["payload"]["content"] for event in events.json()["items"]]


def bwrap_settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", sandbox="bwrap", **fields)


@requires_bwrap
async def test_sandbox_hides_the_database_other_workspaces_and_server_processes(
    tmp_path: Path,
) -> None:
    """A sandboxed command cannot read the SQLite database, another conversation's
    workspace, or see the server's process; its own workspace works."""
    settings = bwrap_settings(tmp_path)
    with trio.fail_after(30):
        async with live_server(settings) as server:
            other, _ = await run_commands(server.client, "echo other-conversation-secret > a.txt")
            other_file = settings.workspaces_path / "by-id" / other["id"] / "a.txt"
            assert other_file.read_text() == "other-conversation-secret\n"
            _, outputs = await run_commands(
                server.client,
                f"cat {settings.database_path}",
                f"ls -R {settings.workspaces_path}",
                f"cat {other_file}",
                f"ls /proc/{os.getpid()}/ && kill -0 {os.getpid()} && echo server-visible",
                "echo mine > mine.txt && cat mine.txt",
            )
    database, listing, neighbour, process, own = outputs
    assert "SQLite format 3" not in database and "No such file" in database
    assert other["id"] not in listing and "a.txt" not in listing
    assert "other-conversation-secret" not in neighbour and "No such file" in neighbour
    assert "server-visible" not in process
    assert own == "mine\n[exit code 0]"


@requires_bwrap
async def test_sandbox_writes_only_the_workspace_and_a_private_tmp(tmp_path: Path) -> None:
    """System directories are read-only, the data directory is out of reach, and /tmp is
    the sandbox's own: nothing but the workspace changes on the host."""
    settings = bwrap_settings(tmp_path)
    host_tmp = Path("/tmp") / f"trellis-sandbox-probe-{os.getpid()}"
    with trio.fail_after(30):
        async with live_server(settings) as server:
            conversation, outputs = await run_commands(
                server.client,
                "touch /usr/probe /etc/probe",
                f"touch {settings.data_dir}/probe",
                f"echo private > {host_tmp} && cat {host_tmp}",
                "echo kept > kept.txt",
            )
    system, data_dir, private_tmp, _ = outputs
    assert system.count("Read-only file system") == 2
    # In the sandbox the path is a directory of its own (here inside its private /tmp).
    assert not (settings.data_dir / "probe").exists(), data_dir
    assert private_tmp == "private\n[exit code 0]" and not host_tmp.exists()
    workspace = settings.workspaces_path / "by-id" / conversation["id"]
    assert (workspace / "kept.txt").read_text() == "kept\n"


@requires_bwrap
@pytest.mark.parametrize(
    ("network", "reached"),
    [pytest.param(True, True, id="network"), pytest.param(False, False, id="no-network")],
)
async def test_sandbox_network_setting(tmp_path: Path, network: bool, reached: bool) -> None:
    """``sandbox_network = false`` leaves commands without a network: the server's own
    port on 127.0.0.1 is unreachable; with the default, it answers."""
    settings = bwrap_settings(tmp_path, sandbox_network=network)
    with trio.fail_after(30):
        async with live_server(settings) as server:
            port = server.client.base_url.port
            command = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
            _, (output,) = await run_commands(server.client, command)
    assert ("connected" in output) is reached, output


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param("none", id="none"),
        pytest.param("bwrap", id="bwrap", marks=requires_bwrap),
        pytest.param("auto", id="auto"),
    ],
)
async def test_server_and_ready_report_the_active_sandbox(tmp_path: Path, setting: str) -> None:
    """``GET /api/server`` and ``/ready`` say which sandbox commands run in; ``auto`` shows
    what it resolved to."""
    settings = Settings(data_dir=tmp_path / "data", sandbox=setting)  # type: ignore[arg-type]
    expected = sandbox.resolve(settings.sandbox)
    with trio.fail_after(30):
        async with live_server(settings) as server:
            info = (await server.client.get("/api/server")).json()
            ready = (await server.client.get("/ready")).json()
    assert (info["sandbox"], info["settings"]["sandbox"]) == (expected, setting)
    assert ready == {"status": "ready", "sandbox": expected}
