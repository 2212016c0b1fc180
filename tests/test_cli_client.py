"""The client commands (``app/cli/commands.py``): ``trellis new|send|run|ls|show|pause|
interrupt|limits|queue`` against a real server, their output, ``--json`` and exit codes.

Each command runs as ``app.cli.main(argv)`` in a worker thread (it blocks on HTTP) while
the server (``tests/live.py``: Hypercorn on 127.0.0.1:0) runs in the test's Trio loop;
stdout and stderr are pytest's captures. Runs that must stay active use the ``gated``
agent kind (``app/testing.py``), so nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import app.cli
from app.api.schemas import ConversationList, MessageAccepted, ServerLimits
from app.records import ConversationRecord, RunRecord
from app.settings import ApiKeySetting, Settings, resolve_settings
from app.testing import Gates, gated_registry
from tests.conftest import gated
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

KEY = "cli-test-key-0123456789"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.lines]


class Cli:
    """Runs ``trellis …`` in-process, in a worker thread, with its output captured."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.out = ""  # what a command running in the background printed so far
        self.err = ""

    async def __call__(self, *argv: str) -> Result:
        code = await self.main(*argv)
        out, err = self.capsys.readouterr()
        return Result(code, self.out + out, self.err + err)

    async def main(self, *argv: str) -> int:
        # abandon_on_cancel: a test that fails while a command blocks does not hang on it
        code: int = await trio.to_thread.run_sync(app.cli.main, list(argv), abandon_on_cancel=True)
        return code

    async def wait_for_output(self, text: str) -> None:
        """Wait until a command running in the background has printed ``text``."""
        while text not in self.out:
            out, err = self.capsys.readouterr()
            self.out, self.err = self.out + out, self.err + err
            await trio.sleep(0.01)

    @asynccontextmanager
    async def background(self, *argv: str) -> AsyncIterator[Background]:
        """Run a command while the block runs; the block waits for its exit code."""
        self.out = self.err = ""
        running = Background()

        async def run() -> None:
            running.code = await self.main(*argv)
            running.done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield running

    def finish(self, running: Background) -> Result:
        assert running.code is not None
        out, err = self.capsys.readouterr()
        result = Result(running.code, self.out + out, self.err + err)
        self.out = self.err = ""
        return result


class Background:
    def __init__(self) -> None:
        self.code: int | None = None
        self.done = trio.Event()


@pytest.fixture
def cli_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TRELLIS_* of the developer's shell; a wide console without colours, not a terminal."""
    for name in list(os.environ):
        if name.startswith("TRELLIS_"):
            monkeypatch.delenv(name)
    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    return monkeypatch


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], cli_environ: pytest.MonkeyPatch) -> Cli:
    return Cli(capsys)


@asynccontextmanager
async def serving(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, cli: Cli, gates: Gates | None = None
) -> AsyncIterator[LiveServer]:
    """A live server (with the ``gated`` kind when ``gates`` are given: the built-in
    kinds then use default settings); ``$TRELLIS_SERVER`` points at it."""
    registry = gated_registry(gates) if gates is not None else None
    async with live_server(settings, registry=registry) as server:
        monkeypatch.setenv("TRELLIS_SERVER", str(server.client.base_url).rstrip("/"))
        cli.capsys.readouterr()  # Hypercorn's "Running on …" line
        yield server


@pytest.fixture
async def server(
    settings: Settings, cli_environ: pytest.MonkeyPatch, gates: Gates, cli: Cli
) -> AsyncIterator[LiveServer]:
    with trio.fail_after(25):
        async with serving(settings, cli_environ, cli, gates) as server:
            yield server


async def create(server: LiveServer, agent: dict[str, Any], **fields: Any) -> ConversationRecord:
    response = await server.client.post("/api/conversations", json={"agent": agent, **fields})
    assert response.status_code == 201, response.text
    return ConversationRecord.model_validate(response.json())


