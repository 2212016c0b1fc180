"""Settings (``app/settings.py``), their documented defaults, and the CLI's flag parsing."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import app.cli
from app.settings import Settings, SettingsError, load_settings

DEFAULT_TOML = Path(__file__).resolve().parent.parent / "config" / "default.toml"
FIELDS = list(Settings.model_fields)


@pytest.fixture(autouse=True)
def no_trellis_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any TRELLIS_* variable of the developer's shell from Settings() and the CLI."""
    for name in list(os.environ):
        if name.startswith("TRELLIS_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trellis.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def documented() -> dict[str, Any]:
    with DEFAULT_TOML.open("rb") as file:
        return tomllib.load(file)


# -- config/default.toml ---------------------------------------------------------------


def test_default_toml_documents_exactly_the_settings_fields(documented: dict[str, Any]) -> None:
    """config/default.toml has one key per Settings field and nothing else."""
    assert sorted(documented) == sorted(FIELDS)


@pytest.mark.parametrize("name", [pytest.param(name, id=name) for name in FIELDS])
def test_default_toml_value_equals_settings_default(documented: dict[str, Any], name: str) -> None:
    """Each documented value equals the Settings() default, with the same type."""
    default = getattr(Settings(), name)
    value = documented[name]
    if isinstance(default, Path):  # "./data" and Path("./data") -> "data": compare normalized
        assert str(Path(value)) == str(default)
    elif isinstance(default, BaseModel):  # a [table]: every key documented, same values
        assert value == default.model_dump()
    else:
        assert type(value) is type(default)
        assert value == default


def test_load_settings_default_toml_changes_nothing() -> None:
    """Loading the documented file gives the same settings as loading nothing."""
    assert load_settings(DEFAULT_TOML, environ={}) == load_settings(environ={}) == Settings()


# -- precedence ------------------------------------------------------------------------


def test_load_settings_precedence_file_environ_overrides(tmp_path: Path) -> None:
    """The TOML file loses to the environment, which loses to overrides; None is no override."""
    config = write_toml(tmp_path, 'port = 9001\nmax_iterations = 7\nlog_level = "debug"\n')
    environ = {"TRELLIS_PORT": "9002", "TRELLIS_MAX_ITERATIONS": "8", "HOME": "/x"}
    from_file = load_settings(config, environ={})
    from_environ = load_settings(config, environ=environ)
    from_flags = load_settings(config, environ=environ, port=9003, io_threads=None)
    assert (from_file.port, from_file.max_iterations, from_file.log_level) == (9001, 7, "debug")
    assert (from_environ.port, from_environ.max_iterations) == (9002, 8)
    assert from_environ.log_level == "debug"
    assert (from_flags.port, from_flags.max_iterations, from_flags.io_threads) == (9003, 8, 8)


def test_load_settings_environ_values_are_converted() -> None:
    """String environment values become the field's type."""
    environ = {
        "TRELLIS_RESUME_ON_START": "true",
        "TRELLIS_SHUTDOWN_GRACE_SECONDS": "2.5",
        "TRELLIS_DATA_DIR": "/tmp/trellis-data",
    }
    settings = load_settings(environ=environ)
    assert settings.resume_on_start is True
    assert settings.shutdown_grace_seconds == 2.5
    assert settings.database_path == Path("/tmp/trellis-data/trellis.sqlite3")


def test_load_settings_config_file_from_trellis_config(tmp_path: Path) -> None:
    """Without config_file, TRELLIS_CONFIG names the file (and is not itself a setting)."""
    config = write_toml(tmp_path, "max_queued_runs = 5\n")
    settings = load_settings(environ={"TRELLIS_CONFIG": str(config)})
    assert settings.max_queued_runs == 5


def test_load_settings_explicit_environ_ignores_process_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With an explicit environ, variables of the process environment are not read."""
    monkeypatch.setenv("TRELLIS_PORT", "1234")
    assert load_settings(environ={}).port == 8000


# -- errors ----------------------------------------------------------------------------


def test_load_settings_unknown_toml_key_names_it(tmp_path: Path) -> None:
    """A misspelled TOML key is an error naming the key."""
    config = write_toml(tmp_path, "max_concurent_runs = 3\n")
    with pytest.raises(SettingsError, match="max_concurent_runs: unknown setting"):
        load_settings(config, environ={})


def test_load_settings_unknown_environ_variable_names_it() -> None:
    """A misspelled TRELLIS_ variable is an error naming the variable; others are ignored."""
    environ = {"TRELLIS_MAX_CONCURENT_RUNS": "3", "PATH": "/bin", "TRELLISX": "1"}
    with pytest.raises(SettingsError, match="TRELLIS_MAX_CONCURENT_RUNS: unknown setting"):
        load_settings(environ=environ)


def test_load_settings_unknown_override_names_it() -> None:
    """An unknown keyword override is an error naming it."""
    with pytest.raises(SettingsError, match="max_concurent_runs: unknown setting"):
        load_settings(environ={}, max_concurent_runs=3)


BAD_VALUES = [
    pytest.param("max_concurrent_runs", -1, id="max_concurrent_runs-negative"),
    pytest.param("port", 70000, id="port-too-large"),
    pytest.param("io_threads", 0, id="io_threads-zero"),
    pytest.param("shutdown_grace_seconds", 0, id="shutdown_grace_seconds-zero"),
    pytest.param("max_request_bytes", 10, id="max_request_bytes-too-small"),
    pytest.param("log_level", "loud", id="log_level-unknown"),
    pytest.param("port", "eighty", id="port-not-a-number"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
@pytest.mark.parametrize("source", ["toml", "environ", "override"])
def test_load_settings_bad_value_names_key(
    tmp_path: Path, source: str, key: str, value: object
) -> None:
    """A value out of range or of the wrong type, from any source, is an error naming the key."""
    config, environ, overrides = None, {}, {}
    if source == "toml":
        config = write_toml(tmp_path, f"{key} = {value!r}\n".replace("'", '"'))
    elif source == "environ":
        environ = {f"TRELLIS_{key.upper()}": str(value)}
    else:
        overrides = {key: value}
    with pytest.raises(SettingsError, match=rf"^{key}: ") as info:
        load_settings(config, environ=environ, **overrides)
    assert isinstance(info.value, ValueError)


def test_load_settings_missing_config_file(tmp_path: Path) -> None:
    """A config file that does not exist is an error naming the path."""
    missing = tmp_path / "missing.toml"
    with pytest.raises(SettingsError, match="cannot read config file") as info:
        load_settings(missing, environ={})
    assert str(missing) in str(info.value)


def test_load_settings_invalid_toml(tmp_path: Path) -> None:
    """A config file that is not TOML is an error naming the path."""
    config = write_toml(tmp_path, "port = = 1\n")
    with pytest.raises(SettingsError, match="is not valid TOML") as info:
        load_settings(config, environ={})
    assert str(config) in str(info.value)


def test_settings_assignment_is_validated() -> None:
    """Assigning a bad value to a live Settings raises instead of storing it."""
    settings = Settings()
    with pytest.raises(ValueError, match="max_concurrent_runs"):
        settings.max_concurrent_runs = -1
    assert settings.max_concurrent_runs == 10


# -- the CLI parser --------------------------------------------------------------------


@pytest.fixture
def no_serve(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace the server with a recorder, so no test can start one."""
    served: list[Settings] = []

    async def fake_serve(settings: Settings) -> int:
        served.append(settings)
        return 0

    monkeypatch.setattr(app.cli, "serve", fake_serve)
    return served


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        pytest.param(["--max-concurrent-runs", "-3"], "max_concurrent_runs", id="negative-runs"),
        pytest.param(["--port", "70000"], "port", id="port-too-large"),
        pytest.param(["--log-level", "loud"], "log_level", id="log-level"),
        pytest.param(["--host", "0.0.0.0"], "not a loopback address", id="host-any"),
        pytest.param(["--host", "192.168.1.10"], "not a loopback address", id="host-lan"),
        pytest.param(["--host", "example.com"], "not a loopback address", id="host-name"),
        pytest.param(["--config", "/nonexistent/t.toml"], "cannot read config", id="no-config"),
    ],
)
def test_cli_main_refuses_bad_settings(
    no_serve: list[Settings], capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    """Bad flags exit with code 2 and a stderr message naming the problem; nothing is served."""
    assert app.cli.main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("trellis: bad settings: ")
    assert named in err
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


def test_load_settings_environ_sets_a_table_key() -> None:
    """TRELLIS_LLM__MODEL sets [llm] model; an unknown table key is an error naming it."""
    settings = load_settings(
        environ={"TRELLIS_LLM__MODEL": "gpt-x", "TRELLIS_LLM__MAX_RETRIES": "2"}
    )
    assert (settings.llm.model, settings.llm.max_retries) == ("gpt-x", 2)
    with pytest.raises(SettingsError, match=r"llm\.colour: unknown setting"):
        load_settings(environ={"TRELLIS_LLM__COLOUR": "red"})
