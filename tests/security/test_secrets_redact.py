"""The redaction helpers (``app/redact.py``) that every error path uses, one rule at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from app.agents.providers import Providers
from app.redact import (
    known_secrets,
    mask_url,
    mask_urls,
    redact,
    redact_secrets,
    relative_paths,
    take_secret,
)
from app.settings import LLMSettings, ProviderSettings
from app.testing_llm import FakeChatServer, text_reply

WORKSPACE = Path("/srv/trellis/data/workspaces/by-id/c1")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("http://u:pw@host:8080/v1", "http://u:***@host:8080/v1", id="password"),
        pytest.param("https://:pw@host/v1", "https://:***@host/v1", id="empty-user"),
        pytest.param("http://u:p@ss@host/v1", "http://u:***@host/v1", id="at-in-password"),
        pytest.param("https://token@host/v1", "https://token@host/v1", id="no-password"),
        pytest.param("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1", id="plain"),
    ],
)
def test_secrets_mask_url_hides_only_the_password(url: str, shown: str) -> None:
    """A URL's password becomes ***; user, host, port and path stay readable."""
    assert mask_url(url) == shown


def test_secrets_mask_urls_masks_every_url_in_a_message() -> None:
    """Free text with several URLs has each password masked, the rest left as it was."""
    text = "cannot reach http://a:1@x/v1 (was 'https://b:2@y/v1'); see http://z/docs"
    assert (
        mask_urls(text)
        == "cannot reach http://a:***@x/v1 (was 'https://b:***@y/v1'); see http://z/docs"
    )


def test_secrets_redact_secrets_hides_longest_first_and_skips_short_values() -> None:
    """A secret containing another is hidden whole; empty, None and short values are left."""
    text = "sk-abcdef123 and sk-abcdef12345 and ab"
    hidden = redact_secrets(text, ["sk-abcdef123", "sk-abcdef12345", None, "", "ab"])
    assert hidden == "*** and *** and ab"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param(f"{WORKSPACE}/src/a.py", "src/a.py", id="inside"),
        pytest.param(
            f"[Errno 2] No such file: '{WORKSPACE}/b'", "[Errno 2] No such file: 'b'", id="quoted"
        ),
        pytest.param(f"cannot list {WORKSPACE}: busy", "cannot list .: busy", id="root"),
        pytest.param(f"{WORKSPACE}/", ".", id="root-slash"),
        pytest.param(f"{WORKSPACE}x/secret", f"{WORKSPACE}x/secret", id="sibling-prefix"),
    ],
)
def test_secrets_relative_paths_makes_paths_workspace_relative(text: str, shown: str) -> None:
    """The workspace's absolute path disappears from a message; a sibling that merely
    starts with the same characters is not mistaken for it."""
    assert relative_paths(text, WORKSPACE) == shown


def test_secrets_relative_paths_knows_the_resolved_form(tmp_path: Path) -> None:
    """A workspace reached through a symlink is hidden in both spellings."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    text = f"{tmp_path / 'link'}/a and {real}/b"
    assert relative_paths(text, tmp_path / "link") == "a and b"


def test_secrets_take_secret_moves_the_value_out_of_the_environment() -> None:
    """The first take removes the variable; later takes answer from memory; redact()
    then hides the value in any text."""
    environ = {"TRELLIS_TEST_TAKEN": "sk-taken-98765432", "OTHER": "x"}
    assert take_secret("TRELLIS_TEST_TAKEN", environ) == "sk-taken-98765432"
    assert environ == {"OTHER": "x"}
    assert take_secret("TRELLIS_TEST_TAKEN", environ) == "sk-taken-98765432"
    assert "sk-taken-98765432" in known_secrets()
    assert (
        redact(f"echo: sk-taken-98765432 at {WORKSPACE}/f", workspace=WORKSPACE) == "echo: *** at f"
    )
    assert take_secret("TRELLIS_TEST_NEVER_SET", environ) is None


async def test_secrets_providers_take_their_keys_at_build_and_never_share_them() -> None:
    """Building the providers takes each named key out of the environment; a provider
    without api_key_env sends no key (never the [llm] one)."""
    environ = {"TRELLIS_TEST_DEFAULT_KEY": "sk-default-11112222", "PATH": "/bin"}
    with FakeChatServer() as default_fake, FakeChatServer() as local_fake:
        default_fake.add(text_reply("a"))
        local_fake.add(text_reply("b"))
        llm = LLMSettings(
            base_url=default_fake.url,
            api_key_env="TRELLIS_TEST_DEFAULT_KEY",
            providers={"local": ProviderSettings(base_url=local_fake.url)},
        )
        providers = Providers(llm, environ=environ)
        assert environ == {"PATH": "/bin"}
        with trio.fail_after(10):
            for name in (None, "local"):
                await providers.get(name).complete({"model": "m", "messages": []})
            await providers.aclose()
    assert default_fake.requests[0].headers["Authorization"] == "Bearer sk-default-11112222"
    assert "Authorization" not in local_fake.requests[0].headers
    assert "sk-default" not in repr(providers) + repr(providers.get(None))


def test_secrets_take_secret_wipes_the_initial_environment_block() -> None:
    """In a fresh interpreter, taking a variable removes its value from
    /proc/self/environ too (unsetenv alone leaves it there)."""
    code = (
        "from pathlib import Path; from app.redact import take_secret;"
        "take_secret('TRELLIS_TEST_WIPE');"
        "print(b'sk-wipe-me-123456' in Path('/proc/self/environ').read_bytes())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"TRELLIS_TEST_WIPE": "sk-wipe-me-123456", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    assert result.stdout.strip() == "False"