async def get(server: LiveServer, conversation_id: str) -> ConversationRecord:
    response = await server.client.get(f"/api/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return ConversationRecord.model_validate(response.json())


async def test_cli_new_prints_the_id_or_the_record(server: LiveServer, cli: Cli) -> None:
    """``new --say`` creates a script conversation and prints its id alone (for
    ``C=$(trellis new …)``); ``--json`` prints the server's record on one line."""
    result = await cli("new", "--say", "hello", "--say", "bye", "--title", "t1", "--message", "hi")
    assert result.code == 0, result.err
    [conversation_id] = result.lines
    record = await get(server, conversation_id)
    assert record.agent == {"kind": "script", "steps": [{"say": "hello"}, {"say": "bye"}]}
    assert (record.title, record.event_count, record.run) == ("t1", 1, None)

    result = await cli("new", "--agent", json.dumps(gated("x")), "--run", "--json")
    assert result.code == 0, result.err
    [line] = result.json_lines()
    created = ConversationRecord.model_validate(line)
    assert created.run is not None and created.agent == gated("x")


async def test_cli_new_reads_a_script_file(server: LiveServer, cli: Cli, tmp_path: Path) -> None:
    """``--script FILE`` takes a JSON array of steps, or a whole agent spec object."""
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps([{"say": "from a file"}]), encoding="utf-8")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "script", "steps": [{"say": "spec"}]}), encoding="utf-8")
    for path, expected in ((steps, "from a file"), (spec, "spec")):
        result = await cli("new", "--script", str(path))
        assert result.code == 0, result.err
        record = await get(server, result.out.strip())
        assert record.agent == {"kind": "script", "steps": [{"say": expected}]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--agent", "{nope"], "new: --agent: not JSON", id="bad-json"),
        pytest.param(["--agent", "[1]"], "an agent spec is a JSON object", id="not-an-object"),
        pytest.param(["--script", "/nonexistent.json"], "cannot read it", id="no-file"),
    ],
)
async def test_cli_new_usage_errors_exit_2(
    server: LiveServer, cli: Cli, argv: list[str], message: str
) -> None:
    """An agent that cannot be read is a usage error (exit 2, one stderr line); nothing is
    sent."""
    result = await cli("new", *argv)
    assert (result.code, result.out) == (2, "")
    assert result.err.startswith("trellis: ") and message in result.err
    assert result.err.count("\n") == 1
    listed = await server.client.get("/api/conversations")
    assert listed.json()["items"] == []


async def test_cli_server_errors_exit_1_with_the_servers_message(
    server: LiveServer, cli: Cli
) -> None:
    """An error answer prints ``trellis: <code>: <message>`` (the server's words) and
    exits 1: a spec the server refuses (422), an unknown conversation (404), a busy one
    (409)."""
    refused = await cli("new", "--agent", '{"kind": "script", "steps": [{"sleep": "5"}]}')
    assert refused.code == 1
    assert refused.err.startswith("trellis: validation_error: ")

    for command in ("show", "pause", "interrupt", "watch"):
        missing = await cli(command, "no-such-id")
        assert (missing.code, missing.out) == (1, ""), command
        assert missing.err == "trellis: not_found: no conversation with id no-such-id\n"

    record = await create(server, gated("hold"), run=True)
    busy = await cli("run", record.id)
    assert busy.code == 1
    assert busy.err.startswith("trellis: conversation_busy: ")


async def test_cli_unreachable_server_exits_3(cli: Cli) -> None:
    """No server at the address: exit 3 and a line naming the address."""
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = await cli("ls", "--server", url)
    assert (result.code, result.out) == (3, "")
    assert result.err.startswith(f"trellis: cannot reach the server at {url}: ")


async def test_cli_argument_errors_exit_2(server: LiveServer, cli: Cli) -> None:
    """Bad options exit 2: argparse's own (a missing agent) and the commands' (``--timeout``
    without ``--wait``, an unknown event kind)."""
    with pytest.raises(SystemExit) as exit_info:
        await cli("new", "--title", "x")
    assert exit_info.value.code == 2
    assert "one of the arguments --agent --script --say is required" in cli.capsys.readouterr().err
    record = await create(server, {"kind": "script", "steps": [{"say": "x"}]})
    timeout = await cli("run", record.id, "--timeout", "3")
    assert (timeout.code, timeout.err) == (2, "trellis: run: --timeout goes with --wait\n")
    kinds = await cli("watch", record.id, "--kinds", "message,nonsense")
    assert kinds.code == 2 and "--kinds: unknown kind(s) ['nonsense']" in kinds.err


