"""The command line's parser, built from the settings model: one flag per setting.

Every leaf of :class:`~app.settings.Settings` gets a flag named after its key path
(``max_concurrent_runs`` -> ``--max-concurrent-runs``, ``llm.base_url`` -> ``--llm-base-url``)
whose help is the field's description and default. Flags are parsed as text and validated
by the settings model like every other source, so a bad value reads the same wherever it
came from; a flag left out is no override at all (``None``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from app._version import __version__
from app.cli.client_parser import add_client_commands
from app.cli.demo import add_demo_command
from app.settings import Settings
from app.settings_sources import KeyPath, flag_name, leaf_fields

DESCRIPTION = "Trellis: a Trio server that runs AI-agent conversations over HTTP."
SERVE_DESCRIPTION = (
    "Serve the HTTP API until SIGTERM or SIGINT, then stop every run and exit."
    " Only one server may use a data directory at a time."
)
SERVE_EPILOG = (
    "Settings come from, later wins: the defaults shown here < a TOML file (--config, or"
    " $TRELLIS_CONFIG) < environment variables TRELLIS_<NAME> (TRELLIS_LLM__<KEY> for the"
    " [llm] table; a JSON array for a list) < these flags. 'trellis default-config' prints"
    " every setting with its meaning."
)
# Arguments of the parser that are not settings.
NOT_SETTINGS = frozenset({"command", "config"})
# Settings without a flag: a command line shows in process listings (use the environment
# or api_keys_file).
NO_FLAG = frozenset({("api_keys",)})

_METAVARS: dict[Any, str] = {int: "INT", float: "NUMBER", Path: "PATH", str: "TEXT"}
_UNITS = ("seconds", "bytes")  # a name ending in a unit shows the unit: --port INT, --x SECONDS


def build_parser() -> argparse.ArgumentParser:
    """``trellis [--version] {serve,default-config}``."""
    parser = argparse.ArgumentParser(prog="trellis", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve the HTTP API", description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings, shaped like 'trellis default-config' prints"
        " (default: $TRELLIS_CONFIG, or none)",
    )
    for key, field in leaf_fields(Settings):
        if key not in NO_FLAG:
            _add_flag(serve, key, field)
    commands.add_parser(
        "default-config",
        help="print every setting with its default and meaning (a TOML file to start from)",
        description="Print the documented default settings: a TOML file to copy and edit.",
    )
    add_client_commands(commands)  # new, send, run, watch, ls, … (app/cli/client_parser.py)
    add_demo_command(commands)  # trellis demo (app/cli/demo.py)
    return parser


def overrides_from(arguments: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as nested overrides for :func:`~app.settings.resolve_settings`."""
    overrides: dict[str, Any] = {}
    for dest, value in vars(arguments).items():
        if dest in NOT_SETTINGS or value is None:
            continue
        *tables, name = dest.split(".")
        node = overrides
        for table in tables:
            node = node.setdefault(table, {})
        node[name] = value
    return overrides


def _add_flag(parser: argparse.ArgumentParser, key: KeyPath, field: FieldInfo) -> None:
    annotation = field.annotation
    help_text = f"{field.description} (default: {_default_text(field)})".replace("%", "%%")
    options: dict[str, Any] = {"dest": ".".join(key), "default": None, "help": help_text}
    if annotation is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif get_origin(annotation) is list:
        options.update(nargs="*", metavar="NAME")
    elif get_origin(annotation) is Literal:
        options["metavar"] = "{" + ",".join(str(choice) for choice in get_args(annotation)) + "}"
    else:
        unit = key[-1].rsplit("_", 1)[-1]
        options["metavar"] = unit.upper() if unit in _UNITS else _METAVARS.get(annotation, "VALUE")
    parser.add_argument(flag_name(key), **options)


def _default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return " ".join(str(item) for item in default) or "none"
    return str(default)
