"""Settings: one validated record, read from defaults < TOML file < environment < CLI flags.

Every setting is documented in ``config/default.toml``; a test keeps that file and the
defaults below equal. Unknown keys are errors wherever they come from (a TOML key, a
``TRELLIS_*`` environment variable, a keyword argument), so a typo stops start-up with a
message naming the key instead of being silently ignored.

Errors:
    :class:`SettingsError` (a ``ValueError``) with one line per offending key.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "TRELLIS_"
CONFIG_ENV_VAR = "TRELLIS_CONFIG"


class SettingsError(ValueError):
    """A setting is unknown or has a bad value; the message names every offending key."""


class LLMSettings(BaseModel):
    """Server-side defaults of the ``llm`` agent kind (the ``[llm]`` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field("http://127.0.0.1:8080/v1", pattern=r"^https?://")
    model: str = Field("default", min_length=1)
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_retries: int = Field(4, ge=0, le=20)
    request_timeout_seconds: float = Field(120.0, gt=0, le=3600)
    connect_timeout_seconds: float = Field(10.0, gt=0, le=600)
    backoff_base_seconds: float = Field(0.5, ge=0, le=60)
    backoff_max_seconds: float = Field(30.0, ge=0, le=3600)


class Settings(BaseModel):
    """Everything the server, the supervisor and the store can be tuned with.

    ``Settings(...)`` takes only what it is given; :func:`load_settings` is the one place
    that reads files and the environment, in the documented order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    data_dir: Path = Field(Path("./data"), description="Directory holding trellis.sqlite3.")

    max_concurrent_runs: int = Field(10, ge=0, le=10_000)
    max_queued_runs: int = Field(1000, ge=0, le=1_000_000)
    io_threads: int = Field(8, ge=1, le=256)
    tool_threads: int = Field(16, ge=1, le=1024)

    workspaces_dir: Path = Field(
        Path("workspaces"), description="Conversation workspaces; relative to data_dir."
    )
    command_timeout_seconds: float = Field(120.0, gt=0, le=86_400)
    max_command_timeout_seconds: float = Field(600.0, gt=0, le=86_400)
    max_tool_output_bytes: int = Field(32_768, ge=1024, le=16 * 1024 * 1024)
    command_env_passthrough: list[str] = Field(
        default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TERM", "TZ", "TMPDIR"],
        description="Environment variables the terminal tool's commands inherit.",
    )

    max_iterations: int = Field(100, ge=1, le=1_000_000)
    queue_full_retry_after_seconds: int = Field(5, ge=1, le=3600)
    shutdown_grace_seconds: float = Field(10.0, gt=0, le=3600)
    resume_on_start: bool = False
    max_request_bytes: int = Field(1_048_576, ge=1024, le=1 << 30)
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    llm: LLMSettings = Field(default_factory=LLMSettings)

    @property
    def database_path(self) -> Path:
        """The one SQLite file that holds conversations, runs and events."""
        return self.data_dir / "trellis.sqlite3"

    @property
    def workspaces_path(self) -> Path:
        """The directory holding one workspace directory per conversation (or name)."""
        return self.data_dir / self.workspaces_dir  # an absolute workspaces_dir wins


def load_settings(
    config_file: str | Path | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from a TOML file, ``TRELLIS_*`` variables and overrides.

    ``config_file`` defaults to ``$TRELLIS_CONFIG`` when that is set. ``overrides`` (the CLI
    flags) win over the environment, which wins over the file.

    Errors:
        :class:`SettingsError` naming each unknown key or bad value.
    """
    environ = dict(os.environ if environ is None else environ)
    if config_file is None:
        config_file = environ.get(CONFIG_ENV_VAR)
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_read_toml(Path(config_file)))
    values.update(_read_environ(environ))
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def _read_environ(environ: dict[str, str]) -> dict[str, Any]:
    known = set(Settings.model_fields)
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV_VAR:
            continue
        key = name.removeprefix(ENV_PREFIX).lower()
        table, _, sub_key = key.partition("__")  # TRELLIS_LLM__MODEL → [llm] model
        if sub_key and table in known:
            values.setdefault(table, {})[sub_key] = value
        elif key in known:
            # A list setting takes a JSON array: TRELLIS_COMMAND_ENV_PASSTHROUGH='["PATH"]'.
            values[key] = _json_array_or_text(value)
        else:
            unknown.append(name)
    if unknown:
        raise SettingsError(
            "; ".join(f"{name}: unknown setting (see config/default.toml)" for name in unknown)
        )
    return values


def _json_array_or_text(value: str) -> Any:
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # left as text: validation names the setting
    return value


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        message = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"{key}: {message}")
    return "; ".join(lines)
