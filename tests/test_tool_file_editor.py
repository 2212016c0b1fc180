"""The ``file_editor`` tool: every command and its errors, on real files in ``tmp_path``."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import ValidationError

from app.tools import file_editor
from app.tools.base import TOOL_WORKER_THREADS, Tool, ToolEnvironment, ToolResult
from app.tools.calls import ToolCall, default_tools, execute_one
from app.tools.file_editor import (
    FileEditorArguments,
    FileEditorTool,
    PathEscape,
    edit,
    resolve_in_workspace,
)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """The workspace is a subdirectory, so that "outside" exists and can be checked."""
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the workspace that no command may read or change."""
    path = tmp_path / "secret.txt"
    path.write_text("top secret\n")
    return path


def run(workspace: Path, **arguments: Any) -> ToolResult:
    return edit(workspace, FileEditorArguments(**arguments))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


FIVE_LINES = "one\ntwo\nthree\nfour\nfive\n"


# --- view ---------------------------------------------------------------------------------


def test_file_editor_view_numbers_lines_like_cat_n(workspace: Path) -> None:
    """Viewing a file shows every line numbered, cat -n style, under a header."""
    write(workspace / "src" / "a.txt", "alpha\nbeta\n")
    result = run(workspace, command="view", path="src/a.txt")
    assert not result.is_error
    assert result.content == "src/a.txt, lines 1-2 of 2:\n     1\talpha\n     2\tbeta\n"
    assert result.data == {"path": "src/a.txt", "command": "view"}


@pytest.mark.parametrize(
    ("view_range", "numbers"),
    [
        pytest.param([2, 3], [2, 3], id="middle"),
        pytest.param([4, -1], [4, 5], id="to-the-end"),
        pytest.param([5, 5], [5], id="one-line"),
    ],
)
def test_file_editor_view_honours_view_range(
    workspace: Path, view_range: list[int], numbers: list[int]
) -> None:
    """view_range selects 1-based inclusive lines; end -1 means to the end of the file."""
    write(workspace / "f.txt", FIVE_LINES)
    result = run(workspace, command="view", path="f.txt", view_range=view_range)
    rows = result.content.splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == numbers
    assert rows[0].endswith(FIVE_LINES.splitlines()[numbers[0] - 1])


@pytest.mark.parametrize(
    "view_range",
    [pytest.param([6, -1], id="start-past-end"), pytest.param([2, 9], id="end-past-end")],
)
def test_file_editor_view_range_past_the_end_is_an_error(
    workspace: Path, view_range: list[int]
) -> None:
    """A range beyond the last line is refused, telling how many lines the file has."""
    write(workspace / "f.txt", FIVE_LINES)
    result = run(workspace, command="view", path="f.txt", view_range=view_range)
    assert result.is_error
    assert "has 5 lines" in result.content


def test_file_editor_view_empty_file(workspace: Path) -> None:
    """An empty file is reported as empty, not as an error."""
    write(workspace / "empty.txt", "")
    result = run(workspace, command="view", path="empty.txt")
    assert (result.is_error, result.content) == (False, "empty.txt is empty")


def test_file_editor_view_truncates_past_max_view_chars(workspace: Path) -> None:
    """Past max_view_chars only whole lines are kept, and a marker says where to resume."""
    write(workspace / "long.txt", "".join(f"line {n}\n" for n in range(1, 101)))
    args = FileEditorArguments(command="view", path="long.txt")
    result = edit(workspace, args, max_view_chars=60)
    rows = result.content.splitlines()
    assert rows[1:5] == [f"{n:6}\tline {n}" for n in range(1, 5)]
    assert rows[5] == "[... truncated at 60 characters; view_range=[5, -1]]"
    assert len(rows) == 6


def test_file_editor_view_truncates_a_single_huge_line(workspace: Path) -> None:
    """A line longer than the limit is shown cut, and the marker points past it."""
    write(workspace / "huge.txt", "x" * 1000 + "\nnext\n")
    args = FileEditorArguments(command="view", path="huge.txt")
    rows = edit(workspace, args, max_view_chars=50).content.splitlines()
    assert rows[1] == ("     1\t" + "x" * 1000)[:50]
    assert rows[2] == "[... truncated at 50 characters; view_range=[2, -1]]"


