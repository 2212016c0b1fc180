"""``python -m app serve --database-url …``: the server on PostgreSQL, as a real process.

The store's behaviour on PostgreSQL is the store suites' (parametrised over both stores);
SIGTERM and SIGKILL with restarts are tests/test_process.py's (parametrised too). Here:
what only a server on PostgreSQL does — choosing the store from the setting, sharing the
database with another server, and failing to start in one line when it cannot.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import script
from tests.test_process import Server, events_of, servers

__all__ = ["servers"]  # the fixture, imported to be used here

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PASSWORD = "hunter2-not-checked"  # trust auth ignores it; it must never be shown


def with_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.replace("@", f":{PASSWORD}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def serve_once(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to refuse to start."""
    command = [sys.executable, "-m", "app", "serve", "--port", "0", "--data-dir", str(data_dir)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_server_on_postgres_runs_a_conversation_and_keeps_it(
    tmp_path: Path, servers: list[Server], postgres_url: str
) -> None:
    """The store is the database at --database-url, not the data directory's SQLite file;
    what one server wrote, the next one on the same database serves."""
    url = with_password(postgres_url)
    servers.append(server := Server(tmp_path / "a", "--database-url", url))
    agent = script({"say": "hello from postgres"}, {"finish": "done"})
    created = server.json("POST", "/api/conversations", json={"agent": agent, "run": True})
    run_id = created["run"]["id"]
    path = f"/api/conversations/{created['id']}/runs/{run_id}/wait?timeout=20"
    assert server.json("GET", path)["status"] == "finished"
    before = events_of(server, created["id"])
    shown = server.client.get("/api/server").text
    assert PASSWORD not in shown
    assert server.json("GET", "/api/server")["settings"]["database_url"] == url.replace(
        PASSWORD, "***"
    )
    assert server.stop(signal.SIGTERM)[0] == 0
    assert not (tmp_path / "a" / "trellis.sqlite3").exists()

    # Another data directory, the same database: the conversation is there.
    servers.append(again := Server(tmp_path / "b", "--database-url", url))
    assert events_of(again, created["id"]) == before
    said = [
        e["payload"]["text"] for e in before if (e["kind"], e["source"]) == ("message", "agent")
    ]
    assert said == ["hello from postgres", "done"]
    assert again.stop(signal.SIGTERM)[0] == 0


def test_second_server_on_one_database_joins(
    tmp_path: Path, servers: list[Server], postgres_url: str
) -> None:
    """Several servers may share a database: the second starts as another node (both in
    GET /api/cluster), leaves the first one's running run alone (no crash recovery of a
    live node), and a run admitted through it runs to its end."""
    servers.append(first := Server(tmp_path / "a", "--database-url", postgres_url))
    agent = script({"sleep": 60}, {"finish": "never"})
    created = first.json("POST", "/api/conversations", json={"agent": agent, "run": True})
    first.wait_until_running(1)

    servers.append(second := Server(tmp_path / "b", "--database-url", postgres_url))
    assert len(second.json("GET", "/api/cluster")["nodes"]) == 2
    quick = script({"say": "from the second"}, {"finish": "done"})
    other = second.json("POST", "/api/conversations", json={"agent": quick, "run": True})
    path = f"/api/conversations/{other['id']}/runs/{other['run']['id']}"
    deadline = time.monotonic() + 20
    while second.json("GET", path)["status"] != "finished":  # either node may run it
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.02)

    conversation = first.json("GET", f"/api/conversations/{created['id']}")
    assert conversation["status"] == "running"
    assert second.stop(signal.SIGTERM)[0] == 0
    assert first.stop(signal.SIGTERM)[0] == 0


def test_unreachable_database_stops_start_up_in_one_line(tmp_path: Path) -> None:
    """No server at the URL: exit 1, one line, the password masked."""
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{closed_port()}/trellis"
    result = serve_once(tmp_path, "--database-url", url)
    assert result.returncode == 1
    assert "trellis: cannot open the database postgresql://postgres:***@127.0.0.1:" in (
        result.stderr
    )
    assert PASSWORD not in result.stderr
    assert "Traceback" not in result.stderr


def test_database_url_must_be_a_postgres_url(tmp_path: Path) -> None:
    """Another scheme is a bad setting (exit 2), named; never silently SQLite."""
    result = serve_once(tmp_path, "--database-url", "mysql://root@127.0.0.1/x")
    assert result.returncode == 2
    assert "--database-url" in result.stderr
