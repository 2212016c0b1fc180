"""The client commands' arguments: ``trellis new|send|run|watch|ls|show|pause|interrupt|
queue|limits``, each talking to a running server over HTTP (see :mod:`app.cli.commands`).

Every client command takes ``--server URL`` (default ``$TRELLIS_SERVER``, else
``http://127.0.0.1:8000``), ``--api-key KEY`` (default ``$TRELLIS_API_KEY``; prefer the
variable: a command line shows in process listings) and ``--json``.
"""

from __future__ import annotations

import argparse

from app.lifecycle import Status

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV_VAR = "TRELLIS_SERVER"
API_KEY_ENV_VAR = "TRELLIS_API_KEY"
IF_BUSY = ("enqueue", "reject", "interrupt")
#: The exit codes of :class:`app.cli.output.ExitCode`, for every client command's --help.
EXIT_CODES_EPILOG = (
    "Exit codes: 0 ok (run --wait and watch: the run finished); 1 the server answered with"
    " an error ('trellis: <code>: <message>' on stderr); 2 usage error; 3 the server cannot"
    " be reached; 4 the run ended in error; 5 the run ended paused (pause, interrupt,"
    " shutdown); 130 Ctrl-C."
)

#: The client commands and their one-line help, in the order ``trellis --help`` lists them.
CLIENT_COMMANDS: dict[str, str] = {
    "new": "create a conversation (and start its run)",
    "send": "send a user message to a conversation",
    "run": "start a run of a conversation (and wait for it, or watch it)",
    "watch": "follow a conversation's events live until its run ends",
    "ls": "list conversations",
    "show": "show a conversation, its current run and its last events",
    "pause": "pause a conversation's run at its next step boundary",
    "interrupt": "stop a conversation's run now",
    "queue": "the server's runs and run slots, as a live table",
    "limits": "show the server's run limits, or change them",
}


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client commands to ``commands`` (the ``add_subparsers`` of ``trellis``)."""
    common = _common_options()
    parsers = {
        name: commands.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            epilog=EXIT_CODES_EPILOG,
            parents=[common],
        )
        for name, text in CLIENT_COMMANDS.items()
    }
    _new(parsers["new"])
    _send(parsers["send"])
    _run(parsers["run"])
    _watch(parsers["watch"])
    _ls(parsers["ls"])
    parsers["show"].add_argument("conversation_id", metavar="ID")
    parsers["show"].add_argument(
        "--events", type=int, default=10, metavar="N", help="how many last events (default: 10)"
    )
    parsers["pause"].add_argument("conversation_id", metavar="ID")
    parsers["interrupt"].add_argument("conversation_id", metavar="ID")
    _queue(parsers["queue"])
    _limits(parsers["limits"])


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        metavar="URL",
        help=f"the server's address (default: ${SERVER_ENV_VAR}, or {DEFAULT_SERVER})",
    )
    common.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the API key, sent as a bearer token (default: ${API_KEY_ENV_VAR}; the variable"
        " keeps the key out of process listings)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print the server's JSON, one object per line (streams: one line per event)",
    )
    return common


def _watch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch",
        action="store_true",
        help="start the run and follow it as 'trellis watch' does; exit with the run's code",
    )


def _new(parser: argparse.ArgumentParser) -> None:
    agent = parser.add_mutually_exclusive_group(required=True)
    agent.add_argument("--agent", metavar="JSON", help='the agent spec, e.g. \'{"kind": "llm"}\'')
    agent.add_argument(
        "--script",
        metavar="FILE",
        help="a JSON file: a script agent's steps (an array), or a whole agent spec (an object)",
    )
    agent.add_argument(
        "--say",
        metavar="TEXT",
        action="append",
        help="a script agent that says TEXT (repeat for more steps)",
    )
    parser.add_argument("--title", metavar="TEXT")
    parser.add_argument("--message", metavar="TEXT", help="the first user message")
    parser.add_argument("--max-iterations", type=int, metavar="N")
    parser.add_argument("--workspace", metavar="NAME", help="a named workspace directory")
    parser.add_argument("--run", action="store_true", help="start a run at once")
    _watch_flag(parser)


def _send(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("conversation_id", metavar="ID")
    parser.add_argument("text", metavar="TEXT")
    parser.add_argument("--run", action="store_true", help="start a run with the message")
    parser.add_argument(
        "--if-busy",
        choices=IF_BUSY,
        help="with --run, when a run is active: run after it (the server's default), refuse"
        " (409), or interrupt it",
    )
    _watch_flag(parser)


def _run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("conversation_id", metavar="ID")
    parser.add_argument(
        "--if-busy",
        choices=IF_BUSY,
        default="reject",
        help="when a run is active: refuse (409, the default), run after it, or interrupt it",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the run to end")
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait: give up after this long (exit 1, 'timeout'; default: wait on)",
    )
    _watch_flag(parser)


def _watch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("conversation_id", metavar="ID")
    parser.add_argument(
        "--after-seq",
        type=int,
        default=0,
        metavar="N",
        help="show the events after seq N (default: 0, the whole conversation)",
    )
    parser.add_argument(
        "--kinds", metavar="A,B", help="show only these event kinds, e.g. message,status"
    )


def _ls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", choices=[status.value for status in Status])
    parser.add_argument(
        "--limit", type=int, metavar="N", help="at most N (the server's default: 100)"
    )
    parser.add_argument("--cursor", metavar="C", help="the next page, as the last page said")


def _queue(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="print the table once and exit")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between refreshes (default: 1)",
    )
    parser.add_argument(
        "--count", type=int, metavar="N", help="refresh N times, then exit (default: until Ctrl-C)"
    )


def _limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-concurrent-runs", type=int, metavar="N", help="run slots")
    parser.add_argument(
        "--max-queued-runs", type=int, metavar="M", help="how many runs may wait for a slot"
    )
