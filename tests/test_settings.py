"""Settings (``app/settings.py``, ``app/settings_sources.py``): sources, merge, messages."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from app.settings import (
    LLMSettings,
    Settings,
    SettingsError,
    UnknownSettingWarning,
    load_settings,
    resolve_settings,
)

DEFAULT_TOML = Path(__file__).resolve().parent.parent / "config" / "default.toml"
FIELDS = list(Settings.model_fields)
SECRET = "sk-do-not-print-me"


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


def test_settings_every_field_has_a_description() -> None:
    """Every setting, [llm] included, has a description (shown by `serve --help`)."""
    fields = [*Settings.model_fields.items(), *LLMSettings.model_fields.items()]
    assert [name for name, field in fields if not field.description] == []


# -- precedence and merging ------------------------------------------------------------


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


def test_load_settings_environ_merges_into_the_toml_table(tmp_path: Path) -> None:
    """TRELLIS_LLM__MODEL changes [llm] model and keeps the file's other [llm] keys."""
    config = write_toml(
        tmp_path, '[llm]\nbase_url = "http://10.0.0.1:9/v1"\nmodel = "file"\nmax_retries = 1\n'
    )
    settings = load_settings(config, environ={"TRELLIS_LLM__MODEL": "env"})
    assert settings.llm.base_url == "http://10.0.0.1:9/v1"
    assert (settings.llm.model, settings.llm.max_retries) == ("env", 1)
    assert settings.llm.api_key_env == "OPENAI_API_KEY"  # neither source: the default


def test_load_settings_overrides_merge_per_table_key(tmp_path: Path) -> None:
    """An override of one [llm] key (a dict or a model) keeps the keys set by lower sources."""
    config = write_toml(tmp_path, '[llm]\nbase_url = "http://10.0.0.1:9/v1"\n')
    environ = {"TRELLIS_LLM__MAX_RETRIES": "2"}
    from_dict = load_settings(config, environ=environ, llm={"model": "flag", "api_key_env": None})
    from_model = load_settings(config, environ=environ, llm=LLMSettings(model="flag"))
    for settings in (from_dict, from_model):
        assert settings.llm.base_url == "http://10.0.0.1:9/v1"
        assert (settings.llm.model, settings.llm.max_retries) == ("flag", 2)


def test_load_settings_environ_values_are_converted() -> None:
    """String environment values become the field's type; a list takes a JSON array."""
    environ = {
        "TRELLIS_RESUME_ON_START": "true",
        "TRELLIS_SHUTDOWN_GRACE_SECONDS": "2.5",
        "TRELLIS_DATA_DIR": "/tmp/trellis-data",
        "TRELLIS_COMMAND_ENV_PASSTHROUGH": '["PATH", "LANG"]',
    }
    settings = load_settings(environ=environ)
    assert settings.resume_on_start is True
    assert settings.shutdown_grace_seconds == 2.5
    assert settings.database_path == Path("/tmp/trellis-data/trellis.sqlite3")
    assert settings.command_env_passthrough == ["PATH", "LANG"]


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


# -- unknown keys ----------------------------------------------------------------------


def test_load_settings_unknown_toml_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    """A misspelled TOML key, top-level or in a table, is an error naming file and key."""
    config = write_toml(tmp_path, "max_concurent_runs = 3\n[llm]\ncolour = 1\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config, environ={})
    message = str(info.value)
    assert (
        f"config file {config}: max_concurent_runs: unknown setting"
        " (did you mean max_concurrent_runs?)" in message
    )
    assert f"config file {config}: llm.colour: unknown setting" in message


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        pytest.param("TRELLIS_MAX_CONCURENT_RUNS", "TRELLIS_MAX_CONCURRENT_RUNS", id="near-miss"),
        pytest.param("TRELLIS_LLM__MODLE", "TRELLIS_LLM__MODEL", id="table-key"),
        pytest.param("TRELLIS_COLOUR", None, id="nothing-close"),
    ],
)
def test_load_settings_unknown_environ_variable_warns(name: str, hint: str | None) -> None:
    """An unknown TRELLIS_* variable is a warning naming it (and the near miss), not an error."""
    environ = {name: "3", "PATH": "/bin", "TRELLISX": "1", "TRELLIS_PORT": "9000"}
    with pytest.warns(UnknownSettingWarning) as caught:
        settings = load_settings(environ=environ)
    assert settings.port == 9000
    [warning] = caught
    assert f"environment variable {name} is not a Trellis setting; ignored" in str(warning.message)
    assert (f"did you mean {hint}?" in str(warning.message)) is (hint is not None)


