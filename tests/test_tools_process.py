"""Tools in the real process: a shutdown mid tool call leaves no process of the command."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests import test_process
from tests.conftest import script
from tests.test_process import Server
from tests.test_tool_terminal import RECORD_PIDS_AND_BLOCK, is_dead, process_state, read_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

servers = test_process.servers  # the fixture: every server started is gone at the end


def test_sigterm_kills_the_command_its_child_and_its_grandchild(
    tmp_path: Path, servers: list[Server]
) -> None:
    """SIGTERM mid tool call: the shell, its foreground child and its background grandchild
    (pids the command wrote itself, all alive and in one group before) are dead after."""
    # Unconfined: the test follows host pids, which a PID namespace would renumber (the
    # bwrap case: tests/security/test_sandbox_processes.py).
    servers.append(server := Server(tmp_path, "--sandbox", "none"))
    agent = script({"tool": "terminal", "args": {"command": RECORD_PIDS_AND_BLOCK}})
    conversation = server.json("POST", "/api/conversations", json={"agent": agent, "run": True})
    pid_file = tmp_path / "workspaces" / "by-id" / conversation["id"] / "pids"
    deadline = time.monotonic() + 10
    while not (pids := read_pids(pid_file)):
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.01)  # poll interval: the command writes its pid file
    shell = pids[0]
    assert [state and state[1] for state in map(process_state, pids)] == [shell] * 3
    assert not any(is_dead(pid) for pid in pids)
    assert server.stop(signal.SIGTERM)[0] == 0
    assert [is_dead(pid) for pid in pids] == [True, True, True]
