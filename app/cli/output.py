"""How the client commands speak: human text or the server's JSON, errors, exit codes.

Every client command (``trellis new``, ``ls``, ``watch`` …) writes through one
:class:`Output`: with ``--json`` it prints the server's own JSON, one object per line (a
stream prints one line per event), for programs; without it, rich text for people (tables,
colours on a terminal, plain text when piped). Errors always go to stderr as one line,
``trellis: <code>: <message>`` with the server's own code and message.

Exit codes, the contract scripts rely on (the README's "CLI" section and every client
command's ``--help`` show the same table,
:data:`app.cli.client_parser.EXIT_CODES_EPILOG`)::

    0  ok (for run --wait and watch: the run finished)
    1  the server answered with an error (its code and message on stderr)
    2  usage error (bad options)
    3  the server could not be reached
    4  run --wait / watch: the run ended in error
    5  run --wait / watch: the run ended paused (pause, interrupt, shutdown)
    130  interrupted by Ctrl-C (watch, queue)
"""

from __future__ import annotations

import enum
import sys
from typing import IO

from pydantic import BaseModel
from rich.console import Console

from app.client import APIError, ClientError, TrellisConnectionError
from app.lifecycle import Status


class ExitCode(enum.IntEnum):
    OK = 0
    API_ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    RUN_ERROR = 4
    RUN_PAUSED = 5
    INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


#: How a run that has ended reads as an exit code (``idle``: nothing ever ran).
_RUN_EXIT_CODES = {
    Status.FINISHED: ExitCode.OK,
    Status.IDLE: ExitCode.OK,
    Status.ERROR: ExitCode.RUN_ERROR,
    Status.PAUSED: ExitCode.RUN_PAUSED,
}

#: Statuses a run does not leave.
ENDED = frozenset({Status.FINISHED, Status.ERROR, Status.PAUSED})


class UsageError(Exception):
    """Options that parse but do not make sense together (exit code 2)."""


def run_exit_code(status: Status | None) -> ExitCode:
    """The exit code of a command that waited for a run which ended with ``status``."""
    return _RUN_EXIT_CODES.get(status, ExitCode.OK) if status is not None else ExitCode.OK


class Output:
    """Where one command's results and errors go.

    ``console`` writes to stdout; rich decides from the environment whether it is a
    terminal (``TTY_COMPATIBLE``, ``FORCE_COLOR``, ``NO_COLOR`` and ``COLUMNS`` are
    honoured), and prints plain text when it is not. ``json`` selects machine output.
    """

    def __init__(self, *, json: bool, file: IO[str] | None = None) -> None:
        self.json = json
        self.console = Console(file=file, highlight=False, soft_wrap=False)

    def model(self, model: BaseModel) -> None:
        """One line of the server's JSON for ``model`` (``--json``)."""
        self.line(model.model_dump_json())

    def line(self, text: str) -> None:
        """A line of plain text, untouched by rich (no markup, no wrapping), flushed."""
        file = self.console.file
        file.write(text + "\n")
        file.flush()

    def error(self, message: str) -> None:
        """One line on stderr: ``trellis: <message>``."""
        print(f"trellis: {message}", file=sys.stderr, flush=True)


def report_client_error(output: Output, error: ClientError, server: str) -> ExitCode:
    """Print what went wrong with a request to ``server``; return the exit code.

    The server's answers keep its own words: ``trellis: not_found: conversation … does
    not exist``.
    """
    if isinstance(error, APIError):
        output.error(f"{error.code}: {error.message}")
        return ExitCode.API_ERROR
    if isinstance(error, TrellisConnectionError):
        output.error(f"cannot reach the server at {server}: {error} (is it running? --server)")
        return ExitCode.UNREACHABLE
    output.error(str(error))
    return ExitCode.API_ERROR
