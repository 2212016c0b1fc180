"""A client generated from /openapi.json (openapi-python-client) drives a real server.

The document is fetched from a real Hypercorn server (127.0.0.1, port 0, API keys on), a
client package is generated from it into ``tmp_path`` and imported, and the typed client
creates a conversation with a script agent (the body's ``agent`` is the generated
``ScriptSpec`` class: the spec union of the document), waits for its run and reads its
events as the generated payload classes. The generated client is synchronous (httpx), so
its calls run in a thread while Trio serves.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from app.settings import ApiKeySetting, Settings
from tests.live import live_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PACKAGE = "trellis_generated_client"
KEY = "client-test-key-0123456789"
GENERATOR = Path(sys.executable).parent / "openapi-python-client"


async def test_generated_client_creates_a_conversation_and_reads_typed_events(
    tmp_path: Path,
) -> None:
    """Generate, import, create (script agent, run=true), wait, and read typed events."""
    settings = Settings(
        data_dir=tmp_path / "data", api_keys=[ApiKeySetting(key=KEY, tenant="t1", admin=False)]
    )
    async with live_server(settings) as server:
        document = await server.client.get("/openapi.json")
        assert document.status_code == 200
        (tmp_path / "openapi.json").write_bytes(document.content)
        await _generate(tmp_path / "openapi.json", tmp_path / "out")
        base_url = str(server.client.base_url).rstrip("/")
        with _imported(tmp_path / "out") as modules:
            texts = await trio.to_thread.run_sync(_converse, modules, base_url)
    assert texts == ["hi", "done"]  # say, then finish's message


async def _generate(document: Path, out: Path) -> None:
    """Run the generator (no post-hooks: formatting the code is not needed to import it)."""
    config = out.parent / "generator.yaml"
    config.write_text(f"project_name_override: {PACKAGE}\npackage_name_override: {PACKAGE}\n"
                      "post_hooks: []\n")  # fmt: skip
    command = [GENERATOR, "generate", "--path", document, "--meta", "none"]
    command += ["--output-path", out / PACKAGE, "--config", config]
    with trio.fail_after(30):
        result = await trio.run_process(
            command, capture_stdout=True, stderr=subprocess.STDOUT, check=False
        )
    assert result.returncode == 0, result.stdout.decode(errors="replace")


@contextmanager
def _imported(root: Path) -> Iterator[dict[str, ModuleType]]:
    """The generated package's modules this test uses; unimported again afterwards."""
    sys.path.insert(0, str(root))
    names = ["", ".models", ".api.default.create_conversation", ".api.default.wait_run"]
    names += [".api.default.search_events"]
    try:
        yield {name: importlib.import_module(PACKAGE + name) for name in names}
    finally:
        sys.path.remove(str(root))
        for module in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[module]


def _converse(modules: dict[str, ModuleType], base_url: str) -> list[str]:
    """The generated client's calls, typed end to end; the agent's message texts."""
    models: Any = modules[".models"]
    client = modules[""].AuthenticatedClient(
        base_url=base_url, token=KEY, raise_on_unexpected_status=True
    )
    body = models.CreateConversation(
        agent=models.ScriptSpec(
            kind="script", steps=[models.SayStep(say="hi"), models.FinishStep(finish="done")]
        ),
        run=True,
    )
    with client:
        created = modules[".api.default.create_conversation"].sync(client=client, body=body)
        assert isinstance(created, models.ConversationRecord), created
        ended = modules[".api.default.wait_run"].sync(
            created.id, created.run.id, client=client, timeout=10
        )
        assert isinstance(ended, models.RunRecord) and ended.status == models.Status.FINISHED
        page = modules[".api.default.search_events"].sync(created.id, client=client)
    assert isinstance(page, models.EventList)
    assert all(isinstance(event, models.Event) for event in page.items)
    messages = [e.payload for e in page.items if isinstance(e.payload, models.MessagePayload)]
    assert {e.source for e in page.items} >= {models.Source.AGENT}
    return [message.text for message in messages]
