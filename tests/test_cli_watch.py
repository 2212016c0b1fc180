"""``trellis watch`` (``app/cli/watch.py``, ``watch_view.py``, ``event_text.py``): live
events until the run ends, its exit code, queue positions, token deltas — as plain text
when piped, and through rich's live area on a (forced) terminal.

The same harness as ``tests/test_cli_client.py``: a real server in the test's Trio loop,
the command in a worker thread, runs held by gates; a test waits for the output it
expects (``Cli.wait_for_output``) instead of sleeping.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from app.cli.event_text import event_text
from app.events import (
    ActionPayload,
    ErrorPayload,
    Event,
    LLMCallPayload,
    MessagePayload,
    ObservationPayload,
    Payload,
    Source,
    StatusPayload,
    WebhookPayload,
)
from app.lifecycle import Status
from app.records import RunRecord
from app.settings import LLMSettings, Settings
from app.testing import FakeChatServer, Gates
from app.testing_llm import StreamHold, text_reply
from tests import test_cli_client as shared
from tests.conftest import gated
from tests.live import LiveServer
from tests.test_cli_client import Cli, create, get, serving

pytestmark = pytest.mark.timeout(30)

# The fixtures of tests/test_cli_client.py, shared by name.
cli, cli_environ, server = shared.cli, shared.cli_environ, shared.server

ANSWER = "Streaming words arrive before the stored message."


def labels(out: str) -> list[str]:
    """The label column of each event line (``#5 agent  hi`` -> ``agent``)."""
    return [line.split()[1] for line in out.splitlines() if line.lstrip().startswith("#")]


def force_terminal(environ: pytest.MonkeyPatch) -> None:
    """Make rich treat the captured stdout as an interactive terminal (no colours)."""
    environ.setenv("TTY_COMPATIBLE", "1")
    environ.setenv("TTY_INTERACTIVE", "1")


async def test_cli_watch_follows_a_run_until_it_finishes(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """``watch`` prints each event as it is committed and exits 0 at the run's end."""
    record = await create(server, gated("a", "b"), initial_message="go", run=True)
    async with cli.background("watch", record.id) as watching:
        await cli.wait_for_output("gate a")
        assert not watching.done.is_set()
        gates["a"].release()
        await cli.wait_for_output("gate b")
        gates["b"].release()
        await watching.done.wait()
    result = cli.finish(watching)
    assert result.code == 0, result.err
    assert labels(result.out) == ["user", "status", "status", "agent", "agent", "status"]
    assert result.lines[0].split() == ["#1", "user", "go"]
    assert result.lines[-1].split() == ["#6", "status", "finished", "(agent_finished)"]


async def test_cli_watch_exit_code_error_and_interrupt(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """A run that fails ends the watch with 4 (the error shown); an interrupted one with 5."""
    failing = '{"kind": "script", "steps": [{"say": "trying"}, {"fail": "boom"}]}'
    result = await cli("new", "--agent", failing, "--watch")
    assert result.code == 4, result.err
    conversation_id = result.lines[0]
    assert (await get(server, conversation_id)).status == "error"
    assert "ScriptFailure: boom" in result.out
    assert labels(result.out)[-2:] == ["error", "status"]

    record = await create(server, gated("hold"), run=True)
    async with cli.background("watch", record.id) as watching:
        await cli.wait_for_output("gate hold")
        response = await server.client.post(f"/api/conversations/{record.id}/interrupt")
        assert response.status_code == 202
        await watching.done.wait()
    interrupted = cli.finish(watching)
    assert interrupted.code == 5, interrupted.err
    assert interrupted.lines[-1].split()[1:] == ["status", "paused", "(interrupt)"]


async def test_cli_run_watch_json_prints_the_run_then_events(server: LiveServer, cli: Cli) -> None:
    """``run --watch --json``: the run record, then each event of that run as the server's
    JSON, one per line, in seq order, ending with the final status."""
    record = await create(server, {"kind": "script", "steps": [{"say": "a"}, {"say": "b"}]})
    assert (await cli("send", record.id, "earlier")).code == 0
    result = await cli("run", record.id, "--watch", "--json")
    assert result.code == 0, result.err
    first, *lines = result.json_lines()
    run = RunRecord.model_validate(first)
    events = [Event.model_validate(line) for line in lines]
    assert [event.seq for event in events] == list(range(2, 2 + len(events)))  # after "earlier"
    assert {event.run_id for event in events} == {run.id}
    assert [event.kind for event in events] == ["status", "status", "message", "message", "status"]
    final = events[-1].payload
    assert isinstance(final, StatusPayload) and final.status == Status.FINISHED


async def test_cli_watch_kinds_and_a_finished_conversation(server: LiveServer, cli: Cli) -> None:
    """On a conversation whose run has ended, ``watch`` shows the stored events and exits
    with that run's code; ``--kinds`` keeps only those kinds; ``--after-seq`` past the end
    prints nothing; a conversation that never ran exits 0."""
    failing = {"kind": "script", "steps": [{"say": "one"}, {"fail": "late"}]}
    record = await create(server, failing, run=True)
    ended = await cli("run", record.id, "--wait", "--if-busy", "enqueue")
    assert ended.code == 4  # the first run, or the second one, failed the same way

    replay = await cli("watch", record.id, "--kinds", "message")
    assert replay.code == 4, replay.err
    assert set(labels(replay.out)) == {"agent"}
    count = (await get(server, record.id)).event_count
    nothing = await cli("watch", record.id, "--after-seq", str(count))
    assert (nothing.code, nothing.out) == (4, "")

    never = await create(server, {"kind": "script", "steps": [{"say": "x"}]}, initial_message="m")
    idle = await cli("watch", never.id)
    assert (idle.code, labels(idle.out)) == (0, ["user"])


async def hold_two_runs(server: LiveServer, gates: Gates) -> str:
    """Fill both run slots with held runs and queue a third; its conversation id."""
    for _ in range(2):
        await create(server, gated("hold"), run=True)
    await gates["hold"].wait_entered(2)
    waiting = await create(server, gated("next"), run=True)
    assert waiting.run is not None and waiting.run.queue_position == 1
    return waiting.id


async def test_cli_watch_shows_the_queue_position(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """Piped, a queued run's place in the line is a ``queue`` line; the watch goes on when
    the run starts and ends with it."""
    conversation_id = await hold_two_runs(server, gates)
    async with cli.background("watch", conversation_id) as watching:
        await cli.wait_for_output("queue  position 1")
        gates["hold"].release()
        await cli.wait_for_output("gate next")
        gates["next"].release()
        await watching.done.wait()
    result = cli.finish(watching)
    assert result.code == 0, result.err
    assert labels(result.out) == ["status", "status", "agent", "status"]


async def test_cli_watch_on_a_terminal_spins_with_the_position(
    server: LiveServer, cli: Cli, cli_environ: pytest.MonkeyPatch, gates: Gates
) -> None:
    """On a terminal, the live area below the events says where the run stands in the line
    (rich redraws it), then that it runs; the events are printed above it."""
    force_terminal(cli_environ)
    conversation_id = await hold_two_runs(server, gates)
    async with cli.background("watch", conversation_id) as watching:
        await cli.wait_for_output("queued: position 1 in the line")
        gates["hold"].release()
        await cli.wait_for_output("gate next")
        await cli.wait_for_output(" running")  # the spinner's text once the run started
        gates["next"].release()
        await watching.done.wait()
    result = cli.finish(watching)
    assert result.code == 0, result.err
    assert "\x1b[" in result.out  # drawn with terminal control codes
    assert "finished (agent_finished)" in result.out


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
async def test_cli_watch_streams_the_answer_token_by_token(
    tmp_path: Path,
    cli: Cli,
    cli_environ: pytest.MonkeyPatch,
    terminal: bool,
) -> None:
    """An ``llm`` agent's answer shows while the model is still producing it (the stream's
    ``delta`` frames); once stored it is shown once, whole."""
    if terminal:
        force_terminal(cli_environ)
    hold = StreamHold(after_chunks=3)  # the role chunk and two pieces: "Strea", "ming "
    agent = '{"kind": "llm", "model": "m", "stream": true}'
    with FakeChatServer() as provider:
        provider.add(dataclasses.replace(text_reply(ANSWER), hold=hold))
        settings = Settings(data_dir=tmp_path / "data", llm=LLMSettings(base_url=provider.url))
        with trio.fail_after(25):
            async with serving(settings, cli_environ, cli):
                argv = ("new", "--agent", agent, "--message", "hi", "--watch")
                async with cli.background(*argv) as watching:
                    await hold.wait_reached()
                    await cli.wait_for_output("Streaming ")
                    assert "#4" not in cli.out  # the message is not stored yet
                    hold.release()
                    await watching.done.wait()
                result = cli.finish(watching)
    assert result.code == 0, result.err
    if terminal:
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.out)  # no control codes
        assert "#5 agent  " + ANSWER in plain  # the stored message, printed above the area
        return
    streamed = [line for line in result.lines if ANSWER in line]
    assert [line.split(None, 1) for line in streamed] == [["agent", ANSWER]]  # no seq: live
    assert result.out.count(ANSWER) == 1
    assert labels(result.out) == ["user", "status", "status", "llm", "status"]


def make_event(payload: Payload, source: Source = Source.AGENT, seq: int = 7) -> Event:
    now = datetime.now(UTC)
    return Event(
        id="e",
        conversation_id="c",
        seq=seq,
        run_id="r",
        timestamp=now,
        source=source,
        payload=payload,
    )


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        pytest.param(
            MessagePayload(text="hi\nthere"), "agent  hi\n" + " " * 14 + "there", id="msg"
        ),
        pytest.param(
            StatusPayload(status=Status.PAUSED, previous=Status.RUNNING, reason="interrupt"),
            "status paused (interrupt)",
            id="status",
        ),
        pytest.param(
            ActionPayload(call_id="1", tool="terminal", arguments={"command": "ls"}),
            'call   terminal {"command": "ls"}',
            id="action",
        ),
        pytest.param(
            ObservationPayload(call_id="1", tool="terminal", content="a\nb\n"),
            "output terminal: a\n" + " " * 14 + "b",
            id="observation",
        ),
        pytest.param(
            ErrorPayload(message="boom", error_type="ScriptFailure"),
            "error  ScriptFailure: boom",
            id="error",
        ),
        pytest.param(
            LLMCallPayload(model="m", prompt_tokens=3, completion_tokens=4, duration_ms=12.4),
            "llm    m: 3 + 4 tokens, 12 ms",
            id="llm_call",
        ),
        pytest.param(
            WebhookPayload(delivery_id="d", url="http://h/", attempts=2, outcome="delivered"),
            "hook   webhook delivered to http://h/ after 2 attempt(s)",
            id="webhook",
        ),
    ],
)
def test_event_text_reads_each_kind(payload: Payload, text: str) -> None:
    """Each event kind reads as ``#seq label body``, continuation lines indented."""
    assert event_text(make_event(payload)).plain == "    #7 " + text


def test_event_text_cuts_long_tool_output() -> None:
    """A tool's output shows its first 20 lines and counts the rest."""
    content = "\n".join(f"line {n}" for n in range(1, 31))
    payload: Any = ObservationPayload(call_id="1", tool="terminal", content=content)
    plain = event_text(make_event(payload, source=Source.TOOL)).plain
    assert "line 20" in plain and "line 21" not in plain
    assert plain.endswith("… 10 more lines")


async def test_cli_queue_on_a_terminal_redraws_the_table(
    server: LiveServer, cli: Cli, cli_environ: pytest.MonkeyPatch, gates: Gates
) -> None:
    """On a terminal, ``queue --count N`` redraws one table in place (rich's live area)
    and leaves the last one on the screen."""
    force_terminal(cli_environ)
    await create(server, gated("hold"), run=True)
    await gates["hold"].wait_entered()
    result = await cli("queue", "--count", "3", "--interval", "0.01")
    assert result.code == 0, result.err
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.out)
    assert plain.count("run slots 1/2 busy") >= 3  # each refresh (rich redraws once more)
    assert "\x1b[2K" in result.out  # the earlier tables were erased, line by line
    gates.release_all()


