"""``trellis demo`` (``app/cli/demo.py``, ``app/cli/demo_view.py``): the demo for real, small.

The end-to-end tests run ``app.cli.main(["demo", …])`` in a worker thread (it runs its own
``trio.run``); without ``--server`` it starts real ``python -m app serve`` subprocesses
(127.0.0.1, port 0, temporary data directories), in Trellis and in naive mode, and sends
them SIGTERM. ``--server`` runs against a live server in the test's own Trio loop. The
board's bookkeeping (positions, frames before answers) is checked on its own, without a
server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

import app.cli
from app.cli.demo_view import PhaseBoard, percentile
from app.settings import ApiKeySetting, Settings
from tests.live import live_server

ACTIVE = {"queued", "running", "pausing", "launching"}
TENANT_KEY = "demo-tenant-key-0123456789"


def run_demo(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = app.cli.main(["demo", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_accounted(phase: dict[str, Any], runs: int) -> None:
    """Every run is listed once, has ended, and the outcomes add up to the runs."""
    assert [run["label"] for run in phase["runs"]] == [f"r{i}" for i in range(1, runs + 1)]
    assert not [run for run in phase["runs"] if run["status"] in ACTIVE], phase["runs"]
    assert sum(phase["outcomes"].values()) == runs
    assert all(run["conversation_id"] for run in phase["runs"])  # none refused


@pytest.mark.slow
@pytest.mark.timeout(90)  # two server starts, two ~3 s loads, two drains
def test_demo_json_accounts_for_every_run_in_both_modes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--json: both phases drained with exit code 0, every run accounted for, the
    interrupt landed, positions were given in Trellis only, and naive mode was measured."""
    code, out, err = run_demo(["--runs", "4", "--slots", "2", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    trellis, naive = summary["phases"]
    assert (trellis["mode"], naive["mode"]) == ("trellis", "naive")
    for phase in (trellis, naive):
        check_accounted(phase, 4)
        drain = phase["drain"]
        assert drain["exit_code"] == 0
        assert drain["stream_end"] == "shutdown"  # the final frames came, then the end
        shutdown = [run for run in phase["runs"] if run["reason"] == "shutdown"]
        assert drain["paused_shutdown"] == len(shutdown)
        assert phase["short_requests"]["count"] > 0
        assert phase["short_requests"]["p99_ms"] >= phase["short_requests"]["p50_ms"] > 0
        assert phase["actions"]["interrupt"]["answer"] == "paused (interrupt)"
        interrupted = phase["actions"]["interrupt"]["label"]
        assert {run["label"]: run["reason"] for run in phase["runs"]}[interrupted] == "interrupt"
    assert trellis["slots"] == 2
    assert trellis["positions_visible"] is True
    assert trellis["longest_line"] in (1, 2)  # 4 runs on 2 slots: r3 and r4 waited
    assert naive["longest_line"] == 0
    assert naive["positions_visible"] is False  # no line: every run started at once
    assert err == ""


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_view_prints_each_phase_and_the_summary(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a terminal, 100 columns: each phase's last frame, then the side-by-side table."""
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    code, out, err = run_demo(["--runs", "4", "--slots", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines), out
    trellis = next(i for i, line in enumerate(lines) if line.startswith("Trellis · 4 runs"))
    naive = next(i for i, line in enumerate(lines) if line.startswith("naive mode (for bench"))
    assert trellis < naive
    assert "· 2 run slots · http://127.0.0.1:" in lines[trellis]
    assert "· no run slots · http://127.0.0.1:" in lines[naive]
    for start, end in ((trellis, naive), (naive, len(lines))):
        phase = "\n".join(lines[start:end])
        assert "  short requests: " in phase
        assert "(GET 10 events)" in phase
        assert "interrupt r" in phase and "→ paused (interrupt)" in phase
        assert "SIGTERM: exit code 0 after " in phase
        assert "queued 0 · running 0 · " in phase  # nothing left active after the drain
    table = "\n".join(
        lines[lines.index(next(line for line in lines if "Trellis vs naive" in line)) :]
    )
    assert "Trellis" in table and "naive mode" in table
    positions = next(line for line in table.splitlines() if "queue positions visible" in line)
    assert "yes (line of up to " in positions and positions.rstrip("│ ").endswith("no")
    exits = next(line for line in table.splitlines() if "SIGTERM → exit" in line)
    assert exits.count("exit code 0") == 2


async def test_demo_against_a_running_server_stops_its_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--server: one phase on that server's own slots, no SIGTERM (the server keeps
    serving), and the demo's runs left at the end are interrupted, not left running."""
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_runs=1, max_queued_runs=10)
    async with live_server(settings) as server:
        url = str(server.client.base_url).rstrip("/")
        argv = ["--server", url, "--runs", "3", "--json"]
        with trio.fail_after(30):
            code, out, err = await trio.to_thread.run_sync(run_demo, argv, capsys)
        assert code == 0, err
        (phase,) = json.loads(out)["phases"]
        assert (phase["mode"], phase["slots"], phase["drain"]) == ("server", 1, None)
        check_accounted(phase, 3)
        assert phase["positions_visible"] is True
        runs = (await server.client.get("/api/runs")).json()
        assert runs["items"] == []  # nothing of the demo still queued or running
        assert (await server.client.get("/health")).status_code == 200


async def test_demo_without_an_admin_key_says_what_the_server_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--server with a tenant's key: the server stream (admin only) refuses it; the demo
    exits 1 with the server's own code and message, one line, no traceback."""
    keys = [ApiKeySetting(key=TENANT_KEY, tenant="alice")]
    settings = Settings(data_dir=tmp_path / "data", api_keys=keys)
    async with live_server(settings) as server:
        url = str(server.client.base_url).rstrip("/")
        argv = ["--server", url, "--api-key", TENANT_KEY, "--runs", "2"]
        with trio.fail_after(30):
            code, out, err = await trio.to_thread.run_sync(run_demo, argv, capsys)
    assert (code, out) == (1, "")
    assert err.splitlines()[-1].startswith("trellis: forbidden: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--runs", "0"], "--runs must be 1 to 1000", id="no-runs"),
        pytest.param(["--slots", "0"], "--slots must be 1 or more", id="no-slots"),
        pytest.param(
            ["--server", "http://127.0.0.1:9", "--slots", "2"],
            "--slots is for the embedded servers",
            id="slots-with-server",
        ),
    ],
)
def test_demo_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options that do not make sense exit 2 with one line on stderr, before any server."""
    code, out, err = run_demo(argv, capsys)
    assert (code, out) == (2, "")
    assert err.startswith("trellis: demo: ") and message in err


def test_demo_unreachable_server_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    """--server with nothing listening: exit code 3 and the client's one-line error."""
    code, _, err = run_demo(["--server", "http://127.0.0.1:9", "--json"], capsys)
    assert code == 3
    assert err.startswith("trellis: cannot reach the server at http://127.0.0.1:9")