async def test_cli_send_appends_and_starts_a_run(server: LiveServer, cli: Cli) -> None:
    """``send`` prints the message's seq (and the run it started); ``--json`` the server's
    answer."""
    record = await create(server, {"kind": "script", "steps": [{"say": "ok"}]})
    plain = await cli("send", record.id, "first")
    assert (plain.code, plain.lines) == (0, ["message #1"])

    result = await cli("send", record.id, "second", "--run", "--json")
    assert result.code == 0, result.err
    [line] = result.json_lines()
    accepted = MessageAccepted.model_validate(line)
    assert accepted.event.seq == 2 and accepted.run is not None
    events = await server.client.get(f"/api/conversations/{record.id}/events?kind=message")
    texts = [e["payload"]["text"] for e in events.json()["items"] if e["source"] == "user"]
    assert texts == ["first", "second"]


@pytest.mark.parametrize(
    ("steps", "code", "status"),
    [
        pytest.param([{"say": "done"}], 0, "finished", id="finished"),
        pytest.param([{"fail": "boom"}], 4, "error", id="error"),
    ],
)
async def test_cli_run_wait_exits_with_the_runs_code(
    server: LiveServer, cli: Cli, steps: list[dict[str, Any]], code: int, status: str
) -> None:
    """``run --wait`` prints the ended run and exits 0 when it finished, 4 on error."""
    record = await create(server, {"kind": "script", "steps": steps})
    result = await cli("run", record.id, "--wait")
    assert result.code == code, result.err
    [line] = result.lines
    assert line.startswith("run ") and f" {status} " in line
    as_json = await cli("run", record.id, "--wait", "--json")
    assert RunRecord.model_validate(as_json.json_lines()[0]).status == status