def test_file_editor_view_lists_a_directory_two_levels_deep(workspace: Path) -> None:
    """A directory lists two levels, sorted, hidden entries skipped, symlinks not followed."""
    write(workspace / "b.txt", "")
    write(workspace / "a" / "one.py", "")
    write(workspace / "a" / "deep" / "three.py", "")
    write(workspace / ".git" / "config", "")
    write(workspace / "a" / ".hidden", "")
    (workspace / "link").symlink_to(workspace / "a", target_is_directory=True)
    result = run(workspace, command="view", path=".")
    assert result.content == (
        "./ (2 levels, hidden entries skipped):\na/\na/deep/\na/one.py\nb.txt\nlink@\n"
    )
    assert result.data == {"path": ".", "command": "view"}


def test_file_editor_view_empty_directory(workspace: Path) -> None:
    """An empty directory is listed as empty."""
    (workspace / "empty").mkdir()
    result = run(workspace, command="view", path="empty")
    assert result.content == "empty/ (2 levels, hidden entries skipped):\n(empty)\n"


def test_file_editor_view_truncates_a_long_listing(workspace: Path) -> None:
    """A listing past max_view_chars is cut at a whole entry, with a marker."""
    for n in range(100):
        write(workspace / f"file{n:03}.txt", "")
    args = FileEditorArguments(command="view", path=".")
    rows = edit(workspace, args, max_view_chars=40).content.splitlines()
    assert rows[1:4] == ["file000.txt", "file001.txt", "file002.txt"]
    assert rows[4] == "[... listing truncated; view a subdirectory]"


@pytest.mark.parametrize(
    ("setup", "path", "message"),
    [
        pytest.param(None, "missing.txt", "missing.txt does not exist", id="missing"),
        pytest.param(b"\xff\xfe\x00bin", "bin.dat", "not UTF-8 text", id="not-utf8"),
        pytest.param(b"text\x00more", "nul.txt", "not UTF-8 text", id="nul-bytes"),
        pytest.param("dir", "sub", "view_range applies to files only", id="dir-with-range"),
    ],
)
def test_file_editor_view_errors(
    workspace: Path, setup: bytes | str | None, path: str, message: str
) -> None:
    """A missing file, binary content, or a range on a directory is an error result."""
    if isinstance(setup, bytes):
        (workspace / path).write_bytes(setup)
    elif setup == "dir":
        (workspace / path).mkdir()
    result = run(workspace, command="view", path=path, view_range=[1, -1])
    assert result.is_error
    assert message in result.content
    assert result.data == {"path": path, "command": "view"}


def test_file_editor_view_refuses_a_fifo_without_hanging(workspace: Path) -> None:
    """A named pipe is not a regular file: refused at once instead of waiting for a writer."""
    os.mkfifo(workspace / "pipe")
    result = run(workspace, command="view", path="pipe")
    assert result.is_error
    assert "not a regular file" in result.content


# --- create -------------------------------------------------------------------------------


def test_file_editor_create_makes_parent_directories(workspace: Path) -> None:
    """create writes the file exactly, making its parent directories, and says "created"."""
    result = run(workspace, command="create", path="new/dir/f.txt", file_text="a\r\nb")
    assert not result.is_error
    assert result.content == "created new/dir/f.txt (2 lines)"
    assert (workspace / "new" / "dir" / "f.txt").read_bytes() == b"a\r\nb"
    assert result.data == {"path": "new/dir/f.txt", "command": "create", "overwrote": False}


def test_file_editor_create_overwrites_and_says_so(workspace: Path) -> None:
    """create over an existing file replaces its content and says "overwrote"."""
    write(workspace / "f.txt", "old content that is longer\n")
    result = run(workspace, command="create", path="f.txt", file_text="new\n")
    assert result.content == "overwrote f.txt (1 lines)"
    assert result.data["overwrote"] is True
    assert (workspace / "f.txt").read_text() == "new\n"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("sub", "failed: Is a directory", id="existing-directory"),
        pytest.param("file.txt/inner.txt", "failed:", id="parent-is-a-file"),
        pytest.param(".", "is the workspace directory itself", id="workspace-itself"),
        pytest.param("sub/..", "is the workspace directory itself", id="workspace-via-dotdot"),
    ],
)
def test_file_editor_create_errors(workspace: Path, path: str, message: str) -> None:
    """create refuses directories, the workspace itself, and a file used as a directory."""
    (workspace / "sub").mkdir()
    write(workspace / "file.txt", "keep\n")
    result = run(workspace, command="create", path=path, file_text="x")
    assert result.is_error
    assert message in result.content
    assert (workspace / "file.txt").read_text() == "keep\n"


