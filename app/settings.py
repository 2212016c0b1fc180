"""Settings: one validated record, merged per field from four sources.

The sources, later wins, *per field* (a nested table merges key by key, so
``TRELLIS_LLM__MODEL`` changes the model and keeps the file's ``[llm] base_url``):

1. the defaults below (documented, with comments, in ``config/default.toml``; a test keeps
   that file and these defaults equal);
2. a TOML file (``--config FILE`` or ``$TRELLIS_CONFIG``);
3. environment variables ``TRELLIS_<NAME>``, ``TRELLIS_<TABLE>__<KEY>`` for a table key;
4. the command line (``load_settings``'s keyword overrides).

How each source treats a mistake:

* an unknown key in the TOML file is an error (that file is ours to get right);
* an unknown ``TRELLIS_*`` variable is a warning naming it, with a "did you mean" for a near
  miss: environments are shared with other tools, and a stray variable must not stop a server;
* a bad value from any source is an error naming where it came from
  (``env TRELLIS_PORT='abc': ...``, ``config file x.toml: port: ...``, ``--port 'abc': ...``).

Secrets: a value is never repeated in a message when its name looks secret (contains KEY,
TOKEN, SECRET or PASSWORD). Settings hold no API key: a provider's key is read from the
environment *by name* (``llm.api_key_env``, ``llm.providers.NAME.api_key_env``) once, at
start-up, and removed from it (:func:`app.redact.take_secret`). A password in a provider's
``base_url`` and in ``database_url`` is masked whenever settings are shown as JSON, which
is what lets ``GET /api/server`` show every setting. The one secret setting,
``webhook_secret`` (a key the server signs with, not one it sends), is left out of
``repr`` and shown as ``***``;
so are the clients' API keys (``api_keys``, both ``key`` and ``key_sha256``), and an error in
an entry names the entry's position and field, never its value.

Errors:
    :class:`SettingsError` (a ``ValueError``), one ``; ``-separated line naming every
    offending key and its source.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from app.redact import MASK, mask_url
from app.settings_sources import (
    SettingsError,
    describe_errors,
    environ_layer,
    merge_layers,
    overrides_layer,
    toml_layer,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_PROVIDER",
    "ENV_PREFIX",
    "ApiKeySetting",
    "LLMSettings",
    "ProviderSettings",
    "ResolvedSettings",
    "Settings",
    "SettingsError",
    "UnknownSettingWarning",
    "load_settings",
    "resolve_settings",
]

ENV_PREFIX = "TRELLIS_"
CONFIG_ENV_VAR = "TRELLIS_CONFIG"

LogLevel = Literal["debug", "info", "warning", "error"]
# allowed_origins / allowed_hosts entries: an origin exactly as browsers send it, a host name
# (or IP address) without port.
_ORIGIN = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
_HOST_NAME = r"^[A-Za-z0-9.-]+$|^\[[0-9A-Fa-f:.]+\]$"
# webhook_allowed_urls entries: scheme://host[:port] and, optionally, a path.
_WEBHOOK_PREFIX = r"^https?://[^\s@/?#]+(/[^\s?#]*)?$"
LogFormat = Literal["text", "json"]
#: The smallest ``thread_stack_size_kib`` accepted (threading's own minimum is 32 KiB, but
#: the run thread's deepest realistic work needs 96: below 128 a run could crash the server).
MIN_THREAD_STACK_SIZE_KIB = 128
SandboxSetting = Literal["auto", "bwrap", "none"]


class UnknownSettingWarning(UserWarning):
    """A ``TRELLIS_*`` environment variable names no setting; it was ignored."""


DEFAULT_PROVIDER = "default"
#: A provider's name: a TOML key and part of an environment variable's name.
ProviderName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
# base_url and api_key_env: declared twice (a named provider has no default URL and no key;
# the [llm] table has both), constrained and described once.
_BASE_URL: dict[str, Any] = {
    "pattern": r"^https?://",
    "max_length": 2000,
    "description": "OpenAI-compatible Chat Completions endpoint (ending in /v1).",
}
_API_KEY_ENV: dict[str, Any] = {
    "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$",
    "description": "Name of the environment variable holding the API key (not the key);"
    " read once at start-up and removed from the environment.",
}


class ProviderSettings(BaseModel):
    """One model provider the operator allows (an ``[llm.providers.NAME]`` table).

    Agent specs pick a provider by name and never see its URL or its key: what a request may
    reach, and with which credentials, is the operator's decision alone. A URL's password is
    masked (``***``) wherever settings are shown as JSON (``GET /api/server``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(**_BASE_URL)
    model: str = Field("default", min_length=1, description="Model name sent with requests.")
    api_key_env: str | None = Field(None, **_API_KEY_ENV)
    max_retries: int = Field(
        4, ge=0, le=20, description="Retries of a request after 429, 5xx or a connection error."
    )
    request_timeout_seconds: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Time limit of one model request, whole answer included (not an idle timeout).",
    )
    connect_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Time limit for connecting to the endpoint."
    )
    backoff_base_seconds: float = Field(
        0.5, ge=0, le=60, description="First retry delay; doubles each retry, with jitter."
    )
    backoff_max_seconds: float = Field(
        30.0, ge=0, le=3600, description="Longest retry delay (a Retry-After header wins)."
    )
    step_timeout_seconds: float = Field(
        600.0, gt=0, le=86_400, description="Time limit of one step's request, retries included."
    )
    max_response_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        le=1 << 30,
        description="Largest answer read from the provider; a larger one fails the step.",
    )

    @field_serializer("base_url", when_used="json")
    def _masked_base_url(self, base_url: str) -> str:
        return mask_url(base_url)


