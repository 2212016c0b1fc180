"""``file_editor`` never reaches a file outside the workspace through a link: a hard link
a command made to an outside file, or a directory swapped for a symlink between the path
check and the open (a command running in parallel can do both).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from app.tools import file_editor
from app.tools.file_editor import FileEditorArguments, edit

COMMANDS: dict[str, dict[str, Any]] = {
    "view": {},
    "create": {"file_text": "pwned\n"},
    "str_replace": {"old_str": "top", "new_str": "pwned"},
    "insert": {"insert_line": 0, "new_str": "pwned"},
}


def arguments(command: str, path: str) -> FileEditorArguments:
    return FileEditorArguments.model_validate(
        {"command": command, "path": path, **COMMANDS[command]}
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the workspace that the tool must neither show nor change."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text("top secret\n")
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_file_editor_refuses_a_hard_link_to_an_outside_file(
    workspace: Path, secret: Path, command: str
) -> None:
    """A file with a second hard link is refused for every command; the outside file is
    neither shown nor changed."""
    os.link(secret, workspace / "link.txt")
    result = edit(workspace, arguments(command, "link.txt"))
    assert result.is_error
    assert "has 2 hard links" in result.content
    assert "top secret" not in result.content
    assert secret.read_text() == "top secret\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_file_editor_never_follows_a_directory_swapped_for_a_symlink(
    workspace: Path, secret: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory replaced by a symlink to the outside right after the path was checked
    (as a parallel command could) is refused, not followed."""
    (workspace / "sub").mkdir()
    (workspace / "sub" / "secret.txt").write_text("top inside\n")
    check = file_editor.resolve_in_workspace

    def check_then_swap(root: Path, path: str, *, allow_root: bool = False) -> Path:
        resolved = check(root, path, allow_root=allow_root)
        (workspace / "sub" / "secret.txt").unlink()
        (workspace / "sub").rmdir()
        (workspace / "sub").symlink_to(secret.parent, target_is_directory=True)
        return resolved

    monkeypatch.setattr(file_editor, "resolve_in_workspace", check_then_swap)
    result = edit(workspace, arguments(command, "sub/secret.txt"))
    assert result.is_error
    assert "symlink" in result.content
    assert "top secret" not in result.content
    assert secret.read_text() == "top secret\n"
