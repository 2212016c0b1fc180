"""No process a run starts outlives the run or the server, however it detaches: ``setsid``,
a double fork, ``nohup``, a job of its own (``set -m``). With and without bubblewrap.

Each command starts a probe that detaches and then blocks in ``sleep <token>``; the probe
announces itself with a file in the workspace before it blocks, so the test knows it ran.
The test then finds it (or not) on the host by the token in its command line.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from app.settings import Settings
from tests import test_process
from tests.conftest import script
from tests.live import live_server
from tests.security.test_sandbox_confinement import requires_bwrap, run_commands
from tests.test_process import Server

pytestmark = pytest.mark.timeout(60)

servers = test_process.servers  # the fixture: every server started is gone at the end

SANDBOXES = [
    pytest.param("none", id="none"),
    pytest.param("bwrap", id="bwrap", marks=requires_bwrap),
]

#: How each probe leaves the command's process group. ``{probe}`` announces itself, then
#: blocks; every form sends its output elsewhere, so the command's pipe can close.
DETACHING = [
    pytest.param("setsid {probe} > /dev/null 2>&1 &", id="setsid"),
    pytest.param('( setsid sh -c "{probe} &" > /dev/null 2>&1 & )', id="double-fork"),
    pytest.param("nohup setsid {probe} > /dev/null 2>&1 &", id="nohup-setsid"),
    pytest.param("set -m; {probe} > /dev/null 2>&1 &", id="own-job"),
]


@pytest.fixture
def token() -> Iterator[str]:
    """A ``sleep`` duration no other process uses; whatever still carries it is killed at
    the end, so a failing run leaves nothing behind."""
    value = f"1000.{uuid.uuid4().int % 10**12}"
    yield value
    for pid in probes(value):
        os.kill(pid, signal.SIGKILL)


def probe_command(form: str, token: str, *, then: str = "") -> str:
    """Start the probe the ``form`` way, wait until it runs, then ``then``."""
    probe = f"sh -c 'touch probe.started; exec sleep {token}'"
    started = "until [ -e probe.started ]; do sleep 0.01; done"  # the probe's own signal
    return f"{form.format(probe=probe)}\n{started}\necho detached\n{then}"


def probes(token: str) -> list[int]:
    """Host pids of live (not zombie) processes whose command line holds ``token``."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if token.encode() in cmdline and stat[stat.rfind(b")") + 2 :][:1] != b"Z":
            found.append(int(name))
    return found


@pytest.mark.parametrize("setting", SANDBOXES)
@pytest.mark.parametrize("form", DETACHING)
async def test_detached_processes_are_gone_when_the_run_ends(
    tmp_path: Path, setting: str, form: str, token: str
) -> None:
    """A probe that detached from the command and blocks is dead once the run has ended."""
    settings = Settings(data_dir=tmp_path / "data", sandbox=setting)  # type: ignore[arg-type]
    with trio.fail_after(30):
        async with live_server(settings) as server:
            _, (output,) = await run_commands(server.client, probe_command(form, token))
            assert output.startswith("detached\n"), output
            assert probes(token) == []


def wait_for(path: Path, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)  # poll interval: the command writes the file


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "signum"),
    [
        pytest.param("none", signal.SIGTERM, id="none-sigterm"),
        pytest.param("bwrap", signal.SIGTERM, id="bwrap-sigterm", marks=requires_bwrap),
        pytest.param("bwrap", signal.SIGKILL, id="bwrap-sigkill", marks=requires_bwrap),
    ],
)
def test_detached_processes_are_gone_when_the_server_stops(
    tmp_path: Path, servers: list[Server], setting: str, signum: signal.Signals, token: str
) -> None:
    """A run blocks after starting a detached probe; once the server is stopped (SIGTERM;
    with bwrap even SIGKILL, through --die-with-parent) the probe is dead too."""
    servers.append(server := Server(tmp_path, "--sandbox", setting))
    command = probe_command("setsid {probe} > /dev/null 2>&1 &", token, then="sleep 300")
    agent = script({"tool": "terminal", "args": {"command": command}})
    conversation = server.json("POST", "/api/conversations", json={"agent": agent, "run": True})
    wait_for(tmp_path / "workspaces" / "by-id" / conversation["id"] / "probe.started")
    assert probes(token), "the probe runs before the server stops"
    code, _, stderr = server.stop(signum)
    assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL), stderr
    # SIGKILL: the kernel kills the sandbox as the server dies, not before stop() returns.
    deadline = time.monotonic() + 5
    while probes(token):
        assert time.monotonic() < deadline, "the probe outlived the server"
        time.sleep(0.01)  # poll interval: the kernel tears the sandbox down