def status(conversation_id: str, seq: int, value: str, **fields: Any) -> dict[str, Any]:
    return {"conversation_id": conversation_id, "seq": seq, "status": value, **fields}


def test_board_positions_follow_the_line_as_runs_leave_it() -> None:
    """A queued run's place is its rank in admission order among the demo's queued runs;
    a frame that comes before the create's answer is applied once the answer names it."""
    board = PhaseBoard.create("trellis", "http://x", 1, 3)
    r1, r2, r3 = board.runs
    board.created(r1, "c1", "running", None)
    board.status_frame(status("c3", 3, "queued", position=2))  # before c3's answer
    board.created(r2, "c2", "queued", 1)
    board.status_frame(status("c2", 2, "queued", position=1))
    assert board.positions() == {"r2": 1}
    board.created(r3, "c3", "queued", 2)
    assert (r3.status, board.positions()) == ("queued", {"r2": 1, "r3": 2})
    board.status_frame(status("c1", 4, "finished", reason="agent_finished"))
    board.status_frame(status("c2", 5, "running", reason="started"))
    assert board.positions() == {"r3": 1}
    board.status_frame(status("c3", 6, "paused", reason="shutdown"))
    board.status_frame(status("c2", 7, "paused", reason="shutdown"))
    assert board.outcomes() == {"finished": 1, "paused (shutdown)": 2}
    assert (board.positions(), board.active(), board.longest_line) == ({}, [], 2)
    assert board.positions_seen == 3


def test_percentile_is_nearest_rank() -> None:
    """p50 and p99 of 1..100 are 50 and 99; no values give NaN."""
    values = [float(n) for n in range(100, 0, -1)]
    assert (percentile(values, 0.5), percentile(values, 0.99)) == (50.0, 99.0)
    assert percentile([], 0.99) != percentile([], 0.99)  # NaN