async def test_cli_run_wait_paused_exits_5_and_timeout_exits_1(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """A run paused while ``run --wait`` waits exits 5; a wait that runs out of
    ``--timeout`` exits 1 with the server's ``timeout`` code."""
    record = await create(server, gated("a", "b"))
    async with cli.background("run", record.id, "--wait") as waiting:
        await gates["a"].wait_entered()
        paused = await server.client.post(f"/api/conversations/{record.id}/pause")
        assert paused.status_code == 202
        gates["a"].release()
        await waiting.done.wait()
    result = cli.finish(waiting)
    assert result.code == 5, result.err
    assert result.lines[-1].endswith(" paused (pause)")
    conversation = await get(server, record.id)
    assert conversation.status == "paused"

    other = await create(server, gated("held"))
    timed_out = await cli("run", other.id, "--wait", "--timeout", "0.1")
    assert timed_out.code == 1
    assert timed_out.err.startswith("trellis: timeout: ")
    gates.release_all()


async def test_cli_pause_and_interrupt_print_the_run(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """``pause`` answers the run ``pausing``; ``interrupt`` the run ``paused (interrupt)``;
    ``--json`` the server's run record."""
    record = await create(server, gated("hold"), run=True)
    await gates["hold"].wait_entered()
    pausing = await cli("pause", record.id)
    assert pausing.code == 0, pausing.err
    assert pausing.lines == [f"run {record.run.id} pausing (pause)"]  # type: ignore[union-attr]
    stopped = await cli("interrupt", record.id, "--json")
    assert stopped.code == 0, stopped.err
    run = RunRecord.model_validate(stopped.json_lines()[0])
    assert (run.status, run.reason) == ("paused", "interrupt")


async def test_cli_ls_lists_pages_and_filters(server: LiveServer, cli: Cli, gates: Gates) -> None:
    """``ls`` shows a table of conversations (newest first), ``--status`` filters,
    ``--limit`` pages with a ``--cursor`` hint, ``--json`` is the server's page."""
    idle = await create(server, {"kind": "script", "steps": [{"say": "x"}]}, title="idle one")
    running = await create(server, gated("hold"), title="busy one", run=True)
    await gates["hold"].wait_entered()

    table = await cli("ls")
    assert table.code == 0, table.err
    header, *rows = table.lines
    assert header.split() == ["ID", "STATUS", "AGENT", "EVENTS", "UPDATED", "(UTC)", "TITLE"]
    assert [row.split()[:3] for row in rows] == [
        [running.id, "running", "gated"],
        [idle.id, "idle", "script"],
    ]
    assert rows[0].rstrip().endswith("busy one")

    only_idle = await cli("ls", "--status", "idle", "--json")
    page = ConversationList.model_validate(only_idle.json_lines()[0])
    assert [item.id for item in page.items] == [idle.id]

    first = await cli("ls", "--limit", "1")
    assert first.lines[1].startswith(running.id)
    hint = first.lines[-1]
    assert hint.startswith("more: trellis ls --cursor ")
    second = await cli("ls", "--limit", "1", "--cursor", hint.split()[-1])
    assert second.lines[1].startswith(idle.id) and len(second.lines) == 2


async def test_cli_show_prints_the_conversation_and_last_events(
    server: LiveServer, cli: Cli
) -> None:
    """``show`` prints the record, its run and the last ``--events`` events; ``--json``
    one object with both."""
    record = await create(
        server,
        {"kind": "script", "steps": [{"say": "one"}, {"say": "two"}]},
        title="shown",
        initial_message="go",
        run=True,
    )
    assert (await cli("run", record.id, "--wait", "--if-busy", "enqueue")).code == 0
    result = await cli("show", record.id, "--events", "2")
    assert result.code == 0, result.err
    fields = dict(line.split(None, 1) for line in result.lines[:5])
    assert fields == {
        "conversation": record.id,
        "title": "shown",
        "status": "finished",
        "agent": "script",
        "workspace": record.workspace,
    }
    assert "last 2 events:" in result.lines
    assert result.lines[-2].split()[1:] == ["agent", "two"]
    assert result.lines[-1].split()[1:3] == ["status", "finished"]

    as_json = await cli("show", record.id, "--json", "--events", "3")
    [body] = as_json.json_lines()
    assert ConversationRecord.model_validate(body["conversation"]).id == record.id
    assert [event["seq"] for event in body["events"]] == [
        body["conversation"]["event_count"] - 2 + i for i in range(3)
    ]


async def test_cli_limits_shows_and_changes(server: LiveServer, cli: Cli) -> None:
    """``limits`` shows the run limits; with options it changes them first (the server's
    supervisor has the new values)."""
    shown = await cli("limits")
    assert shown.code == 0, shown.err
    assert shown.lines[0].split()[:2] == ["max_concurrent_runs", "2"]
    assert shown.lines[1].split()[:2] == ["max_queued_runs", "3"]

    changed = await cli("limits", "--max-concurrent-runs", "5", "--max-queued-runs", "7", "--json")
    assert changed.code == 0, changed.err
    limits = ServerLimits.model_validate(changed.json_lines()[0])
    assert (limits.max_concurrent_runs, limits.max_queued_runs) == (5, 7)
    stats = server.supervisor.statistics()
    assert (stats.max_concurrent_runs, stats.max_queued_runs) == (5, 7)

    refused = await cli("limits", "--max-concurrent-runs", "-1")
    assert refused.code == 1 and refused.err.startswith("trellis: validation_error: ")


async def test_cli_queue_once_shows_running_and_queued_runs(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """``queue --once`` prints the slot usage and the runs: the running ones, then the
    line with positions; ``--json`` the runs, limits and statistics."""
    holders = [await create(server, gated("hold"), run=True) for _ in range(2)]
    await gates["hold"].wait_entered(2)
    waiting = await create(server, gated("hold"), run=True)

    result = await cli("queue", "--once")
    assert result.code == 0, result.err
    summary, header, *rows = result.lines
    assert summary.startswith("run slots 2/2 busy · line 1 (max 3) · io threads ")
    assert header.split() == ["#", "RUN", "CONVERSATION", "STATUS", "FOR", "STEPS"]
    assert [row.split()[-4] for row in rows] == ["running", "running", "queued"]
    assert rows[-1].split()[0] == "1"
    assert waiting.run is not None and waiting.run.id[:13] in rows[-1]

    as_json = await cli("queue", "--once", "--json")
    [snapshot] = as_json.json_lines()
    running, queued = snapshot["runs"][:2], snapshot["runs"][2:]
    assert {run["conversation_id"] for run in running} == {h.id for h in holders}
    assert [(run["conversation_id"], run["queue_position"]) for run in queued] == [(waiting.id, 1)]
    assert snapshot["statistics"]["running"] == 2
    assert snapshot["limits"]["max_concurrent_runs"] == 2

    counted = await cli("queue", "--count", "2", "--interval", "0.01", "--json")
    assert len(counted.json_lines()) == 2
    gates.release_all()


async def test_cli_queue_without_runs(server: LiveServer, cli: Cli) -> None:
    """An idle server's queue says so; ``--count`` prints one table per refresh."""
    result = await cli("queue", "--count", "2", "--interval", "0.01")
    assert result.code == 0, result.err
    assert result.out.count("no active runs") == 2
    assert (await cli("queue", "--interval", "0")).code == 2


async def test_cli_api_key_from_option_or_environment(
    tmp_path: Path, cli_environ: pytest.MonkeyPatch, cli: Cli, gates: Gates
) -> None:
    """Against a server with keys: none is 401 (exit 1), ``--api-key`` or
    ``$TRELLIS_API_KEY`` is accepted."""
    settings = Settings(
        data_dir=tmp_path / "keyed", api_keys=[ApiKeySetting(key=KEY, tenant="t", admin=True)]
    )
    with trio.fail_after(25):
        async with serving(settings, cli_environ, cli, gates):
            refused = await cli("ls")
            assert refused.code == 1 and refused.err.startswith("trellis: unauthorized: ")
            assert (await cli("ls", "--api-key", KEY)).code == 0
            cli_environ.setenv("TRELLIS_API_KEY", KEY)
            result = await cli("new", "--say", "hi")
            assert result.code == 0, result.err


def test_cli_client_key_variable_still_warns_when_serving() -> None:
    """``$TRELLIS_API_KEY`` is the client's key, not a server setting: ``trellis serve``
    keeps warning about it (with "did you mean TRELLIS_API_KEYS?"), so an operator who
    meant to protect the server is told that it is not protected."""
    resolved = resolve_settings(environ={"TRELLIS_API_KEY": KEY})
    [note] = resolved.warnings
    assert "TRELLIS_API_KEY is not a Trellis setting" in note and "TRELLIS_API_KEYS" in note


def test_cli_help_lists_the_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """``trellis --help`` lists every client command; each one's help ends with the exit
    codes."""
    with pytest.raises(SystemExit):
        app.cli.main(["--help"])
    listing = capsys.readouterr().out
    for command in ("new", "send", "run", "watch", "ls", "show", "pause", "interrupt", "queue"):
        assert f"    {command} " in listing
    with pytest.raises(SystemExit):
        app.cli.main(["watch", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Exit codes: 0 ok" in help_text and "5 the run ended paused" in help_text
    assert "$TRELLIS_SERVER" in help_text and "$TRELLIS_API_KEY" in help_text


@pytest.mark.slow
async def test_cli_python_m_app_runs_a_client_command(server: LiveServer) -> None:
    """``python -m app new --say … --run --watch`` in a real process: the id, the events,
    exit 0."""
    command = [sys.executable, "-m", "app", "new", "--say", "from a process", "--run", "--watch"]
    environ = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    with trio.fail_after(25):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, env=environ
        )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    conversation_id, *events = out.splitlines()
    assert (await get(server, conversation_id)).status == "finished"
    assert [line.split()[1] for line in events] == ["status", "status", "agent", "status"]
    assert "from a process" in events[2] and "finished" in events[3]