# --- str_replace --------------------------------------------------------------------------


def test_file_editor_str_replace_replaces_the_one_match(workspace: Path) -> None:
    """The single occurrence is replaced and the edited lines are shown with context."""
    write(workspace / "f.txt", FIVE_LINES)
    result = run(workspace, command="str_replace", path="f.txt", old_str="two\n", new_str="2\n2b\n")
    assert not result.is_error
    assert (workspace / "f.txt").read_text() == "one\n2\n2b\nthree\nfour\nfive\n"
    assert result.content.startswith("replaced 1 occurrence in f.txt. Lines 1-6 now read:\n")
    assert "     2\t2\n     3\t2b\n" in result.content
    assert result.data == {"path": "f.txt", "command": "str_replace"}


def test_file_editor_str_replace_with_empty_new_str_deletes(workspace: Path) -> None:
    """An empty new_str deletes the matched text."""
    write(workspace / "f.txt", FIVE_LINES)
    result = run(workspace, command="str_replace", path="f.txt", old_str="three\n", new_str="")
    assert not result.is_error
    assert (workspace / "f.txt").read_text() == "one\ntwo\nfour\nfive\n"


@pytest.mark.parametrize(
    ("old_str", "message"),
    [
        pytest.param("six", "no match for old_str in f.txt", id="no-match"),
        pytest.param("  two", "no match", id="whitespace-matters"),
        pytest.param("o", "old_str occurs 3 times in f.txt", id="three-matches"),
    ],
)
def test_file_editor_str_replace_needs_exactly_one_match(
    workspace: Path, old_str: str, message: str
) -> None:
    """Zero or several matches are an error result and the file is left as it was."""
    write(workspace / "f.txt", FIVE_LINES)
    result = run(workspace, command="str_replace", path="f.txt", old_str=old_str, new_str="X")
    assert result.is_error
    assert message in result.content
    assert (workspace / "f.txt").read_text() == FIVE_LINES


def test_file_editor_str_replace_missing_file(workspace: Path) -> None:
    """Replacing in a file that does not exist is an error result, and creates nothing."""
    result = run(workspace, command="str_replace", path="nope.txt", old_str="a", new_str="b")
    assert result.is_error
    assert "nope.txt does not exist" in result.content
    assert not (workspace / "nope.txt").exists()


def test_file_editor_str_replace_in_a_directory(workspace: Path) -> None:
    """A directory is not a file to edit: an error result suggesting to view it."""
    (workspace / "sub").mkdir()
    result = run(workspace, command="str_replace", path="sub", old_str="a", new_str="b")
    assert result.is_error
    assert "sub is a directory" in result.content


# --- insert -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "insert_line", "new_str", "expected"),
    [
        pytest.param("a\nb\n", 0, "top", "top\na\nb\n", id="at-the-top"),
        pytest.param("a\nb\n", 1, "mid\n", "a\nmid\nb\n", id="after-line-1"),
        pytest.param("a\nb\n", 2, "x\ny", "a\nb\nx\ny\n", id="at-the-end"),
        pytest.param("a\nb", 2, "end", "a\nb\nend\n", id="after-a-last-line-without-newline"),
        pytest.param("", 0, "first", "first\n", id="into-an-empty-file"),
    ],
)
def test_file_editor_insert(
    workspace: Path, original: str, insert_line: int, new_str: str, expected: str
) -> None:
    """new_str goes after line insert_line (0 = top) as whole lines."""
    write(workspace / "f.txt", original)
    result = run(
        workspace, command="insert", path="f.txt", insert_line=insert_line, new_str=new_str
    )
    assert not result.is_error, result.content
    assert (workspace / "f.txt").read_text() == expected
    assert f"after line {insert_line} of f.txt. Lines " in result.content
    assert result.data == {"path": "f.txt", "command": "insert"}


def test_file_editor_insert_shows_the_inserted_lines(workspace: Path) -> None:
    """The result counts the inserted lines and shows them numbered, with context."""
    write(workspace / "f.txt", FIVE_LINES)
    result = run(workspace, command="insert", path="f.txt", insert_line=5, new_str="six\nseven")
    assert result.content == (
        "inserted 2 lines after line 5 of f.txt. Lines 3-7 now read:\n"
        "     3\tthree\n     4\tfour\n     5\tfive\n     6\tsix\n     7\tseven\n"
    )


