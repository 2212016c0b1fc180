"""One server per data directory (``app/store/lock.py``), and data directories that cannot
be used: each refused at once with one line and exit code 1, before the database is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.store.lock import LOCK_FILE_NAME, DataDirError, DataDirInUse, DataDirLock
from tests.conftest import script
from tests.test_process import Server, events_of, servers

__all__ = ["servers"]  # the fixture, shared with tests/test_process.py


def serve_and_fail(
    data_dir: Path, *, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m app serve`` that is expected not to start; its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    command = [sys.executable, "-m", "app", "serve", "--port", "0", "--data-dir", str(data_dir)]
    return subprocess.run(
        [*prefix, *command], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def assert_one_line_exit_one(result: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("trellis: ")
    for part in parts:
        assert part in result.stderr


def wait_for_message(server: Server, conversation_id: str, text: str) -> list[dict[str, Any]]:
    """The conversation's events, once one of them is the agent saying ``text``."""
    deadline = time.monotonic() + 10
    while True:
        events = events_of(server, conversation_id)
        if any(event["payload"].get("text") == text for event in events):
            return events
        assert time.monotonic() < deadline, f"the run did not say {text!r}"
        time.sleep(0.01)


# -- the lock itself -------------------------------------------------------------------


def test_data_dir_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    """A second claim fails at once naming the holder's pid; after release it succeeds."""
    first, second = DataDirLock(tmp_path / "data"), DataDirLock(tmp_path / "data")
    with first:
        assert first.held
        with pytest.raises(
            DataDirInUse, match=rf"in use by another Trellis server \(pid {os.getpid()}\)"
        ):
            second.acquire()
        assert not second.held
        assert repr(first).endswith("held>")
    assert not first.held
    with second:
        assert (tmp_path / "data" / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"


def test_data_dir_lock_is_not_inherited_by_child_processes(tmp_path: Path) -> None:
    """The lock's descriptor is close-on-exec: a command started by a tool cannot keep it."""
    with DataDirLock(tmp_path) as lock:
        assert lock._fd is not None
        assert not os.get_inheritable(lock._fd)


@pytest.mark.parametrize(
    "under", [pytest.param(False, id="file-in-place"), pytest.param(True, id="under-a-file")]
)
def test_data_dir_lock_unusable_directory_is_one_error(tmp_path: Path, under: bool) -> None:
    """A regular file where the directory (or one of its parents) should be: DataDirError."""
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "data" if under else tmp_path / "file"
    with pytest.raises(DataDirError, match=f"cannot create data directory {data_dir}: "):
        DataDirLock(data_dir).acquire()


# -- real servers ----------------------------------------------------------------------


@pytest.mark.slow
def test_second_server_on_a_held_data_dir_exits_one_and_leaves_the_first_alone(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A second server fails at once with one line; the first server's run keeps running."""
    servers.append(first := Server(tmp_path, "--max-concurrent-runs", "1"))
    agent = script({"say": "started"}, {"sleep": 60}, {"finish": "never"})
    conversation_id = first.json("POST", "/api/conversations", json={"agent": agent, "run": True})[
        "id"
    ]
    before = wait_for_message(first, conversation_id, "started")  # then it sleeps: no events

    result = serve_and_fail(tmp_path)
    assert_one_line_exit_one(
        result,
        f"data directory {tmp_path} is in use by another Trellis server",
        f"(pid {first.process.pid})",
    )
    assert first.json("GET", f"/api/conversations/{conversation_id}")["status"] == "running"
    assert events_of(first, conversation_id) == before  # no crash recovery touched it
    assert first.json("GET", "/api/server")["statistics"]["running"] == 1


@pytest.mark.slow
def test_after_sigkill_the_lock_is_free_and_a_new_server_recovers(
    tmp_path: Path, servers: list[Server]
) -> None:
    """The kernel drops the lock of a killed server: the next one claims it and recovers."""
    servers.append(first := Server(tmp_path))
    agent = script({"sleep": 60})
    conversation_id = first.json("POST", "/api/conversations", json={"agent": agent, "run": True})[
        "id"
    ]
    first.wait_until_running(1)
    assert first.stop(signal.SIGKILL)[0] == -signal.SIGKILL

    servers.append(second := Server(tmp_path))
    conversation = second.json("GET", f"/api/conversations/{conversation_id}")
    assert (conversation["status"], conversation["run"]["reason"]) == ("paused", "crash_recovery")
    assert (tmp_path / LOCK_FILE_NAME).read_text() == f"{second.process.pid}\n"  # its claim now


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda d: d.write_text(""), "cannot create data directory", id="file-in-place"
        ),
        pytest.param(
            lambda d: (d / "trellis.sqlite3").mkdir(parents=True),
            "cannot open the database",
            id="database-is-a-directory",
        ),
    ],
)
def test_unusable_data_dir_exits_one_with_one_line(
    tmp_path: Path, make: object, expected: str
) -> None:
    """A data directory or database that cannot be used: exit 1, one line, no traceback."""
    data_dir = tmp_path / "data"
    make(data_dir)  # type: ignore[operator]
    assert_one_line_exit_one(serve_and_fail(data_dir), expected, str(data_dir))


@pytest.mark.slow
def test_database_on_a_read_only_filesystem_exits_one_with_one_line(
    tmp_path: Path, servers: list[Server]
) -> None:
    """An existing data directory, bind-mounted read-only: exit 1, one line naming it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to mount a read-only view in a private mount namespace")
    servers.append(first := Server(tmp_path))  # creates the database and the lock file
    assert first.stop(signal.SIGTERM)[0] == 0
    probe = subprocess.run([unshare, "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not permitted here: {probe.stderr.decode().strip()}")
    # The private namespace ends with the process: no mount is left behind, whatever happens.
    mount = (
        f'mount --bind {tmp_path} {tmp_path} && mount -o remount,bind,ro {tmp_path} && exec "$@"'
    )
    result = serve_and_fail(
        tmp_path, prefix=(unshare, "--mount", "--propagation", "private", "sh", "-c", mount, "sh")
    )
    assert_one_line_exit_one(
        result, f"data directory {tmp_path} is not writable: Read-only file system"
    )
