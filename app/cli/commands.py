"""The client commands: ``trellis new|send|run|watch|ls|show|pause|interrupt|queue|limits``.

Each command is a function ``(session, arguments) -> exit code`` making one or a few calls
of :class:`~app.client.TrellisClient` and printing the answer: the server's JSON with
``--json``, text for people without. :func:`run_client_command` opens the session and turns
what can go wrong into one stderr line and an exit code (see :mod:`app.cli.output`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from app.cli.event_text import event_text
from app.cli.output import ExitCode, Output, UsageError, report_client_error, run_exit_code
from app.cli.queue_view import queue_command
from app.cli.session import Session, open_session, server_of
from app.cli.watch import Target, parse_kinds, watch_conversation, watch_run
from app.client import ClientError, TrellisClient, WaitTimedOut
from app.lifecycle import Status
from app.records import ConversationSummary, RunRecord

#: One ``wait_run`` request holds at most this long; ``run --wait`` asks again until the
#: run ends or ``--timeout`` is reached (the server allows up to 3,600 s per request).
WAIT_REQUEST_SECONDS = 300.0

Command = Callable[[Session, argparse.Namespace], int]


def run_client_command(arguments: argparse.Namespace) -> int:
    """Run the client command ``arguments.command``; return its exit code."""
    output = Output(json=arguments.json)
    try:
        with open_session(arguments, output) as session:
            return COMMANDS[arguments.command](session, arguments)
    except UsageError as error:
        output.error(f"{arguments.command}: {error}")
        return ExitCode.USAGE
    except ClientError as error:
        return report_client_error(output, error, server_of(arguments))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def agent_spec(arguments: argparse.Namespace) -> dict[str, Any]:
    """The agent of ``trellis new``: ``--say`` steps, ``--agent`` JSON or a ``--script`` file.

    Errors:
        :class:`UsageError` for JSON that does not parse or is not an agent's shape, or a
        file that cannot be read.
    """
    if arguments.say:
        return {"kind": "script", "steps": [{"say": text} for text in arguments.say]}
    origin, text = "--agent", arguments.agent
    if arguments.script is not None:
        origin = f"--script {arguments.script}"
        try:
            text = Path(arguments.script).read_text(encoding="utf-8")
        except OSError as error:
            raise UsageError(f"{origin}: cannot read it: {error.strerror}") from error
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{origin}: not JSON: {error}") from error
    if isinstance(value, list) and arguments.script is not None:
        return {"kind": "script", "steps": value}
    if not isinstance(value, dict):
        raise UsageError(f'{origin}: an agent spec is a JSON object, like {{"kind": "llm"}}')
    return value


def new(session: Session, arguments: argparse.Namespace) -> int:
    start = arguments.run or arguments.watch
    record = session.client.create_conversation(
        agent_spec(arguments),
        title=arguments.title,
        initial_message=arguments.message,
        max_iterations=arguments.max_iterations,
        workspace=arguments.workspace,
        run=start,
    )
    if session.output.json:
        session.output.model(record)
    else:
        session.output.line(record.id)
    if arguments.watch:
        return watch_run(session, record.id, Target(record.run), after_seq=0)
    return ExitCode.OK


def send(session: Session, arguments: argparse.Namespace) -> int:
    conversation_id = arguments.conversation_id
    accepted = session.client.send_message(
        conversation_id,
        arguments.text,
        run=arguments.run or arguments.watch,
        if_busy=arguments.if_busy,
    )
    if session.output.json:
        session.output.model(accepted)
    else:
        session.output.line(f"message #{accepted.event.seq}")
        if accepted.run is not None:
            session.output.line(run_line(accepted.run))
    if arguments.watch:
        target = Target(accepted.run)
        return watch_run(session, conversation_id, target, after_seq=accepted.event.seq - 1)
    return ExitCode.OK


def run(session: Session, arguments: argparse.Namespace) -> int:
    if arguments.timeout is not None and not arguments.wait:
        raise UsageError("--timeout goes with --wait")
    if arguments.wait and arguments.watch:
        raise UsageError("--wait or --watch, not both (--watch waits too)")
    client, conversation_id = session.client, arguments.conversation_id
    before = client.get_conversation(conversation_id).event_count if arguments.watch else 0
    started = client.start_run(conversation_id, if_busy=arguments.if_busy)
    if arguments.watch:
        _print_run(session.output, started)
        return watch_run(session, conversation_id, Target(started), after_seq=before)
    if not arguments.wait:
        _print_run(session.output, started)
        return ExitCode.OK
    ended = wait_for_end(client, started, timeout=arguments.timeout)
    _print_run(session.output, ended)
    return run_exit_code(ended.status)


def wait_for_end(client: TrellisClient, run: RunRecord, *, timeout: float | None) -> RunRecord:
    """The run once it has ended, asking the server again every
    :data:`WAIT_REQUEST_SECONDS`; ``timeout=None`` waits as long as it takes.

    Errors:
        :class:`~app.client.WaitTimedOut` once ``timeout`` seconds have passed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = WAIT_REQUEST_SECONDS if deadline is None else deadline - time.monotonic()
        try:
            return client.wait_run(
                run.conversation_id, run.id, timeout=max(0.0, min(left, WAIT_REQUEST_SECONDS))
            )
        except WaitTimedOut:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def watch(session: Session, arguments: argparse.Namespace) -> int:
    kinds = parse_kinds(arguments.kinds)
    return watch_conversation(
        session, arguments.conversation_id, after_seq=arguments.after_seq, kinds=kinds
    )


