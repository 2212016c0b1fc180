"""The public surface: every ``__all__`` in ``app`` is exactly what its module exports.

In the spirit of httpx's ``tests/test_exported_members.py`` and anyio's
``tests/test_all_attributes.py``. Modules declaring ``__all__`` are found by parsing the
sources, so a new one is checked without being listed here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import types
from pathlib import Path

import pytest

import app

APP_DIR = Path(app.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(APP_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def declares_all(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets)
        for node in tree.body
    )


#: Every module of ``app`` with an ``__all__``.
MODULES = [module_name(path) for path in sorted(APP_DIR.rglob("*.py")) if declares_all(path)]

#: Packages whose ``__init__`` only re-exports: their ``__all__`` is all they bind.
FACADES = ["app", "app.agents", "app.store", "app.tools"]


def names_bound_at_top_level(module: types.ModuleType) -> set[str]:
    """Every name the module's own source imports or assigns at module level."""
    assert module.__file__ is not None
    names: set[str] = set()
    for node in ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_exports_discovery_finds_every_facade() -> None:
    """Parsing the sources finds the __all__ of every facade package (so none goes unchecked)."""
    assert set(FACADES) <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_exports_all_lists_existing_objects_once(name: str) -> None:
    """Each name in a module's __all__ appears once and is an attribute that is not a module."""
    module = importlib.import_module(name)
    listed: list[str] = module.__all__
    duplicates = sorted({item for item in listed if listed.count(item) > 1})
    missing = [item for item in listed if not hasattr(module, item)]
    modules = [item for item in listed if isinstance(getattr(module, item, None), types.ModuleType)]
    assert (duplicates, missing, modules) == ([], [], [])


@pytest.mark.parametrize("name", FACADES)
def test_exports_facade_exports_exactly_all(name: str) -> None:
    """A facade's __init__ binds exactly the names of its __all__, and every public
    non-module attribute of the package is listed."""
    package = importlib.import_module(name)
    listed = set(package.__all__)
    assert names_bound_at_top_level(package) - {"__all__"} == listed
    public = {
        attribute
        for attribute, value in vars(package).items()
        if not attribute.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == {item for item in listed if not item.startswith("_")}


def test_exports_version_matches_installed_distribution() -> None:
    """__version__ is the version of the installed trellis distribution."""
    assert app.__version__ == importlib.metadata.version("trellis")