@pytest.mark.slow
async def test_cli_ctrl_c_exits_130(server: LiveServer) -> None:
    """Ctrl-C (SIGINT) stops ``trellis queue`` with exit code 130, without a traceback."""
    # The interpreter's own SIGINT handler, set explicitly: a child of a shell's background
    # job would otherwise inherit SIGINT ignored.
    program = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " from app.cli import main; sys.exit(main(['queue', '--interval', '0.05']))"
    )
    environ = {**os.environ, "NO_COLOR": "1"}
    with trio.fail_after(25):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
        )
        assert process.stdout is not None and process.stderr is not None
        seen = b""
        while b"run slots" not in seen:
            seen += await process.stdout.receive_some()
        process.send_signal(signal.SIGINT)
        async with process.stdout, process.stderr:
            err = b"".join([chunk async for chunk in process.stderr])
            assert await process.wait() == 130
    assert err == b""


async def test_cli_watch_follows_the_line_as_it_moves(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """While the watched run waits, its place in the line is asked again (the stream says
    when the run starts, not when the line moves): 2, then 1 once the run ahead left."""
    for _ in range(2):
        await create(server, gated("hold"), run=True)
    await gates["hold"].wait_entered(2)
    ahead = await create(server, gated("ahead"), run=True)
    watched = await create(server, gated("next"), run=True)
    assert watched.run is not None and watched.run.queue_position == 2
    async with cli.background("watch", watched.id) as watching:
        await cli.wait_for_output("queue  position 2")
        response = await server.client.post(f"/api/conversations/{ahead.id}/interrupt")
        assert response.status_code == 202  # the run ahead leaves the line
        await cli.wait_for_output("queue  position 1")
        for name in ("hold", "next"):
            gates[name].release()
        await watching.done.wait()
    result = cli.finish(watching)
    assert result.code == 0, result.err


async def test_cli_send_watch_and_a_deleted_conversation(
    server: LiveServer, cli: Cli, gates: Gates
) -> None:
    """``send --watch`` shows the message and the run it started; deleting a watched
    conversation stops its run, which the watch shows (``paused (deleted)``, exit 5)."""
    record = await create(server, {"kind": "script", "steps": [{"say": "answer"}]})
    result = await cli("send", record.id, "question", "--watch")
    assert result.code == 0, result.err
    assert result.lines[0] == "message #1"
    assert labels(result.out) == ["user", "status", "status", "agent", "status"]
    both = await cli("run", record.id, "--wait", "--watch")
    assert (both.code, both.err) == (
        2,
        "trellis: run: --wait or --watch, not both (--watch waits too)\n",
    )

    held = await create(server, gated("hold"), run=True)
    async with cli.background("watch", held.id) as watching:
        await cli.wait_for_output("gate hold")
        response = await server.client.delete(f"/api/conversations/{held.id}")
        assert response.status_code == 204
        await watching.done.wait()
    deleted = cli.finish(watching)
    assert deleted.code == 5, deleted.err  # the run was stopped, and said so before the end
    assert deleted.lines[-1].split()[1:] == ["status", "paused", "(deleted)"]