def test_file_editor_insert_past_the_end_is_an_error(workspace: Path) -> None:
    """An insert_line past the last line is refused and the file is unchanged."""
    write(workspace / "f.txt", "a\nb\n")
    result = run(workspace, command="insert", path="f.txt", insert_line=3, new_str="x")
    assert result.is_error
    assert "insert_line 3 is past the end: f.txt has 2 lines" in result.content
    assert (workspace / "f.txt").read_text() == "a\nb\n"


# --- paths --------------------------------------------------------------------------------


def make_escape_links(workspace: Path, secret: Path) -> None:
    (workspace / "file_link").symlink_to(secret)
    (workspace / "dir_link").symlink_to(secret.parent, target_is_directory=True)


ESCAPES = [
    pytest.param("../secret.txt", id="dotdot"),
    pytest.param("a/../../secret.txt", id="dotdot-after-a-dir"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("file_link", id="symlinked-file-outside"),
    pytest.param("dir_link/secret.txt", id="symlinked-dir-outside"),
    pytest.param("dir_link/brand_new.txt", id="new-file-in-symlinked-dir-outside"),
]


@pytest.mark.parametrize("path", ESCAPES)
def test_file_editor_resolve_refuses_escapes(workspace: Path, secret: Path, path: str) -> None:
    """Paths that are absolute or resolve outside the workspace raise PathEscape."""
    make_escape_links(workspace, secret)
    with pytest.raises(PathEscape, match=r"absolute|outside the workspace"):
        resolve_in_workspace(workspace, path)


@pytest.mark.parametrize("command", ["view", "create", "str_replace", "insert"])
@pytest.mark.parametrize("path", ESCAPES)
def test_file_editor_escapes_are_error_results(
    workspace: Path, secret: Path, path: str, command: str
) -> None:
    """Every command refuses an escaping path with an error result; outside stays untouched."""
    make_escape_links(workspace, secret)
    fields: dict[str, dict[str, Any]] = {
        "view": {},
        "create": {"file_text": "pwned\n"},
        "str_replace": {"old_str": "top", "new_str": "pwned"},
        "insert": {"insert_line": 0, "new_str": "pwned"},
    }
    result = run(workspace, command=command, path=path, **fields[command])
    assert result.is_error
    assert result.data == {"path": path, "command": command}
    assert secret.read_text() == "top secret\n"
    assert not (secret.parent / "brand_new.txt").exists()


def test_file_editor_symlinks_inside_the_workspace_work(workspace: Path) -> None:
    """A symlink inside the workspace pointing inside it is followed, for files and dirs."""
    write(workspace / "real" / "f.txt", "hello\n")
    (workspace / "alias.txt").symlink_to(workspace / "real" / "f.txt")
    (workspace / "alias_dir").symlink_to("real", target_is_directory=True)
    assert resolve_in_workspace(workspace, "alias.txt") == (workspace / "real" / "f.txt").resolve()
    result = run(
        workspace, command="str_replace", path="alias_dir/f.txt", old_str="hello", new_str="hi"
    )
    assert not result.is_error
    assert result.data["path"] == "real/f.txt"
    assert run(workspace, command="view", path="alias.txt").content.endswith("     1\thi\n")


def test_file_editor_symlink_loop_is_an_error(workspace: Path) -> None:
    """A symlink loop cannot be resolved: an error result, not an exception."""
    (workspace / "loop").symlink_to("loop")
    result = run(workspace, command="view", path="loop")
    assert result.is_error
    assert "cannot be resolved" in result.content


def test_file_editor_resolve_workspace_itself_only_when_allowed(workspace: Path) -> None:
    """The workspace itself is refused as a file, allowed for listing."""
    with pytest.raises(PathEscape, match="workspace directory itself"):
        resolve_in_workspace(workspace, ".")
    assert resolve_in_workspace(workspace, ".", allow_root=True) == workspace.resolve()


# --- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param({"command": "create", "path": "f"}, "create needs file_text", id="create"),
        pytest.param(
            {"command": "str_replace", "path": "f", "new_str": "x"},
            "str_replace needs old_str",
            id="str-replace-old",
        ),
        pytest.param(
            {"command": "str_replace", "path": "f", "old_str": "x"},
            "str_replace needs new_str",
            id="str-replace-new",
        ),
        pytest.param(
            {"command": "insert", "path": "f"},
            "insert needs insert_line and new_str",
            id="insert-both",
        ),
        pytest.param(
            {"command": "view", "path": "f", "file_text": "x", "old_str": "y"},
            "view does not take file_text, old_str",
            id="fields-of-another-command",
        ),
        pytest.param(
            {"command": "str_replace", "path": "f", "old_str": "", "new_str": "x"},
            "old_str must not be empty",
            id="empty-old-str",
        ),
        pytest.param(
            {"command": "insert", "path": "f", "insert_line": -1, "new_str": "x"},
            "greater than or equal to 0",
            id="negative-insert-line",
        ),
        pytest.param({"command": "view", "path": "f", "view_range": [0, 3]}, "view_range", id="r0"),
        pytest.param({"command": "view", "path": "f", "view_range": [3, 2]}, "view_range", id="r-"),
        pytest.param({"command": "view", "path": "f", "view_range": [1]}, "view_range", id="r1"),
        pytest.param(
            {"command": "view", "path": "f", "view_range": [1, -2]}, "view_range", id="r2"
        ),
        pytest.param({"command": "view", "path": ""}, "at least 1 character", id="empty-path"),
        pytest.param({"command": "view", "path": "a\x00b"}, "NUL", id="nul-in-path"),
        pytest.param({"command": "delete", "path": "f"}, "command", id="unknown-command"),
        pytest.param({"command": "view", "path": "f", "mode": 1}, "Extra inputs", id="extra-key"),
    ],
)
def test_file_editor_arguments_validation(arguments: dict[str, Any], message: str) -> None:
    """Each command requires its own fields and only those, with a message naming them."""
    with pytest.raises(ValidationError, match=message):
        FileEditorArguments.model_validate(arguments)


