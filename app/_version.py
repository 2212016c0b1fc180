"""The version, defined once: in ``pyproject.toml``, read here from the installed metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trellis")
except PackageNotFoundError:  # a source tree that was never installed (``pip install -e .``)
    __version__ = "0+unknown"
