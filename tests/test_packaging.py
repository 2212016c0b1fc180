"""Trellis installs and serves as a Python package: declared dependencies, package data,
the wheel in a fresh venv, and the Makefile's variables."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.resources
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def third_party_imports() -> set[str]:
    """Top-level names of every module app/ imports that is neither stdlib nor app itself."""
    names: set[str] = set()
    for path in (REPO / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"app", "__future__"}


def test_packaging_declares_every_distribution_app_imports() -> None:
    """Each third-party module imported by app/ comes from a declared runtime dependency."""
    declared = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    for module in sorted(third_party_imports()):
        distributions = {requirement_name(d) for d in providers.get(module, [])}
        assert distributions & declared, f"{module} (from {distributions}) is not declared"


def test_packaging_default_config_ships_inside_the_package() -> None:
    """The documented defaults are package data; config/default.toml is a link to them."""
    packaged = importlib.resources.files("app").joinpath("default.toml")
    documented = REPO / "config" / "default.toml"
    assert documented.is_symlink()
    assert documented.resolve() == (REPO / "app" / "default.toml").resolve()
    assert packaged.read_text(encoding="utf-8") == documented.read_text(encoding="utf-8")


def make_dry_run(*arguments: str, venv: Path) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [make, "--dry-run", "--always-make", f"VENV={venv}", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def test_make_serve_takes_port_and_data_and_installs_no_test_tools(tmp_path: Path) -> None:
    """`make serve PORT=8001 DATA=./other` serves there, installing the package without [test]."""
    commands = make_dry_run("serve", "PORT=8001", "DATA=./other", venv=tmp_path / "venv")
    assert "-m app serve --host 127.0.0.1 --port 8001 --data-dir ./other" in commands
    assert "pip install --quiet -e .\n" in commands
    assert "[test]" not in commands


# -- the wheel, in a fresh venv --------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def run(*command: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built from a clean copy of the sources, installed with its declared
    dependencies (and nothing else) into a new venv; once per test session."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy, so no build/ or egg-info lands in the work tree
    shutil.copytree(REPO / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet")
    run(*pip, "wheel", "--no-deps", "--wheel-dir", root / "dist", source)
    [wheel] = (root / "dist").glob("trellis-*.whl")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    run(*pip, "--python", venv / "bin" / "python", "install", wheel)
    return Installed(wheel, venv)


@pytest.mark.slow
@pytest.mark.timeout(120)  # a cold pip cache downloads the dependencies once
def test_wheel_contains_the_package_and_its_default_config(installed: Installed) -> None:
    """The wheel holds app/ with default.toml, and nothing from tests/ or config/."""
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert "app/default.toml" in names
    assert {"app/static/dashboard.html", "app/static/dashboard.js"} <= set(names)
    assert "app/cli/__init__.py" in names
    assert not [name for name in names if name.startswith(("tests/", "config/"))]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wheel_in_a_fresh_venv_serves_health_from_another_directory(
    installed: Installed, tmp_path: Path
) -> None:
    """Installed without extras: `trellis --version`, `default-config` and `serve` work."""
    elsewhere = tmp_path / "elsewhere"  # no app/ here: imports come from the venv
    elsewhere.mkdir()
    version = run(installed.bin / "trellis", "--version", cwd=elsewhere)
    assert version == f"trellis {importlib.metadata.version('trellis')}\n"
    documented = (REPO / "config" / "default.toml").read_text(encoding="utf-8")
    assert run(installed.bin / "trellis", "default-config", cwd=elsewhere) == documented
    where = run(installed.bin / "python", "-c", "import app; print(app.__file__)", cwd=elsewhere)
    assert Path(where.strip()).is_relative_to(installed.venv)

    command = [installed.bin / "trellis", "serve", "--port", "0", "--data-dir", "data"]
    process = subprocess.Popen(
        command, cwd=elsewhere, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("trellis: serving on "), banner + process.stderr.read()  # type: ignore[union-attr]
        response = httpx.get(banner.split()[-1] + "/health", timeout=10)
        assert response.json() == {"status": "ok"}
        for path in ("/", "/static/dashboard.js"):  # the dashboard ships as package data
            assert httpx.get(banner.split()[-1] + path, timeout=10).status_code == 200, path
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert (elsewhere / "data" / "trellis.sqlite3").exists()
