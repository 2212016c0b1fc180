"""The real process with a few hundred runs in flight: SIGTERM drains them all (exit 0,
every run ``paused/shutdown``, nothing lost); SIGKILL in the middle of that drain loses
nothing either (a restart's crash recovery pauses whatever was left active).

Read back with a fresh :class:`SqliteStore` on the data directory once the server is gone.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from app.events import MessagePayload, Source
from app.lifecycle import ACTIVE, Status
from app.settings import Settings
from app.store import SqliteStore
from app.store.base import EventQuery
from tests.conftest import script
from tests.test_process import SHUTDOWN_GRACE_SECONDS, Server, servers  # noqa: F401 - fixture
from tests.test_shutdown_many import MAX_STOP_TRANSACTIONS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

RUNS = 200
SLEEPER = script({"say": "started"}, {"sleep": 60}, {"finish": "never"})
SETTLE_TIMEOUT_SECONDS = 60.0  # 200 creates and first steps take ~2-5 s on a busy 2-core box


def start_sleepers(server: Server, data_dir: Path, count: int) -> list[str]:
    """Create ``count`` conversations with a run each; return once every run's ``say``
    is committed (read from the database file: a WAL reader never blocks the server)."""
    ids = [
        server.json("POST", "/api/conversations", json={"agent": SLEEPER, "run": True})["id"]
        for _ in range(count)
    ]
    database = Settings(data_dir=data_dir).database_path
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    with sqlite3.connect(database) as db:
        query = "SELECT count(*) FROM events WHERE kind = 'message' AND source = 'agent'"
        while db.execute(query).fetchone()[0] < count:
            assert time.monotonic() < deadline, "the runs did not all say their line"
            time.sleep(0.02)
    return ids


def wait_for_first_shutdown_end(data_dir: Path) -> None:
    """Return as soon as the database shows one run ``paused/shutdown``."""
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    with sqlite3.connect(Settings(data_dir=data_dir).database_path) as db:
        query = "SELECT count(*) FROM runs WHERE reason = 'shutdown'"
        while db.execute(query).fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the drain recorded nothing"


def check_nothing_lost(data_dir: Path, ids: list[str]) -> list[tuple[Status, str]]:
    """Every conversation: its run ended, its ``say`` kept, its seqs 1..n with no gap, and
    a status event last. Returns each run's (status, reason)."""
    store = SqliteStore(Settings(data_dir=data_dir).database_path)
    try:
        assert store.list_active_runs() == []
        ends = []
        for conversation_id in ids:
            conversation = store.get_conversation(conversation_id)
            events = store.search_events(conversation_id, EventQuery(limit=1000)).items
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            said = [
                e
                for e in events
                if isinstance(e.payload, MessagePayload) and e.source is Source.AGENT
            ]
            assert len(said) == 1
            assert events[-1].payload.kind == "status"
            assert conversation.run is not None and conversation.status not in ACTIVE
            ends.append((conversation.run.status, conversation.run.reason))
        return ends
    finally:
        store.close()


def test_sigterm_with_hundreds_of_runs_exits_zero_with_every_run_paused(
    tmp_path: Path,
    servers: list[Server],  # noqa: F811 - the fixture
) -> None:
    """SIGTERM with 200 runs mid-step: exit 0 well within the grace period, every run
    ``paused/shutdown``, every event kept."""
    server = Server(tmp_path, "--max-concurrent-runs", str(RUNS), "--max-queued-runs", "400")
    servers.append(server)
    ids = start_sleepers(server, tmp_path, RUNS)

    code, elapsed, stderr = server.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert elapsed < SHUTDOWN_GRACE_SECONDS  # a hang guard; the timing lives in bench/
    assert "Traceback" not in stderr
    drained = re.search(rf"stopped {RUNS} run\(s\); their ends took (\d+) transaction", stderr)
    assert drained is not None, stderr
    assert 1 <= int(drained.group(1)) <= MAX_STOP_TRANSACTIONS
    assert set(check_nothing_lost(tmp_path, ids)) == {(Status.PAUSED, "shutdown")}


def test_sigkill_during_the_drain_loses_nothing_and_recovery_pauses_the_rest(
    tmp_path: Path,
    servers: list[Server],  # noqa: F811 - the fixture
) -> None:
    """SIGKILL right after SIGTERM, while 200 runs are being stopped: after a restart no
    run is active, each one is ``paused`` by the drain (``shutdown``) or by the restart's
    crash recovery (``crash_recovery``), and every committed event is there, seqs gapless."""
    server = Server(tmp_path, "--max-concurrent-runs", str(RUNS), "--max-queued-runs", "400")
    servers.append(server)
    ids = start_sleepers(server, tmp_path, RUNS)
    server.process.send_signal(signal.SIGTERM)
    wait_for_first_shutdown_end(tmp_path)  # the drain is writing: kill it now
    assert server.stop(signal.SIGKILL)[0] == -signal.SIGKILL

    servers.append(restarted := Server(tmp_path))
    assert restarted.json("GET", "/api/server")["statistics"]["running"] == 0
    assert restarted.stop(signal.SIGTERM)[0] == 0
    ends = check_nothing_lost(tmp_path, ids)
    assert set(ends) <= {(Status.PAUSED, "shutdown"), (Status.PAUSED, "crash_recovery")}