def test_file_editor_arguments_schema_describes_every_field() -> None:
    """The JSON schema the model receives describes every field and forbids others."""
    schema = FileEditorArguments.model_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["command", "path"]
    assert all(field.get("description") for field in schema["properties"].values())


# --- the tool through Trio ----------------------------------------------------------------


def test_file_editor_tool_satisfies_the_protocol() -> None:
    """FileEditorTool is a Tool named file_editor whose Arguments are FileEditorArguments."""
    tool: Tool = FileEditorTool()
    assert (tool.name, tool.Arguments) == ("file_editor", FileEditorArguments)
    assert "str_replace" in tool.description


async def test_file_editor_call_waits_for_a_token_of_the_tool_limiter(workspace: Path) -> None:
    """With the tool limiter's only token taken, a file_editor call waits and touches nothing."""
    limiter = trio.CapacityLimiter(1)
    env = ToolEnvironment(workspace=workspace, tool_limiter=limiter)
    call = ToolCall("c", "file_editor", {"command": "create", "path": "f.txt", "file_text": "x\n"})
    results: list[ToolResult] = []

    async def call_it() -> None:
        results.append(await execute_one(call, default_tools(), env))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, limiter:
            nursery.start_soon(call_it)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == 1
            assert not (workspace / "f.txt").exists()
    assert [result.content for result in results] == ["created f.txt (1 lines)"]
    assert limiter.statistics().borrowed_tokens == 0


async def test_file_editor_edits_in_a_worker_thread_within_the_calls_one_token(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At tool_threads = 1 the edit runs in a tool worker thread while the call holds the
    only token (no second token asked for), and returns what edit returns."""
    write(workspace / "f.txt", FIVE_LINES)
    limiter = trio.CapacityLimiter(1)
    env = ToolEnvironment(workspace=workspace, tool_limiter=limiter)
    entered, release = threading.Event(), threading.Event()

    def gated_edit(workspace: Path, args: FileEditorArguments) -> ToolResult:
        entered.set()
        release.wait()
        return edit(workspace, args)

    monkeypatch.setattr(file_editor, "edit", gated_edit)
    call = ToolCall("c", "file_editor", {"command": "view", "path": "f.txt"})
    results: list[ToolResult] = []

    async def call_it() -> None:
        results.append(await execute_one(call, default_tools(), env))

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call_it)
                waiter = trio.CapacityLimiter(1)  # not the default limiter: no token to share
                assert await trio.to_thread.run_sync(entered.wait, 5, limiter=waiter)
                assert limiter.statistics().borrowed_tokens == 1
                assert TOOL_WORKER_THREADS.statistics().borrowed_tokens == 1
                release.set()
    finally:
        release.set()
    assert limiter.statistics().borrowed_tokens == 0
    assert results == [run(workspace, command="view", path="f.txt")]
