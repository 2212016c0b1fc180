"""Named workspaces belong to their tenant; with bubblewrap, tenants cannot see each other's.

Real HTTP with two tenants' keys; commands run by the terminal tool of a script agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from app.settings import Settings
from tests.live import live_server
from tests.security.test_auth_tenants import ALICE, BOB, KEYS, client_of
from tests.security.test_sandbox_confinement import requires_bwrap, run_commands

pytestmark = pytest.mark.timeout(60)


def tenant_settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_keys=KEYS, **fields)


async def test_two_tenants_naming_the_same_workspace_get_two_directories(
    tmp_path: Path,
) -> None:
    """Alice and Bob both create conversations with workspace 'shared': each sees only its
    own files (tenants/<tenant>/shared), a second conversation of the same tenant shares
    its tenant's directory, and deleting Bob's with delete_workspace leaves Alice's."""
    settings = tenant_settings(tmp_path, sandbox="none")
    with trio.fail_after(45):
        async with (
            live_server(settings) as server,
            client_of(server, ALICE) as alice,
            client_of(server, BOB) as bob,
        ):
            await run_commands(alice, "echo alice-secret > a.txt", workspace="shared")
            bobs, (seen,) = await run_commands(
                bob, "cat a.txt; echo bob > b.txt", workspace="shared"
            )
            assert "alice-secret" not in seen and "No such file" in seen
            _, (again,) = await run_commands(alice, "cat a.txt", workspace="shared")
            assert "alice-secret" in again
            deleted = await bob.delete(
                f"/api/conversations/{bobs['id']}", params={"delete_workspace": "true"}
            )
            assert deleted.status_code == 204, deleted.text
    root = settings.workspaces_path
    assert (root / "tenants" / "alice" / "shared" / "a.txt").read_text() == "alice-secret\n"
    assert not (root / "tenants" / "bob" / "shared").exists()
    assert not (root / "named" / "shared").exists()


async def test_default_tenant_keeps_the_named_layout(tmp_path: Path) -> None:
    """Without keys (tenant 'default') a named workspace stays named/<name>, as before."""
    settings = Settings(data_dir=tmp_path / "data", sandbox="none")
    with trio.fail_after(45):
        async with live_server(settings) as server:
            await run_commands(server.client, "echo x > f.txt", workspace="w")
    assert (settings.workspaces_path / "named" / "w" / "f.txt").read_text() == "x\n"


@requires_bwrap
async def test_bwrap_hides_another_tenants_workspaces(tmp_path: Path) -> None:
    """In the bubblewrap sandbox, Alice's command cannot read Bob's file by its absolute
    path, and the tenants directory shows it no Bob; the file is there on the host."""
    settings = tenant_settings(tmp_path, sandbox="bwrap")
    theirs = settings.workspaces_path / "tenants" / "bob" / "w"
    with trio.fail_after(45):
        async with (
            live_server(settings) as server,
            client_of(server, ALICE) as alice,
            client_of(server, BOB) as bob,
        ):
            await run_commands(bob, "echo bob-secret > s.txt", workspace="w")
            _, seen = await run_commands(
                alice,
                f"cat {theirs}/s.txt",
                f"ls {settings.workspaces_path}/tenants",
                workspace="w",
            )
    assert (theirs / "s.txt").read_text() == "bob-secret\n"
    read, listed = seen
    assert "bob-secret" not in read and "No such file" in read
    assert "bob" not in listed.split()  # only the mount point of Alice's own workspace