def test_resolve_settings_never_repeats_a_secret_looking_variable() -> None:
    """An unknown TRELLIS_API_KEY is named in the warning; its value appears nowhere."""
    resolved = resolve_settings(environ={"TRELLIS_API_KEY": SECRET, "TRELLIS_TOKEN": SECRET})
    assert len(resolved.warnings) == 2
    assert "TRELLIS_API_KEY" in " ".join(resolved.warnings)
    assert SECRET not in " ".join(resolved.warnings)
    assert SECRET not in repr(resolved.settings)


def test_load_settings_unknown_override_names_it() -> None:
    """An unknown keyword override is an error naming it as a flag."""
    with pytest.raises(SettingsError, match="--max-concurent-runs 3: unknown setting"):
        load_settings(environ={}, max_concurent_runs=3)


# -- bad values name their source ------------------------------------------------------

BAD_VALUES = [
    pytest.param("max_concurrent_runs", -1, id="max_concurrent_runs-negative"),
    pytest.param("port", 70000, id="port-too-large"),
    pytest.param("io_threads", 0, id="io_threads-zero"),
    pytest.param("shutdown_grace_seconds", 0, id="shutdown_grace_seconds-zero"),
    pytest.param("max_request_bytes", 10, id="max_request_bytes-too-small"),
    pytest.param("log_level", "loud", id="log_level-unknown"),
    pytest.param("log_format", "xml", id="log_format-unknown"),
    pytest.param("port", "abc", id="port-not-a-number"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
@pytest.mark.parametrize("source", ["toml", "environ", "override"])
def test_load_settings_bad_value_names_source_and_key(
    tmp_path: Path, source: str, key: str, value: object
) -> None:
    """A bad value from any source is an error naming where it came from and the key."""
    config, environ, overrides = None, {}, {}
    if source == "toml":
        config = write_toml(tmp_path, f"{key} = {value!r}\n".replace("'", '"'))
        expected = f"config file {config}: {key}: "
    elif source == "environ":
        environ = {f"TRELLIS_{key.upper()}": str(value)}
        expected = f"env TRELLIS_{key.upper()}={str(value)!r}: "
    else:
        overrides = {key: value}
        expected = f"--{key.replace('_', '-')} {value!r}: "
    with pytest.raises(SettingsError) as info:
        load_settings(config, environ=environ, **overrides)
    assert str(info.value).startswith(expected)
    assert isinstance(info.value, ValueError)


def test_load_settings_bad_secret_looking_value_is_not_repeated() -> None:
    """A bad value of a variable whose name looks secret is an error without the value."""
    environ = {"TRELLIS_LLM__API_KEY_ENV": f"{SECRET} !"}
    with pytest.raises(SettingsError) as info:
        load_settings(environ=environ)
    assert str(info.value).startswith("env TRELLIS_LLM__API_KEY_ENV (value not shown): ")
    assert SECRET not in str(info.value)


def test_load_settings_bad_table_key_from_environ_names_the_variable(tmp_path: Path) -> None:
    """A bad [llm] value from the environment names the variable, even over a file's table."""
    config = write_toml(tmp_path, '[llm]\nmodel = "file"\n')
    with pytest.raises(SettingsError, match=r"^env TRELLIS_LLM__MAX_RETRIES='99': "):
        load_settings(config, environ={"TRELLIS_LLM__MAX_RETRIES": "99"})


def test_load_settings_reports_every_bad_value_on_one_line(tmp_path: Path) -> None:
    """Several mistakes from several sources: one line, each named."""
    config = write_toml(tmp_path, "io_threads = 0\n")
    with pytest.raises(SettingsError) as info:
        load_settings(config, environ={"TRELLIS_PORT": "x"}, max_iterations=0)
    message = str(info.value)
    assert "\n" not in message
    for part in (f"config file {config}: io_threads", "env TRELLIS_PORT='x'", "--max-iterations 0"):
        assert part in message


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
