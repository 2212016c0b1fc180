"""The command line: ``trellis`` (installed script) or ``python -m app``.

``trellis serve [flags]`` serves the HTTP API (see :mod:`app.cli.serving` for what happens
on the way up and on SIGTERM); ``trellis default-config`` prints every setting with its
meaning; ``trellis --version`` prints the version.

Exit codes of ``serve``: 0 after a clean drain; 1 when the server cannot start (the port is
taken, the data directory is in use by another server or unusable) or the drain ran out of
time; 2 for bad settings. A failure to start is one line on stderr, never a traceback.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from collections.abc import Sequence
from importlib import resources

import trio

from app.auth import load_api_keys
from app.cli.client_parser import CLIENT_COMMANDS
from app.cli.commands import run_client_command
from app.cli.demo import demo_command
from app.cli.parser import build_parser, overrides_from
from app.cli.serving import serve
from app.logs import configure_logging
from app.settings import Settings, SettingsError, resolve_settings
from app.store.lock import DataDirError
from app.tools.sandbox import SandboxUnavailable

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("trellis.settings")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    arguments = build_parser().parse_args(argv)
    if arguments.command in CLIENT_COMMANDS:  # a client of a running server
        return run_client_command(arguments)
    if arguments.command == "demo":  # embedded servers, or a running one (--server)
        return demo_command(arguments)
    if arguments.command == "default-config":
        print(default_config_text(), end="")
        return 0
    try:
        resolved = resolve_settings(arguments.config, overrides=overrides_from(arguments))
        settings = resolved.settings
        keys = load_api_keys(settings)  # the file too: a bad one fails here, exit code 2
        check_bind(settings, has_keys=bool(keys))
    except SettingsError as exc:
        print(f"trellis: bad settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    for note in resolved.warnings:
        log.warning(note)
    try:
        return trio.run(serve, settings)
    except (DataDirError, SandboxUnavailable) as exc:
        print(f"trellis: {exc}", file=sys.stderr)
        return 1
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


def default_config_text() -> str:
    """The documented default settings, as shipped inside the package (``app/default.toml``)."""
    return resources.files("app").joinpath("default.toml").read_text(encoding="utf-8")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (possibly nested) exception group."""
    return [
        leaf
        for error in group.exceptions
        for leaf in (_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    ]


def check_bind(settings: Settings, *, has_keys: bool) -> None:
    """A non-loopback ``host`` needs API keys, or ``insecure_no_auth`` (which prints a
    warning on stderr: anyone who reaches the port may run commands).

    Errors:
        :class:`SettingsError` for a non-loopback host without either.
    """
    host = settings.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or has_keys:
        return
    if not settings.insecure_no_auth:
        raise SettingsError(
            f"host: {host!r} is not a loopback address and no api_keys are set: configure"
            " keys (api_keys, TRELLIS_API_KEYS or api_keys_file), or pass --insecure-no-auth"
            " to serve it open anyway"
        )
    print(
        f"trellis: WARNING: serving {host} without API keys (--insecure-no-auth): anyone who"
        " reaches this port can run commands as this user",
        file=sys.stderr,
    )
