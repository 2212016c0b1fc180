"""What the test servers in this folder share: ``serve`` with one more agent kind.

Each program defines its kind and calls :func:`serve_with_kind` from its ``main``; the
command line's arguments are ``serve``'s flags (``--port 0 --data-dir D ...``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import trio
from pydantic import BaseModel

from app import default_registry, load_settings
from app.cli import serve


def serve_with_kind(kind: str, spec: type[BaseModel], agent: Any) -> int:
    """Serve until SIGTERM with ``kind`` registered; the exit code of ``serve``."""
    flags = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=True))
    settings = load_settings(**{key.lstrip("-").replace("-", "_"): v for key, v in flags.items()})
    registry = default_registry()
    registry.register(kind, spec, agent)
    code: int = trio.run(functools.partial(serve, settings, registry=registry))
    return code
