"""The real process: ``python -m app serve`` with SIGTERM and SIGKILL, then restarts.

These start subprocesses on 127.0.0.1 port 0 and take a few seconds each: marked slow,
and run by ``make test`` like every other test.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

STUBBORN_SERVER = Path(__file__).parent / "programs" / "stubborn_server.py"
START_TIMEOUT_SECONDS = 15.0  # generous: a cold interpreter on a busy 2-core CI machine
SHUTDOWN_GRACE_SECONDS = 10.0  # the default of shutdown_grace_seconds


class Server:
    """One ``python -m app serve`` subprocess and an httpx client pointed at it."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        program: Path | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
        start = [str(program)] if program else ["-m", "app", "serve"]
        command = [*prefix, sys.executable, *start, "--port", "0", "--data-dir", str(data_dir)]
        # stderr goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB of log
        # lines, one per request) and then blocks the server mid-write.
        self.stderr_file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by the fixture
        self.process = subprocess.Popen(
            [*command, *args], stdout=subprocess.PIPE, stderr=self.stderr_file, text=True, env=env
        )
        self.url = self._read_url()
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def _read_url(self) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if not line.startswith("trellis: serving on "):
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not start: {line!r} {self.read_stderr()!r}")
        return line.split()[-1]

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        assert response.status_code < 400, response.text
        return response.json()

    def wait_until_running(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while self.json("GET", "/api/server")["statistics"]["running"] < count:
            assert time.monotonic() < deadline, "runs did not start"
            time.sleep(0.01)

    def stop(self, signum: signal.Signals) -> tuple[int, float, str]:
        """Send ``signum``; return exit code, seconds to exit, and stderr."""
        self.client.close()
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 5)
        elapsed = time.monotonic() - started
        return code, elapsed, self.read_stderr()

    def read_stderr(self) -> str:
        """Everything the server wrote to stderr so far."""
        self.stderr_file.seek(0)
        return self.stderr_file.read()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Every server a test starts is gone when it ends, whatever happened."""
    started: list[Server] = []
    yield started
    for server in started:
        server.client.close()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        if server.process.stdout is not None:
            server.process.stdout.close()
        server.stderr_file.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_flags(request: pytest.FixtureRequest) -> list[str]:
    """The flags that choose the store: none (SQLite in the data dir), or PostgreSQL at a
    throwaway schema (``postgres_url``; skipped without a server, failed under CI)."""
    if request.param == "sqlite":
        return []
    # A short lease: a killed node's runs are recovered once its lease expired (1 s).
    return ["--database-url", request.getfixturevalue("postgres_url"), "--node-lease-seconds", "1"]


def start_conversations(server: Server, count: int) -> list[str]:
    agent = script({"say": "started"}, {"sleep": 60}, {"finish": "never"})
    return [
        server.json("POST", "/api/conversations", json={"agent": agent, "run": True})["id"]
        for _ in range(count)
    ]


def events_of(server: Server, conversation_id: str) -> list[dict[str, Any]]:
    path = f"/api/conversations/{conversation_id}/events?limit=1000"
    events: list[dict[str, Any]] = server.json("GET", path)["items"]
    return events


def start_and_snapshot(server: Server, count: int, slots: int) -> dict[str, list[Any]]:
    """Start ``count`` long runs, wait for ``slots`` running; each conversation's events."""
    ids = start_conversations(server, count)
    server.wait_until_running(slots)
    return {cid: events_of(server, cid) for cid in ids}


def test_sigterm_pauses_runs_exits_zero_and_restart_serves_same_events(
    tmp_path: Path, servers: list[Server], store_flags: list[str]
) -> None:
    """SIGTERM with running and queued runs: exit 0 fast, all paused/shutdown, nothing lost.
    On PostgreSQL the queued runs are the cluster's, in the database: the drain leaves them
    queued (for other nodes), and the restarted node claims them."""
    servers.append(server := Server(tmp_path, "--max-concurrent-runs", "3", *store_flags))
    before = start_and_snapshot(server, count=5, slots=3)
    cluster = bool(store_flags)  # PostgreSQL: the queue is in the database, not the node
    assert server.json("GET", "/api/server")["statistics"]["queued"] == (0 if cluster else 2)

    code, elapsed, stderr = server.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert elapsed < SHUTDOWN_GRACE_SECONDS + 1
    assert "Traceback" not in stderr

    servers.append(restarted := Server(tmp_path, *store_flags))
    for index, cid in enumerate(before):
        conversation = restarted.json("GET", f"/api/conversations/{cid}")
        if cluster and index >= 3:  # queued when the node drained: claimed by the new one
            assert conversation["status"] in ("queued", "running")
            continue
        assert (conversation["status"], conversation["run"]["reason"]) == ("paused", "shutdown")
        after = events_of(restarted, cid)
        assert after[: len(before[cid])] == before[cid]
        assert [e["payload"]["reason"] for e in after if e["kind"] == "status"][-1] == "shutdown"
        assert all(e["payload"].get("reason") != "crash_recovery" for e in after)
    assert restarted.stop(signal.SIGTERM)[0] == 0