def ls(session: Session, arguments: argparse.Namespace) -> int:
    page = session.client.list_conversations(
        status=arguments.status, limit=arguments.limit, cursor=arguments.cursor
    )
    if session.output.json:
        session.output.model(page)
        return ExitCode.OK
    table = Table(
        "ID", "STATUS", "AGENT", "EVENTS", "UPDATED (UTC)", "TITLE", box=None, pad_edge=False
    )
    table.columns[0].no_wrap = True
    table.columns[3].justify = "right"
    table.columns[5].overflow = "ellipsis"
    for item in page.items:
        if isinstance(item, ConversationSummary):
            updated = f"{item.updated_at:%Y-%m-%d %H:%M:%S}"
            table.add_row(
                item.id, item.status, item.agent_kind, str(item.event_count), updated, item.title
            )
        else:
            table.add_row(item.id, "unreadable", "", "", "", item.error)
    session.output.console.print(table)
    if page.next_cursor is not None:
        session.output.line(f"more: trellis ls --cursor {page.next_cursor}")
    return ExitCode.OK


def show(session: Session, arguments: argparse.Namespace) -> int:
    client, conversation_id = session.client, arguments.conversation_id
    record = client.get_conversation(conversation_id)
    events = []
    if arguments.events > 0:
        found = client.search_events(conversation_id, order="desc", limit=arguments.events)
        events = list(reversed(found.items))
    output = session.output
    if output.json:
        body = {
            "conversation": record.model_dump(mode="json"),
            "events": [event.model_dump(mode="json") for event in events],
        }
        output.line(json.dumps(body))
        return ExitCode.OK
    rows = [
        ("conversation", record.id),
        ("title", record.title or ""),
        ("status", record.status),
        ("agent", str(record.agent.get("kind", ""))),
        ("workspace", record.workspace),
        ("events", str(record.event_count)),
        ("created (UTC)", f"{record.created_at:%Y-%m-%d %H:%M:%S}"),
        ("run", run_line(record.run).removeprefix("run ") if record.run else "none yet"),
    ]
    if record.usage.prompt_tokens or record.usage.completion_tokens:
        usage = record.usage
        rows.append(("tokens", f"{usage.prompt_tokens} + {usage.completion_tokens}"))
    for key, value in rows:
        output.line(f"{key:<14} {value}".rstrip())
    if events:
        output.line(f"last {len(events)} events:")
        for event in events:
            output.console.print(event_text(event))
    return ExitCode.OK


def pause(session: Session, arguments: argparse.Namespace) -> int:
    _print_run(session.output, session.client.pause(arguments.conversation_id))
    return ExitCode.OK


def interrupt(session: Session, arguments: argparse.Namespace) -> int:
    _print_run(session.output, session.client.interrupt(arguments.conversation_id))
    return ExitCode.OK


def limits(session: Session, arguments: argparse.Namespace) -> int:
    client = session.client
    if arguments.max_concurrent_runs is not None or arguments.max_queued_runs is not None:
        client.set_limits(
            max_concurrent_runs=arguments.max_concurrent_runs,
            max_queued_runs=arguments.max_queued_runs,
        )
    info = client.server_info()
    if session.output.json:
        session.output.model(info.limits)
        return ExitCode.OK
    stats, limits = info.statistics, info.limits
    rows = [
        ("max_concurrent_runs", limits.max_concurrent_runs, f"running {stats.running}"),
        ("max_queued_runs", limits.max_queued_runs, f"queued {stats.queued}"),
        ("io_threads", limits.io_threads, f"busy {stats.io_borrowed}"),
        ("tool_threads", limits.tool_threads, f"busy {stats.tool_borrowed}"),
        ("max_iterations", limits.max_iterations, ""),
    ]
    for name, value, usage in rows:
        session.output.line(f"{name:<20} {value:<6} {usage}".rstrip())
    return ExitCode.OK


def run_line(run: RunRecord) -> str:
    """``run <id> queued (position 2)``, ``run <id> paused (interrupt)``, ``… error: <why>``."""
    text = f"run {run.id} {run.status}"
    if run.status == Status.QUEUED and run.queue_position is not None:
        text += f" (position {run.queue_position})"
    elif run.reason and run.status != Status.QUEUED:
        text += f" ({run.reason})"
    if run.error:
        text += f": {run.error}"
    return text


def _print_run(output: Output, run: RunRecord) -> None:
    if output.json:
        output.model(run)
    else:
        output.line(run_line(run))


COMMANDS: dict[str, Command] = {
    "new": new,
    "send": send,
    "run": run,
    "watch": watch,
    "ls": ls,
    "show": show,
    "pause": pause,
    "interrupt": interrupt,
    "queue": queue_command,
    "limits": limits,
}