class LLMSettings(ProviderSettings):
    """The ``[llm]`` table: the ``default`` provider itself, and the named ones.

    A one-provider set-up stays one table; more providers are ``[llm.providers.NAME]``
    tables with the same keys (``base_url`` required; no key unless ``api_key_env`` is
    given; any other key left out takes its documented default, not the ``[llm]`` value).
    """

    base_url: str = Field("http://127.0.0.1:8080/v1", **_BASE_URL)
    api_key_env: str | None = Field("OPENAI_API_KEY", **_API_KEY_ENV)
    providers: dict[ProviderName, ProviderSettings] = Field(
        default_factory=dict,
        description="More providers, by name ([llm.providers.NAME] tables); agent specs"
        f' pick one with "provider": "NAME" (none given: {DEFAULT_PROVIDER!r}, this table).',
    )

    @field_validator("providers")
    @classmethod
    def _default_is_this_table(
        cls, providers: dict[str, ProviderSettings]
    ) -> dict[str, ProviderSettings]:
        if DEFAULT_PROVIDER in providers:
            raise ValueError(
                f"{DEFAULT_PROVIDER!r} is the [llm] table itself; give this provider another name"
            )
        return providers

    def provider_tables(self) -> dict[str, ProviderSettings]:
        """Every provider by name: ``default`` (this table) first, then the named ones."""
        return {DEFAULT_PROVIDER: self, **self.providers}


#: A tenant's name: letters, digits, ``_``, ``.``, ``-`` (it appears in paths and logs).
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ApiKeySetting(BaseModel):
    """One API key (an entry of ``api_keys``): the key itself or its SHA-256 (hex), the
    tenant it acts for, and whether it is an admin key. Both forms are masked (``***``)
    wherever settings are shown as JSON, and left out of ``repr``; a bad entry's error names
    the field, never the value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(
        None, repr=False, min_length=16, max_length=1024, description="The key (16+ chars)."
    )
    key_sha256: str | None = Field(
        None,
        repr=False,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="SHA-256 of the key, hex: the key itself stays out of the settings.",
    )
    tenant: str = Field(pattern=TENANT_PATTERN, description="The tenant the key acts for.")
    admin: bool = Field(False, description="Acts across tenants; reads /api/server details.")

    @model_validator(mode="after")
    def _one_form(self) -> ApiKeySetting:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        return self

    @field_serializer("key", "key_sha256", when_used="json")
    def _masked(self, value: str | None) -> str | None:
        return None if value is None else MASK

    def digest(self) -> bytes:
        """The SHA-256 of the key (what requests are compared against)."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).digest()