def test_sigkill_then_restart_recovers_as_paused_without_losing_events(
    tmp_path: Path, servers: list[Server], store_flags: list[str]
) -> None:
    """After SIGKILL, a restart finds every committed event and pauses the orphaned runs
    (on PostgreSQL too: the killed server's claim on the database ended with it, and its
    runs are recovered by the restarted node's sweep once the killed node's lease expired;
    its queued run is the cluster's, in the database, and the restarted node claims it)."""
    servers.append(server := Server(tmp_path, "--max-concurrent-runs", "2", *store_flags))
    before = start_and_snapshot(server, count=3, slots=2)
    assert server.stop(signal.SIGKILL)[0] == -signal.SIGKILL

    servers.append(restarted := Server(tmp_path, *store_flags))
    for index, cid in enumerate(before):
        if store_flags and index == 2:  # PostgreSQL: queued in the database, not the node's
            assert restarted.json("GET", f"/api/conversations/{cid}")["run"]["node"] in (
                None,
                *[n["id"] for n in restarted.json("GET", "/api/cluster")["nodes"]],
            )
            continue
        conversation = wait_until_paused(restarted, cid)
        assert conversation["status"] == "paused"
        assert conversation["run"]["reason"] == "crash_recovery"
        after = events_of(restarted, cid)
        assert after[: len(before[cid])] == before[cid]
        last_status = [e["payload"]["status"] for e in before[cid] if e["kind"] == "status"][-1]
        assert after[-1]["payload"] == {
            "kind": "status",
            "status": "paused",
            "previous": last_status,
            "reason": "crash_recovery",
        }
    restarted.stop(signal.SIGTERM)


def wait_until_paused(server: Server, conversation_id: str) -> Any:
    """The conversation once it is no longer active (SQLite: at once; PostgreSQL: within
    the dead node's lease and a sweep)."""
    deadline = time.monotonic() + 10
    while (conversation := server.json("GET", f"/api/conversations/{conversation_id}"))[
        "status"
    ] in ("queued", "running", "pausing"):
        assert time.monotonic() < deadline, "the killed node's runs were not recovered"
        time.sleep(0.02)
    return conversation


def test_bad_setting_stops_start_up_with_a_message(tmp_path: Path) -> None:
    """A bad flag value exits with code 2 and names the setting."""
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--data-dir", str(tmp_path), "--io-threads", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--io-threads" in result.stderr


def test_taken_port_stops_start_up_with_a_message(tmp_path: Path, servers: list[Server]) -> None:
    """Serving on a port already in use exits with code 1 and says why, no traceback."""
    servers.append(server := Server(tmp_path / "first"))
    port = server.url.rsplit(":", 1)[-1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--data-dir",
            str(tmp_path / "second"),
            "--port",
            port,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def start_stubborn_run(server: Server) -> str:
    """A run whose step blocks where no interrupt reaches (see programs/stubborn_server.py)."""
    agent = {"kind": "stubborn", "seconds": 30}
    conversation_id: str = server.json(
        "POST", "/api/conversations", json={"agent": agent, "run": True}
    )["id"]
    deadline = time.monotonic() + 10
    while not any(e["kind"] == "message" for e in events_of(server, conversation_id)):
        assert time.monotonic() < deadline, "the stubborn step did not start"
        time.sleep(0.01)
    return conversation_id


def test_grace_ran_out_records_runs_and_exits_one(tmp_path: Path, servers: list[Server]) -> None:
    """A thread that ignores cancellation: after the grace its run is recorded, exit 1."""
    servers.append(
        server := Server(tmp_path, "--shutdown-grace-seconds", "0.5", program=STUBBORN_SERVER)
    )
    conversation_id = start_stubborn_run(server)
    code, elapsed, stderr = server.stop(signal.SIGTERM)
    assert code == 1, stderr
    assert elapsed < 0.5 + 1
    assert "did not stop within shutdown_grace_seconds" in stderr

    servers.append(restarted := Server(tmp_path))
    conversation = restarted.json("GET", f"/api/conversations/{conversation_id}")
    assert (conversation["status"], conversation["run"]["reason"]) == ("paused", "shutdown")


def test_second_signal_forces_exit(tmp_path: Path, servers: list[Server]) -> None:
    """While a drain waits for a stubborn thread, a second SIGTERM exits at once."""
    servers.append(server := Server(tmp_path, program=STUBBORN_SERVER))  # grace: 10 s
    start_stubborn_run(server)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while server.client.get("/ready").status_code != 503:  # the drain has begun
        assert time.monotonic() < deadline
        time.sleep(0.01)
    code, elapsed, stderr = server.stop(signal.SIGTERM)
    assert code == 1, stderr
    assert elapsed < 2
    assert "received again: exiting now" in stderr
