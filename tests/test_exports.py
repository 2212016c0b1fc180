"""The public surface: ``app.__all__`` is exactly what ``app/__init__.py`` exports.

In the spirit of httpx's ``tests/test_exported_members.py``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import types
from pathlib import Path

import pytest

import app

INIT_FILE = Path(app.__file__)


def names_bound_in_init() -> set[str]:
    """Every name ``app/__init__.py`` itself imports or assigns at module level."""
    names: set[str] = set()
    for node in ast.parse(INIT_FILE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in app.__all__])
def test_exports_name_in_all_exists(name: str) -> None:
    """Every name listed in __all__ is an attribute of the package and not a module."""
    assert hasattr(app, name)
    assert not isinstance(getattr(app, name), types.ModuleType)


def test_exports_all_has_no_duplicates() -> None:
    """__all__ lists each name once."""
    assert len(app.__all__) == len(set(app.__all__))


def test_exports_every_public_attribute_is_in_all() -> None:
    """Every public non-module attribute of the package is listed in __all__, and vice versa."""
    public = {
        name
        for name, value in vars(app).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    listed = {name for name in app.__all__ if not name.startswith("_")}
    assert public == listed


def test_exports_match_names_bound_in_init_file() -> None:
    """The names app/__init__.py binds (imports, assignments) are exactly __all__."""
    assert names_bound_in_init() - {"__all__"} == set(app.__all__)


def test_exports_star_import_gives_exactly_all() -> None:
    """``from app import *`` binds exactly the names of __all__."""
    namespace: dict[str, object] = {}
    exec("from app import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(app.__all__)


def test_exports_version_matches_installed_distribution() -> None:
    """__version__ is the version of the installed trellis distribution."""
    assert app.__version__ == importlib.metadata.version("trellis")
