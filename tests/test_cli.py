"""The command line (``app/cli/``): flags, help, version, and how settings reach serve()."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import app.cli
from app.cli.parser import NO_FLAG
from app.settings import Settings
from app.settings_sources import leaf_fields

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SECRET = "sk-do-not-print-me"


@pytest.fixture(autouse=True)
def clean_environ_and_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TRELLIS_* variable of the developer's shell; the root logger restored afterwards."""
    for name in list(os.environ):
        if name.startswith("TRELLIS_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def no_serve(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the server with a recorder, so no test can start one."""
    served: list[Settings] = []

    async def fake_serve(settings: Settings) -> int:
        served.append(settings)
        return 0

    monkeypatch.setattr(app.cli, "serve", fake_serve)
    return served


def run_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        app.cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        pytest.param(["--max-concurrent-runs", "-3"], "--max-concurrent-runs '-3'", id="runs"),
        pytest.param(["--port", "70000"], "--port '70000': ", id="port-too-large"),
        pytest.param(["--port", "abc"], "--port 'abc': ", id="port-not-a-number"),
        pytest.param(["--log-level", "loud"], "--log-level 'loud': ", id="log-level"),
        pytest.param(["--llm-max-retries", "99"], "--llm-max-retries '99': ", id="llm-table"),
        pytest.param(["--host", "0.0.0.0"], "not a loopback address", id="host-any"),
        pytest.param(["--host", "192.168.1.10"], "not a loopback address", id="host-lan"),
        pytest.param(["--host", "example.com"], "not a loopback address", id="host-name"),
        pytest.param(["--config", "/nonexistent/t.toml"], "cannot read config", id="no-config"),
    ],
)
def test_cli_main_refuses_bad_settings(
    no_serve: list[Settings], capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    """Bad flags exit with code 2 and one stderr line naming the flag; nothing is served."""
    assert app.cli.main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("trellis: bad settings: ")
    assert named in err
    assert err.count("\n") == 1
    assert out == ""
    assert no_serve == []


@pytest.mark.parametrize(
    "host", [pytest.param(host, id=host) for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2")]
)
def test_cli_main_serves_loopback_with_flags(no_serve: list[Settings], host: str) -> None:
    """Valid flags reach serve() as settings; loopback hosts are accepted."""
    argv = ["serve", "--host", host, "--port", "0", "--max-concurrent-runs", "3"]
    assert app.cli.main([*argv, "--resume-on-start"]) == 0
    [settings] = no_serve
    assert (settings.host, settings.port, settings.max_concurrent_runs) == (host, 0, 3)
    assert settings.resume_on_start is True


def test_cli_table_flags_merge_with_the_config_file(
    no_serve: list[Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--llm-model over a file's [llm] table and an env key of it: each key from its source."""
    config = tmp_path / "t.toml"
    config.write_text('[llm]\nbase_url = "http://127.0.0.9:1/v1"\nmodel = "file"\n')
    monkeypatch.setenv("TRELLIS_LLM__MAX_RETRIES", "1")
    argv = ["serve", "--config", str(config), "--llm-model", "flag"]
    assert app.cli.main([*argv, "--command-env-passthrough", "PATH", "LANG"]) == 0
    [settings] = no_serve
    assert (settings.llm.base_url, settings.llm.model) == ("http://127.0.0.9:1/v1", "flag")
    assert settings.llm.max_retries == 1
    assert settings.command_env_passthrough == ["PATH", "LANG"]


def test_cli_unknown_environ_variable_is_a_warning_and_serves(
    no_serve: list[Settings], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRELLIS_API_KEY=... serve: serves, warns naming the variable, never prints its value."""
    monkeypatch.setenv("TRELLIS_API_KEY", SECRET)
    assert app.cli.main(["serve", "--port", "0"]) == 0
    assert len(no_serve) == 1
    out, err = capsys.readouterr()
    assert "WARNING trellis.settings: environment variable TRELLIS_API_KEY" in err
    assert SECRET not in out + err


def test_cli_version_is_the_installed_distribution_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`trellis --version` prints the version of the installed distribution."""
    with pytest.raises(SystemExit) as exit_info:
        app.cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"trellis {importlib.metadata.version('trellis')}\n"


def test_cli_serve_help_shows_every_setting_with_description_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`serve --help` lists a flag per setting, tables included, with description and default."""
    text = " ".join(run_help(capsys, "serve").split())  # undo argparse's line wrapping
    defaults = Settings()
    for key, field in leaf_fields(Settings):
        if key in NO_FLAG:  # keys stay off command lines
            assert "--" + "-".join(key).replace("_", "-") + " " not in text
            continue
        flag = "--" + "-".join(key).replace("_", "-")
        assert flag in text
        assert f"{field.description} (default: " in text, key
        default = getattr(defaults.llm, key[1]) if len(key) == 2 else getattr(defaults, key[0])
        if isinstance(default, int | float | str) and not isinstance(default, bool):
            assert f"{field.description} (default: {default})" in text


@pytest.mark.parametrize("argv", [pytest.param([], id="top"), pytest.param(["serve"], id="serve")])
def test_cli_help_has_no_rest_markup(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Help text is plain: no reST double backticks or roles from docstrings."""
    text = run_help(capsys, *argv)
    assert "``" not in text
    assert ":func:" not in text


def test_cli_default_config_prints_the_documented_file(capsys: pytest.CaptureFixture[str]) -> None:
    """`trellis default-config` prints config/default.toml, as shipped in the package."""
    assert app.cli.main(["default-config"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "default.toml").read_text(encoding="utf-8")
