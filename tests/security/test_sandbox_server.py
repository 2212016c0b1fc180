"""The real ``python -m app serve`` process: commands cannot read the secrets it started
with, its data directory is private, and it says which sandbox it chose — or refuses to
start when ``sandbox = "bwrap"`` cannot work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import test_process
from tests.conftest import script
from tests.security.test_sandbox_confinement import requires_bwrap
from tests.test_process import START_TIMEOUT_SECONDS, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

servers = test_process.servers  # the fixture: every server started is gone at the end


class UnprivilegedServer(Server):
    """A :class:`Server` without capabilities. Run by root, it stands for a server run by an
    unprivileged user: root's capabilities (CAP_SYS_PTRACE above all) read any process's
    memory whatever its flags — the README says so — and its commands would inherit them."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        drop = ["setpriv", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
        super().__init__(data_dir, *args, prefix=drop)


def run_to_end(server: Server, command: str) -> str:
    """Run one terminal command in a new conversation; what it printed."""
    agent = script({"tool": "terminal", "args": {"command": command}})
    conversation = server.json("POST", "/api/conversations", json={"agent": agent, "run": True})
    path = f"/api/conversations/{conversation['id']}"
    ended = server.json("GET", f"{path}/runs/{conversation['run']['id']}/wait")
    assert ended["status"] == "finished", ended
    events: list[dict[str, Any]] = server.json("GET", f"{path}/events?kind=observation")["items"]
    output: str = events[0]["payload"]["content"]
    return output


@pytest.mark.parametrize(
    ("setting", "server_class", "evidence"),
    [
        # The server's environ exists but is refused; the command's own reads fine.
        pytest.param("none", UnprivilegedServer, "Permission denied", id="none-unprivileged"),
        pytest.param("bwrap", Server, "TRELLIS_COMMAND_ID=", id="bwrap", marks=requires_bwrap),
    ],
)
def test_commands_cannot_read_the_servers_environment(
    tmp_path: Path,
    servers: list[Server],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    server_class: type[Server],
    evidence: str,
) -> None:
    """A secret in the server's starting environment does not show in what a command
    reads from ``/proc/$PPID/environ``: the server is non-dumpable, and under bwrap its
    processes are not even in sight."""
    secret = f"cloud-token-{uuid.uuid4().hex}"
    monkeypatch.setenv("CLOUD_TOKEN", secret)
    servers.append(server := server_class(tmp_path / "data", "--sandbox", setting))
    output = run_to_end(server, "cat /proc/$PPID/environ /proc/[0-9]*/environ")
    assert secret not in output
    assert "CLOUD_TOKEN" not in output
    assert evidence in output  # the command did read environ files


def test_data_dir_is_made_private(tmp_path: Path, servers: list[Server]) -> None:
    """An existing world-readable data directory is ``0700`` once the server runs, and a
    new one is created so."""
    existing, new = tmp_path / "existing", tmp_path / "new"
    existing.mkdir(mode=0o755)
    for data_dir in (existing, new):
        servers.append(Server(data_dir))
        assert data_dir.stat().st_mode & 0o777 == 0o700


def start_without_bwrap(data_dir: Path, setting: str) -> subprocess.Popen[str]:
    """``python -m app serve`` with a ``PATH`` where no ``bwrap`` can be found."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    env["PATH"] = str(data_dir.parent / "empty-path")
    command = [sys.executable, "-m", "app", "serve", "--port", "0", "--data-dir", str(data_dir)]
    return subprocess.Popen(
        [*command, "--sandbox", setting],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_explicit_bwrap_without_bubblewrap_refuses_to_start(tmp_path: Path) -> None:
    """``--sandbox bwrap`` on a host where bubblewrap cannot run exits 1 with one line,
    serving nothing."""
    process = start_without_bwrap(tmp_path / "data", "bwrap")
    out, err = process.communicate(timeout=START_TIMEOUT_SECONDS)
    assert process.returncode == 1
    assert out == ""
    assert err.splitlines()[-1].startswith('trellis: sandbox = "bwrap", but bwrap is not installed')


def test_auto_without_bubblewrap_falls_back_to_none_with_a_warning(
    tmp_path: Path, servers: list[Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` on a host without bubblewrap serves unconfined, warns once, and
    ``/api/server`` says ``none``."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    servers.append(server := Server(tmp_path / "data", "--sandbox", "auto"))
    assert server.json("GET", "/api/server")["sandbox"] == "none"
    assert server.json("GET", "/ready") == {"status": "ready", "sandbox": "none"}
    code, _, stderr = server.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert stderr.count("sandbox auto: bwrap is not installed") == 1, stderr
