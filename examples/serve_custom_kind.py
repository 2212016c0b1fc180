"""Serve your own agent kind over HTTP, exactly as ``trellis serve`` serves the built-in ones.

    .venv/bin/python examples/serve_custom_kind.py            # http://127.0.0.1:8000
    .venv/bin/python examples/serve_custom_kind.py --port 0   # a free port, printed

Then ``POST /api/conversations`` with ``{"agent": {"kind": "echo", "times": 2},
"initial_message": "hi", "run": true}`` runs the ``echo`` kind of ``examples/embed.py``,
and ``GET /openapi.json`` lists it among the agent kinds (its spec model is part of the
document). Every route of the API works as with the built-in kinds.

The program registers the kind on an :class:`~app.AgentRegistry` and hands it to
:func:`app.cli.serve`, the function behind ``trellis serve``. That function claims the data
directory, opens the store, builds the app with ``create_app(settings, registry=registry,
store=store)`` and serves it on Hypercorn's trio worker; its first line on stdout is
``trellis: serving on http://127.0.0.1:PORT``.

Who owns what: ``serve`` owns everything until it returns — the store, the app, and, through
the app, the run supervisor (started when Hypercorn starts serving the app, in its lifespan
task). Runs are tasks of the supervisor's nursery, each hosting one worker thread.

Cancellation and signals: the first SIGTERM or SIGINT drains the supervisor *before*
Hypercorn closes its listeners: new runs get 503, every queued and running run is stopped
with reason ``shutdown`` and its thread joined, every stream gets the final statuses; then
Hypercorn closes the connections, ``serve`` closes the store and returns 0, the exit code.
A second signal exits at once (code 1); committed events are safe either way.

Other settings: ``Settings(...)`` reads nothing but its arguments here. For files and
``TRELLIS_*`` variables use :func:`app.load_settings`; a host other than the loopback one
needs API keys, which ``trellis serve`` checks before it starts (``app.cli.check_bind``).
To run the app beside other tasks of your own, ``create_app(settings, registry=...)`` is an
ASGI app for ``hypercorn.trio.serve`` — but then the signals, and draining the supervisor
before Hypercorn closes connections, are yours to handle (see ``app/cli/serving.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio
from embed import EchoAgent, EchoSpec  # the custom kind of examples/embed.py, next to this file

from app import Settings, default_registry
from app.cli import serve
from app.logs import configure_logging


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the echo agent kind over HTTP.")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free one")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="where the database lives (default: a temporary directory, deleted after a"
        " clean stop)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.data_dir is not None:
        return serve_echo(arguments.port, arguments.data_dir)
    with tempfile.TemporaryDirectory(prefix="trellis-echo-") as scratch:
        return serve_echo(arguments.port, Path(scratch))


def serve_echo(port: int, data_dir: Path) -> int:
    """Serve the built-in kinds and ``echo`` on 127.0.0.1 until SIGTERM or SIGINT; return
    the exit code (0 after a clean drain)."""
    settings = Settings(port=port, data_dir=data_dir)
    registry = default_registry(settings.llm)  # the built-in kinds (script, llm), plus ours:
    registry.register("echo", EchoSpec, EchoAgent)
    configure_logging(settings.log_level, settings.log_format)  # to stderr
    return trio.run(partial(serve, settings, registry=registry))


if __name__ == "__main__":
    sys.exit(main())
