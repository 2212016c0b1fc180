"""Providers are the operator's settings: ``[llm.providers.NAME]`` tables, from TOML or the
environment, merged key by key like every other table."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import SettingsError, load_settings
from tests.test_settings import no_trellis_environ, write_toml  # noqa: F401 - autouse fixture


def test_providers_settings_toml_tables_and_environment_merge_per_key(tmp_path: Path) -> None:
    """A TOML provider table gets one key changed by TRELLIS_LLM__PROVIDERS__NAME__KEY, and
    a provider defined only in the environment is added; [llm] stays the default."""
    config = write_toml(
        tmp_path,
        '[llm]\nmodel = "m0"\n'
        '[llm.providers.openai]\nbase_url = "https://api.openai.com/v1"\n'
        'api_key_env = "OPENAI_API_KEY"\nmodel = "gpt-file"\n',
    )
    environ = {
        "TRELLIS_LLM__PROVIDERS__OPENAI__MODEL": "gpt-env",
        "TRELLIS_LLM__PROVIDERS__LOCAL_GPU__BASE_URL": "http://127.0.0.1:8081/v1",
        "TRELLIS_LLM__PROVIDERS__LOCAL_GPU__MAX_RESPONSE_BYTES": "65536",
    }
    llm = load_settings(config, environ=environ).llm
    assert list(llm.provider_tables()) == ["default", "openai", "local_gpu"]
    openai, local = llm.providers["openai"], llm.providers["local_gpu"]
    assert (openai.base_url, openai.model, openai.api_key_env) == (
        "https://api.openai.com/v1",
        "gpt-env",
        "OPENAI_API_KEY",
    )
    assert (local.base_url, local.max_response_bytes) == ("http://127.0.0.1:8081/v1", 65536)
    assert local.api_key_env is None  # never the [llm] key
    assert llm.model == "m0"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        pytest.param(
            '[llm.providers.default]\nbase_url = "http://x/v1"\n',
            "'default' is the [llm] table itself",
            id="default-name",
        ),
        pytest.param(
            '[llm.providers.a]\nbase_url = "http://x/v1"\ncolour = 1\n',
            "llm.providers.a.colour: unknown setting",
            id="unknown-key",
        ),
        pytest.param('[llm.providers.a]\nmodel = "m"\n', "llm.providers.a.base_url", id="no-url"),
        pytest.param(
            '[llm.providers.a]\nbase_url = "http://x/v1"\nmax_response_bytes = 1\n',
            "llm.providers.a.max_response_bytes",
            id="tiny-limit",
        ),
    ],
)
def test_providers_settings_mistakes_name_the_provider_table(
    tmp_path: Path, toml: str, message: str
) -> None:
    """A bad provider table stops start-up with a message naming the table and key."""
    with pytest.raises(SettingsError) as raised:
        load_settings(write_toml(tmp_path, toml), environ={})
    assert message in str(raised.value)


def test_providers_settings_environment_only_provider_without_url_names_its_variable() -> None:
    """A provider set only by a variable that lacks BASE_URL is an error naming that
    variable, so the operator knows where the table came from."""
    environ = {"TRELLIS_LLM__PROVIDERS__GPU__MODEL": "m"}
    with pytest.raises(SettingsError) as raised:
        load_settings(environ=environ)
    assert "llm.providers.gpu.base_url" in str(raised.value)
    assert "TRELLIS_LLM__PROVIDERS__GPU__MODEL" in str(raised.value)
