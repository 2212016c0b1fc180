"""``python -m app serve`` (also ``trellis serve``): Hypercorn's trio worker, one process.

Signals (Hypercorn's programmatic ``serve`` installs no handler of its own, so we own them):

1. The first SIGTERM or SIGINT starts the drain *while the listeners are still open*:
   ``/ready`` answers 503, new runs get 503 ``shutting_down``, every queued and running run is
   stopped with reason ``shutdown`` and its thread joined. Only then does the shutdown
   trigger return, and Hypercorn closes the listeners and connections, runs
   ``after_serving`` (which finds nothing left to drain) and returns: exit code 0.
2. A second signal forces an immediate exit (code 1). Committed data is safe: every
   event is committed before it is returned, and SQLite's WAL survives a killed process.

If run threads have not returned after ``shutdown_grace_seconds`` (a custom agent blocking
without a cancellation point), their runs are recorded as paused and the process exits
with code 1, since threads cannot be killed.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from app.agents.registry import AgentRegistry
from app.settings import Settings, SettingsError, load_settings
from app.supervisor import RunSupervisor
from app.web import create_app

log = logging.getLogger("trellis")


_FLAG_TYPES = (str, int, float, bool, Path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--config", help="a TOML file shaped like config/default.toml")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation not in _FLAG_TYPES:
            continue  # lists and tables ([llm]): in the TOML file or TRELLIS_* variables
        if field.annotation is bool:
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            serve.add_argument(flag, dest=name, default=None, metavar=name.upper())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    try:
        settings = load_settings(args.pop("config"), **args)
        _refuse_unprotected_bind(settings.host)
    except SettingsError as exc:
        print(f"trellis: bad settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return trio.run(serve, settings)
    except BaseExceptionGroup as group:
        bind_errors, rest = group.split(OSError)  # the port is taken, the address not ours
        if bind_errors is None or rest is not None:
            raise
        for error in _leaves(bind_errors):
            print(
                f"trellis: cannot serve on {settings.host}:{settings.port}: {error}",
                file=sys.stderr,
            )
        return 1


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (possibly nested) exception group."""
    return [
        leaf
        for error in group.exceptions
        for leaf in (_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    ]


def _refuse_unprotected_bind(host: str) -> None:
    """The API has no authentication yet: only loopback addresses may be bound."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SettingsError(
            f"host: {host!r} is not a loopback address; the API has no authentication yet,"
            " so Trellis only serves on loopback (e.g. 127.0.0.1)"
        )


async def serve(
    settings: Settings,
    *,
    registry: AgentRegistry | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve until a signal; drain; return the exit code.

    Embedders with their own agent kinds can serve them the same way::

        trio.run(functools.partial(serve, load_settings(), registry=my_registry))
    """
    app = create_app(settings, registry=registry)
    config = HypercornConfig()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    # Connections get little time once the drain is over: every run has already ended.
    config.graceful_timeout = min(settings.shutdown_grace_seconds, 1.0)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def shutdown_trigger() -> None:
                signum = await anext(aiter(signals))
                log.info("%s received: draining", signal.Signals(signum).name)
                nursery.start_soon(_exit_on_second_signal, signals)
                await _drain(app.extensions["trellis.supervisor"], settings)

            async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn.trio.serve(
                    app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
                )
                nursery.cancel_scope.cancel()  # the second-signal watcher is no longer needed

            binds: list[str] = await nursery.start(run_hypercorn)
            # What start-up allocated (modules, the app, its routes) lives as long as the
            # process: keep it out of the garbage collector's scans. Collections while
            # serving get cheaper, and the interpreter exits fast after the drain (SIGTERM
            # with 100 runs in flight: 0.51 s -> 0.20 s to exit, median of 3 on this machine).
            gc.freeze()
            print(f"trellis: serving on {binds[0]}", flush=True)
            task_status.started(binds)
    log.info("stopped cleanly")
    return 0


async def _drain(supervisor: RunSupervisor, settings: Settings) -> None:
    with trio.move_on_after(settings.shutdown_grace_seconds):
        await supervisor.drain("shutdown")
        return
    stuck = await supervisor.record_unfinished("shutdown")
    log.error(
        "%d run thread(s) did not stop within shutdown_grace_seconds=%s; recorded them as"
        " paused and exiting without them",
        stuck,
        settings.shutdown_grace_seconds,
    )
    _hard_exit(1)


async def _exit_on_second_signal(signals: AsyncIterator[int]) -> None:
    signum = await anext(signals)
    log.warning("%s received again: exiting now", signal.Signals(signum).name)
    _hard_exit(1)


def _hard_exit(code: int) -> Any:
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)