class Settings(BaseModel):
    """Everything the server, the supervisor and the store can be tuned with.

    ``Settings(...)`` takes only what it is given and reads nothing; :func:`load_settings`
    is the one place that reads files and the environment, in the documented order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        "127.0.0.1",
        description="Interface to bind; a non-loopback one needs api_keys (or insecure_no_auth).",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    data_dir: Path = Field(
        Path("./data"),
        description="Directory holding the SQLite database (when no database_url) and the"
        " workspaces; one server at a time.",
    )
    database_url: str = Field(
        "",
        max_length=2048,
        pattern=r"^(postgres(ql)?://.*)?$",
        repr=False,
        description="postgresql://user:password@host:port/db: the store on PostgreSQL, shared"
        " by several nodes; empty: SQLite in data_dir. Shown with its password masked.",
    )
    node_lease_seconds: float = Field(
        10.0,
        ge=0.1,
        le=3600,
        description="With database_url: a node that has not heartbeaten for this long is"
        " dead, and another node records its runs paused (crash_recovery). Nodes heartbeat"
        " every third of it.",
    )

    max_concurrent_runs: int = Field(
        10, ge=0, le=10_000, description="Run slots: runs executing at once; 0 holds the line."
    )
    max_queued_runs: int = Field(
        1000, ge=0, le=1_000_000, description="Runs allowed to wait for a run slot."
    )
    io_threads: int = Field(
        8, ge=1, le=256, description="Worker threads for store I/O done for HTTP handlers."
    )
    tool_threads: int = Field(
        16, ge=1, le=1024, description="Worker threads for tool calls, server-wide."
    )
    # 1024: the deepest realistic run-thread work measured (pydantic validating and
    # serializing a value nested json_limits.MAX_DEPTH = 64 deep) needs 96 KiB, the whole llm,
    # streaming, tool and store test suites pass at 32 KiB; 1 MiB is ~10x that and turns the
    # common runaway recursions into a RecursionError (not a crash of the whole server).
    # Resident memory is the pages touched (20-34 KiB a run thread), whatever the size.
    thread_stack_size_kib: int = Field(
        1024,
        ge=0,
        le=1024 * 1024,
        multiple_of=4,
        description="Stack size (KiB) of every worker thread (run, io and tool threads);"
        " 0: the platform's default (ulimit -s). Process-global; see app/threads.py.",
    )

    workspaces_dir: Path = Field(
        Path("workspaces"), description="Conversation workspaces; relative to data_dir."
    )
    command_timeout_seconds: float = Field(
        120.0, gt=0, le=86_400, description="Default time limit of one terminal command."
    )
    max_command_timeout_seconds: float = Field(
        600.0, gt=0, le=86_400, description="Largest time limit a terminal command may ask for."
    )
    max_tool_output_bytes: int = Field(
        32_768,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Command output kept for the model (head and tail).",
    )
    command_env_passthrough: list[str] = Field(
        default_factory=lambda: ["PATH", "HOME", "LANG", "LC_ALL", "TERM", "TZ", "TMPDIR"],
        description="Environment variables the terminal tool's commands inherit.",
    )
    sandbox: SandboxSetting = Field(
        "auto",
        description="Confine terminal commands: bwrap (bubblewrap), none, or auto (bwrap when"
        " it works on this host, else none with a warning).",
    )
    sandbox_network: bool = Field(
        True, description="Commands in the bwrap sandbox may use the network (false: none)."
    )

    max_iterations: int = Field(
        100, ge=1, le=1_000_000, description="Default step limit of one run."
    )
    queue_full_retry_after_seconds: int = Field(
        5, ge=1, le=3600, description="Retry-After (seconds) sent with 429 run_queue_full."
    )
    shutdown_grace_seconds: float = Field(
        10.0, gt=0, le=3600, description="On SIGTERM, how long run threads get to stop."
    )
    resume_on_start: bool = Field(
        False, description="Re-queue runs a crash interrupted, instead of pausing them."
    )
    naive_mode: bool = Field(
        False,
        description="For benchmarks and teaching only: runs and short I/O share Trio's"
        " default thread limiter, with no run slots and no line (the design Trellis replaces).",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, le=1 << 30, description="Largest accepted request body (bytes)."
    )
    max_agent_spec_bytes: int = Field(
        65_536,
        ge=1024,
        le=1 << 30,
        description="Largest agent spec (its JSON, bytes) a conversation may be created with.",
    )
    max_header_bytes: int = Field(
        16_384,
        ge=1024,
        le=1 << 20,
        description="Largest request line plus headers (bytes); beyond: 431, connection closed.",
    )
    keep_alive_timeout_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="A connection without a complete request head for this long (idle,"
        " between requests, or sending its head slowly) is closed.",
    )
    idempotency_key_retention_hours: float = Field(
        24.0,
        gt=0,
        le=87_600,
        description="How long an Idempotency-Key and its first answer are kept; an older key"
        " is a new key.",
    )
    stream_buffer_events: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Events a stream subscriber may fall behind before it is dropped.",
    )
    stream_heartbeat_seconds: float = Field(
        15.0, gt=0, le=3600, description="Idle time after which a stream sends a heartbeat."
    )
    server_stream_retain_events: int = Field(
        10_000,
        ge=0,
        le=10_000_000,
        description="Frames of the server-wide stream kept for clients that resume; one that"
        " missed more gets a snapshot instead.",
    )
    allowed_origins: list[Annotated[str, Field(pattern=_ORIGIN)]] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) of web pages allowed to call the API;"
        " a request with any other Origin header is 403.",
    )
    allowed_hosts: list[Annotated[str, Field(pattern=_HOST_NAME)]] = Field(
        default_factory=list,
        description="Names the Host header may carry besides loopback names and the bound"
        " address (any other is 421: DNS rebinding).",
    )
    webhook_allowed_urls: list[Annotated[str, Field(pattern=_WEBHOOK_PREFIX)]] = Field(
        default_factory=list,
        description="URL prefixes a conversation's webhook URL must start with (at a / ? or"
        " # boundary); empty: webhooks are refused (422).",
    )
    webhook_secret: str = Field(
        "",
        repr=False,
        max_length=1024,
        description="Key of the HMAC-SHA256 Trellis-Signature on webhook POSTs; empty:"
        " webhooks are refused (422). Shown masked; set it with TRELLIS_WEBHOOK_SECRET"
        " (a flag is visible in ps).",
    )
    webhook_max_attempts: int = Field(
        5, ge=1, le=20, description="POSTs per webhook delivery (retries on 5xx, 429, timeouts)."
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="Time limit of one webhook POST, answer included."
    )
    webhook_backoff_base_seconds: float = Field(
        1.0, ge=0, le=60, description="First webhook retry delay; doubles each retry, jittered."
    )
    api_keys: list[ApiKeySetting] = Field(
        default_factory=list,
        description="API keys: objects {key or key_sha256, tenant, admin}; none: open mode"
        " (loopback only). Set them with TRELLIS_API_KEYS (JSON) or api_keys_file.",
    )
    api_keys_file: str = Field(
        "",
        max_length=4096,
        description="A TOML or JSON file with more api_keys, read when the server starts;"
        " empty: none.",
    )
    metrics_require_key: bool = Field(
        False, description="With API keys, GET /metrics needs a key too (false: open)."
    )
    insecure_no_auth: bool = Field(
        False,
        description="Serve a non-loopback address without API keys (anyone reaching it may"
        " run commands); prints a warning.",
    )
    tenant_max_active_runs: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Queued + running runs one tenant may have; 0: no quota. Past it: 429.",
    )
    log_level: LogLevel = Field("info", description="Least severe log level written.")
    log_format: LogFormat = Field(
        "text", description="Log lines on stderr: text for people, json for log shippers."
    )
    llm: LLMSettings = Field(
        default_factory=LLMSettings,
        description="Model providers of the llm agent kind: [llm] is the default one.",
    )

    @field_validator("api_keys")
    @classmethod
    def _distinct_keys(cls, keys: list[ApiKeySetting]) -> list[ApiKeySetting]:
        check_distinct_keys(keys)
        return keys

    @field_validator("thread_stack_size_kib")
    @classmethod
    def _usable_stack_size(cls, kib: int) -> int:
        if 0 < kib < MIN_THREAD_STACK_SIZE_KIB:
            raise ValueError(
                f"must be 0 (the platform's default) or at least {MIN_THREAD_STACK_SIZE_KIB}"
                " KiB: a run thread validating a 64-deep request value needs 96 KiB"
            )
        return kib

    @field_serializer("database_url", when_used="json")
    def _masked_database_url(self, url: str) -> str:
        return mask_url(url)

    @field_serializer("webhook_secret", when_used="json")
    def _masked_webhook_secret(self, secret: str) -> str:
        return MASK if secret else ""

    @property
    def database_path(self) -> Path:
        """The SQLite file that holds conversations, runs and events (no ``database_url``)."""
        return self.data_dir / "trellis.sqlite3"

    @property
    def workspaces_path(self) -> Path:
        """The directory holding one workspace directory per conversation (or name)."""
        return self.data_dir / self.workspaces_dir  # an absolute workspaces_dir wins


def check_distinct_keys(keys: list[ApiKeySetting]) -> None:
    """Refuse a key given twice (in either form); the error names positions, not keys."""
    seen: dict[bytes, int] = {}
    for index, entry in enumerate(keys):
        first = seen.setdefault(entry.digest(), index)
        if first != index:
            raise ValueError(f"entries {first} and {index} are the same key")


@dataclass(frozen=True)
class ResolvedSettings:
    """What :func:`resolve_settings` found: the settings, and warnings to show the operator."""

    settings: Settings
    warnings: list[str]


def resolve_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ResolvedSettings:
    """Merge the four sources into :class:`Settings`; return it with the warnings found.

    ``environ`` defaults to ``os.environ``; ``config_file`` to ``$TRELLIS_CONFIG`` when that
    is set. ``overrides`` are the command-line layer (errors name them as flags); a ``None``
    value, at any depth, is no override.

    Errors:
        :class:`SettingsError` naming each unknown key or bad value, and its source.
    """
    environ = os.environ if environ is None else environ
    if config_file is None:
        config_file = environ.get(CONFIG_ENV_VAR)
    layers = []
    if config_file is not None:
        layers.append(toml_layer(Path(config_file)))
    env, notes = environ_layer(environ, Settings, prefix=ENV_PREFIX, skip={CONFIG_ENV_VAR})
    layers += [env, overrides_layer(overrides or {})]
    values, origins = merge_layers(layers)
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, origins, Settings)) from None
    return ResolvedSettings(settings, notes)


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """:func:`resolve_settings` for programs: warnings become :class:`UnknownSettingWarning`.

    ``load_settings(port=0, llm={"model": "m"})`` merges the overrides over the file and the
    environment field by field.

    Errors:
        :class:`SettingsError`, as :func:`resolve_settings`.
    """
    resolved = resolve_settings(config_file, environ, overrides)
    for note in resolved.warnings:
        warnings.warn(note, UnknownSettingWarning, stacklevel=2)
    return resolved.settings
