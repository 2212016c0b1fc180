"""One conversation cannot take over another's workspace: named workspaces live apart from
conversations' own (``named/`` and ``by-id/``), and ``delete_workspace`` removes a named one
only when no other conversation names it. Old data directories are sorted into the two
namespaces once, and old conversations' runs still find their files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from app.settings import Settings
from app.store import NewConversation, SqliteStore
from app.workspaces import LAYOUT_MARKER, migrate_legacy_layout
from tests.conftest import script
from tests.live import live_server
from tests.security.test_sandbox_confinement import run_commands

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", sandbox="none")


async def test_named_workspace_equal_to_another_conversations_id_is_its_own(
    settings: Settings,
) -> None:
    """A workspace named after another conversation's id does not see that conversation's
    files, and deleting it with ``delete_workspace`` leaves them alone."""
    with trio.fail_after(30):
        async with live_server(settings) as server:
            owner, _ = await run_commands(server.client, "echo owner-secret > a.txt")
            intruder, (seen,) = await run_commands(
                server.client, "cat a.txt; echo intruder > b.txt", workspace=owner["id"]
            )
            deleted = await server.client.delete(
                f"/api/conversations/{intruder['id']}", params={"delete_workspace": "true"}
            )
            assert deleted.status_code == 204, deleted.text
    assert "owner-secret" not in seen and "No such file" in seen
    own = settings.workspaces_path / "by-id" / owner["id"]
    assert (own / "a.txt").read_text() == "owner-secret\n"
    assert not (own / "b.txt").exists()


async def test_delete_workspace_keeps_a_named_workspace_another_conversation_names(
    settings: Settings,
) -> None:
    """``delete_workspace`` of a named workspace that another (idle) conversation still
    names deletes the conversation but keeps the files; the last one out removes them."""
    with trio.fail_after(30):
        async with live_server(settings) as server:
            first, _ = await run_commands(server.client, "echo shared > s.txt", workspace="proj")
            second, _ = await run_commands(server.client, "true", workspace="proj")
            for conversation, kept in ((first, True), (second, False)):
                path = f"/api/conversations/{conversation['id']}"
                deleted = await server.client.delete(path, params={"delete_workspace": "true"})
                assert deleted.status_code == 204, deleted.text
                assert (await server.client.get(path)).status_code == 404
                shared = settings.workspaces_path / "named" / "proj" / "s.txt"
                assert shared.exists() is kept


def old_conversation(store: SqliteStore, workspace: str | None = None) -> str:
    new = NewConversation(agent=script(), title=None, max_iterations=10, workspace=workspace)
    conversation, _ = store.create_conversation(new)
    return conversation.id


def old_workspace(root: Path, name: str, text: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "f.txt").write_text(text)


def test_legacy_workspaces_are_sorted_into_namespaces_once(
    settings: Settings, store: SqliteStore
) -> None:
    """Old ``workspaces/<id or name>`` directories move to ``by-id/`` or ``named/``; one
    an id and a name shared is copied to both; names ``by-id`` and ``named`` do not clash;
    a directory of no conversation stays in ``.legacy``; a second start changes nothing."""
    root = settings.workspaces_path
    own = old_conversation(store)
    old_conversation(store, "proj")
    shared_id = old_conversation(store)
    old_conversation(store, shared_id)  # the old layout let a name equal another's id
    old_conversation(store, "named")
    old_conversation(store, "by-id")
    for name in (own, "proj", shared_id, "named", "by-id", "orphan"):
        old_workspace(root, name, f"{name} file")

    migrate_legacy_layout(root, store)
    migrate_legacy_layout(root, store)  # once: the marker says the layout is current

    assert (root / LAYOUT_MARKER).exists()
    assert (root / "by-id" / own / "f.txt").read_text() == f"{own} file"
    assert (root / "named" / "proj" / "f.txt").read_text() == "proj file"
    assert (root / "by-id" / shared_id / "f.txt").read_text() == f"{shared_id} file"
    assert (root / "named" / shared_id / "f.txt").read_text() == f"{shared_id} file"
    assert (root / "named" / "named" / "f.txt").read_text() == "named file"
    assert (root / "named" / "by-id" / "f.txt").read_text() == "by-id file"
    assert (root / ".legacy" / "orphan" / "f.txt").read_text() == "orphan file"
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".layout-v2", ".legacy", "by-id", "named"]
    )


async def test_old_conversations_runs_find_their_files_after_the_upgrade(
    settings: Settings,
) -> None:
    """A conversation created before the namespaces existed runs, after a restart, in
    its old files, which now live in ``by-id/``."""
    root = settings.workspaces_path
    store = SqliteStore(settings.database_path)
    try:
        steps = script({"tool": "terminal", "args": {"command": "cat f.txt"}})
        new = NewConversation(agent=steps, title=None, max_iterations=10)
        conversation, _ = store.create_conversation(new)
    finally:
        store.close()
    old_workspace(root, conversation.id, "written before the upgrade")
    with trio.fail_after(30):
        async with live_server(settings) as server:
            path = f"/api/conversations/{conversation.id}"
            run = (await server.client.post(f"{path}/runs", json={})).json()
            ended = await server.client.get(f"{path}/runs/{run['id']}/wait")
            assert ended.json()["status"] == "finished", ended.text
            events = await server.client.get(f"{path}/events", params={"kind": "observation"})
    (observation,) = events.json()["items"]
    assert observation["payload"]["content"] == "written before the upgrade\n[exit code 0]"
    assert not (root / conversation.id).exists()
    assert (root / "by-id" / conversation.id / "f.txt").read_text() == "written before the upgrade"
