"""The ``file_editor`` tool: view, create and edit text files inside the conversation's workspace.

Four commands, one for each thing a model does with a file::

    view         a file as numbered lines (``cat -n``), or a directory two levels deep
    create       write a whole file, making parent directories (an existing file is overwritten)
    str_replace  replace the one occurrence of ``old_str`` with ``new_str``
    insert       insert ``new_str`` after line ``insert_line`` (0 = at the top)

Why ``str_replace`` demands *exactly one* match: the model edits by quoting, and a quote that
matches twice is ambiguous; guessing silently corrupts files, so the model must add context.

Confinement, the rule: every file and directory this tool touches is opened from the
workspace's descriptor one component at a time, each with ``O_NOFOLLOW``, along the
symlink-free path :func:`resolve_in_workspace` chose. A symlink met on the way (swapped in
since the check) is an error, never followed: nothing outside the workspace is reached by
name. A regular file must have exactly one hard link: another link may be a file outside the
workspace (a command can make one), which this tool must neither read nor write.

Errors: ``ValueError`` └── ``PathEscape`` (a path that is not a place inside the workspace).
:func:`edit` never raises for the model's mistakes (missing file, bad range, escape, binary
file, a directory): it returns ``ToolResult(is_error=True)`` saying what was wrong and what to do.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.tools.base import ToolEnvironment, ToolResult, run_in_worker_thread

# 10 MiB: far beyond hand-edited source; bigger is data or a log, held whole in memory.
MAX_FILE_BYTES = 10 * 1024 * 1024
SNIPPET_CONTEXT_LINES = 3  # lines shown around an edit, so the model can check its result
LISTING_DEPTH = 2

_FIELDS = {  # command: (required fields, optional fields)
    "view": ((), ("view_range",)),
    "create": (("file_text",), ()),
    "str_replace": (("old_str", "new_str"), ()),
    "insert": (("insert_line", "new_str"), ()),
}


class PathEscape(ValueError):
    """A path that is not a place inside the workspace: absolute, or resolving outside it."""


class _Refused(Exception):
    """A mistake of the model's, reported to it as an error result (never leaves this module)."""


class FileEditorArguments(BaseModel):
    """One command with only the fields that command uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["view", "create", "str_replace", "insert"] = Field(
        description="view: show a file or list a directory; create: write a whole file; "
        "str_replace: replace one exact occurrence of old_str; insert: add lines after a line."
    )
    path: str = Field(min_length=1, description="Relative to the workspace, e.g. 'src/app.py'.")
    file_text: str | None = Field(None, description="create: the whole content of the file.")
    old_str: str | None = Field(
        None,
        description="str_replace: the exact text to replace, whitespace included. It must occur "
        "exactly once in the file: include surrounding lines to make it unique.",
    )
    new_str: str | None = Field(None, description="str_replace: the replacement; insert: the text.")
    insert_line: int | None = Field(
        None, ge=0, description="insert: new_str goes after this 1-based line; 0 = at the top."
    )
    view_range: list[int] | None = Field(
        None, description="view: [start, end] lines, 1-based, inclusive; end -1 = to the end."
    )

    @model_validator(mode="after")
    def _fields_fit_command(self) -> Self:
        """Each command gets exactly its own fields, so a confused call fails loudly."""
        required, optional = _FIELDS[self.command]
        if missing := [name for name in required if getattr(self, name) is None]:
            raise ValueError(f"{self.command} needs {' and '.join(missing)}")
        given = {name for name, value in self if value is not None} - {"command", "path"}
        if extra := sorted(given - {*required, *optional}):
            raise ValueError(f"{self.command} does not take {', '.join(extra)}")
        if self.old_str == "":
            raise ValueError("old_str must not be empty: quote the text to replace")
        if "\x00" in self.path:
            raise ValueError("path must not contain NUL characters")
        r = self.view_range
        if r is not None and not (len(r) == 2 and r[0] >= 1 and (r[1] == -1 or r[1] >= r[0])):
            raise ValueError("view_range is [start, end] with 1 <= start <= end, or end -1")
        return self


def resolve_in_workspace(workspace: Path, path: str, *, allow_root: bool = False) -> Path:
    """The absolute, symlink-free path that ``path`` names, checked to lie inside ``workspace``.

    Refused with :class:`PathEscape`: absolute paths, anything whose resolution (``..``, a
    symlinked file or parent directory, followed by ``Path.resolve``) ends outside
    ``workspace.resolve()``, a symlink loop, and the workspace itself unless ``allow_root``
    (listing it is fine; it is not a file). Symlinks *inside* the workspace pointing inside
    are fine. Missing trailing components are allowed (``create`` makes them).

    This only *chooses* the path. The file is then opened from the workspace one component
    at a time with ``O_NOFOLLOW`` (:func:`_open_beneath`), so a directory swapped for a
    symlink after this check makes the open fail instead of leading outside.
    """
    if Path(path).is_absolute():
        raise PathEscape(f"{path!r} is absolute: give a path relative to the workspace")
    root = workspace.resolve()
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before Python 3.13
        raise PathEscape(f"{path!r} cannot be resolved ({exc}): is it a symlink loop?") from exc
    if not resolved.is_relative_to(root):
        raise PathEscape(f"{path!r} leads outside the workspace; use a path inside it")
    if resolved == root and not allow_root:
        raise PathEscape(f"{path!r} is the workspace directory itself, not a file")
    return resolved


def edit(workspace: Path, args: FileEditorArguments, *, max_view_chars: int = 50_000) -> ToolResult:
    """Carry out one command: blocking file I/O, for a worker thread.

    ``data`` is ``{"path": <relative to the workspace>, "command": ...}`` (+ ``"overwrote"``).

    Errors:
        The model's mistakes and OS errors (permission denied...) are ``is_error`` results.
        Writes go in place, not via a temporary file: a crash mid-write can truncate the file.
    """
    data: dict[str, Any] = {"path": args.path, "command": args.command}
    try:
        target = resolve_in_workspace(workspace, args.path, allow_root=args.command == "view")
        rel = data["path"] = target.relative_to(workspace.resolve()).as_posix()
        match args.command:
            case "view":
                content = _view(workspace, rel, args.view_range, max_view_chars)
            case "create":
                content, data["overwrote"] = _create(workspace, rel, args.file_text or "")
            case "str_replace":  # the validator guarantees the fields: `or` only for mypy
                old, new = args.old_str or "", args.new_str or ""
                content = _str_replace(workspace, rel, old, new, max_view_chars)
            case "insert":
                line, new = args.insert_line or 0, args.new_str or ""
                content = _insert(workspace, rel, line, new, max_view_chars)
    except (PathEscape, _Refused) as exc:
        return ToolResult(str(exc), is_error=True, data=data)
    except OSError as exc:  # e.g. permission denied, a file where a directory should be
        message = f"{args.command} {data['path']} failed: {exc.strerror or repr(exc)}"
        return ToolResult(message, is_error=True, data=data)
    return ToolResult(content, data=data)


def _view(workspace: Path, rel: str, view_range: list[int] | None, max_chars: int) -> str:
    with _open_beneath(workspace, rel, os.O_RDONLY) as fd:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            if view_range is not None:
                raise _Refused(f"{rel} is a directory; view_range applies to files only")
            return _listing(fd, rel, max_chars)
        lines = _lines(_read_text(fd, rel))
    if not lines:
        return f"{rel} is empty"
    start, end = view_range or (1, -1)
    end = len(lines) if end == -1 else end
    if start > len(lines) or end > len(lines):
        raise _Refused(f"view_range is past the end: {rel} has {len(lines)} lines")
    header = f"{rel}, lines {start}-{end} of {len(lines)}:\n"
    return header + _numbered(lines[start - 1 : end], start, max_chars)


def _create(workspace: Path, rel: str, text: str) -> tuple[str, bool]:
    """Write a new file, or overwrite an existing one (which must pass :func:`_checked`)."""
    new = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        with _open_beneath(workspace, rel, new, make_parents=True) as fd:
            _write_text(fd, text)
        overwrote = False
    except FileExistsError:
        with _open_beneath(workspace, rel, os.O_WRONLY) as fd:
            _checked(fd, rel)
            _write_text(fd, text)
        overwrote = True
    return f"{'overwrote' if overwrote else 'created'} {rel} ({len(_lines(text))} lines)", overwrote


def _str_replace(workspace: Path, rel: str, old: str, new: str, max_chars: int) -> str:
    with _open_beneath(workspace, rel, os.O_RDWR) as fd:
        text = _read_text(fd, rel)
        count = text.count(old)
        if count == 0:
            raise _Refused(
                f"no match for old_str in {rel}: it must match exactly, whitespace included"
            )
        if count > 1:
            raise _Refused(
                f"old_str occurs {count} times in {rel}: add surrounding lines to make it unique"
            )
        first = text.count("\n", 0, text.index(old)) + 1
        updated = text.replace(old, new, 1)
        _write_text(fd, updated)
    return f"replaced 1 occurrence in {rel}. " + _snippet(
        updated, first, first + new.count("\n"), max_chars
    )


def _insert(workspace: Path, rel: str, after: int, new: str, max_chars: int) -> str:
    with _open_beneath(workspace, rel, os.O_RDWR) as fd:
        lines = _lines(_read_text(fd, rel))
        if after > len(lines):
            raise _Refused(f"insert_line {after} is past the end: {rel} has {len(lines)} lines")
        if after == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"  # the last line had no newline: end it before appending after it
        block = new if new.endswith("\n") else new + "\n"
        updated = "".join(lines[:after]) + block + "".join(lines[after:])
        _write_text(fd, updated)
    added = len(_lines(block))
    return f"inserted {added} lines after line {after} of {rel}. " + _snippet(
        updated, after + 1, after + added, max_chars
    )


# -- opening beneath the workspace (the rule is in the module docstring) ---------------------

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY


@contextmanager
def _open_beneath(
    workspace: Path, rel: str, flags: int, *, make_parents: bool = False
) -> Iterator[int]:
    """A descriptor for ``rel`` (``"."`` = the workspace), opened as the rule says,
    with ``flags`` for the last component; ``O_NONBLOCK``, so a FIFO never hangs the thread.
    Closed when the block ends.

    Errors:
        :class:`_Refused` for a missing file, a directory where a file is edited, and a
        symlink on the way; ``OSError`` for the rest (permission denied, not a directory).
    """
    parts = [] if rel == "." else rel.split("/")
    fd = os.open(workspace, _DIRECTORY | os.O_CLOEXEC)
    try:
        for index, name in enumerate(parts):
            last = index == len(parts) - 1
            if make_parents and not last:
                with suppress(FileExistsError):
                    os.mkdir(name, dir_fd=fd)
            parent, fd = fd, -1
            try:
                fd = _open_at(parent, name, flags | os.O_NONBLOCK if last else _DIRECTORY, rel)
            finally:
                os.close(parent)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def _open_at(parent: int, name: str, flags: int, rel: str) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=parent)
    except FileNotFoundError:
        raise _Refused(f"{rel} does not exist: view its directory to check, or create it") from None
    except IsADirectoryError:
        if flags & os.O_ACCMODE != os.O_RDWR:  # create: "create sub failed: Is a directory"
            raise
        raise _Refused(f"{rel} is a directory: view it to list its files") from None
    except OSError as exc:  # ELOOP (last) or ENOTDIR (on the way): a symlink, or not a dir
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent, name):
            raise _Refused(f"{rel} leads through a symlink that changed; try again") from None
        raise


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _checked(fd: int, rel: str) -> os.stat_result:
    """The file's status, once it is known to be a regular file with one link, not too big."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _Refused(f"{rel} is not a regular file")
    if info.st_nlink > 1:
        raise _Refused(
            f"{rel} has {info.st_nlink} hard links: another may be outside the workspace, so"
            " this tool does not open it; copy it (cp) to edit the copy"
        )
    if info.st_size > MAX_FILE_BYTES:
        raise _Refused(f"{rel} is {info.st_size} bytes, over the {MAX_FILE_BYTES} limit")
    return info


def _read_text(fd: int, rel: str) -> str:
    _checked(fd, rel)
    with open(fd, "rb", closefd=False) as file:
        raw = file.read(MAX_FILE_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if "\x00" in text or (raw and not text):
        raise _Refused(f"{rel} is not UTF-8 text (a binary file?); this tool edits text only")
    return text


def _write_text(fd: int, text: str) -> None:
    """Replace the whole content of the (checked) file open as ``fd``."""
    os.ftruncate(fd, 0)
    with open(fd, "wb", closefd=False) as file:
        file.seek(0)
        file.write(text.encode("utf-8"))


def _lines(text: str) -> list[str]:
    """Lines with their ``\\n``, split on ``\\n`` only (``str.splitlines`` also splits on
    form feeds and other separators, which would misnumber lines against ``cat -n``)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _numbered(lines: list[str], first: int, max_chars: int) -> str:
    """``cat -n`` style; past ``max_chars``, a marker tells where to continue."""
    out: list[str] = []
    size = 0
    for number, line in enumerate(lines, start=first):
        row = "{:6}\t{}\n".format(number, line.removesuffix("\n"))
        if size + len(row) > max_chars:
            resume = number
            if not out:  # a single huge line: show its start rather than nothing at all
                out.append(row[:max_chars] + "\n")
                resume += 1
            out.append(f"[... truncated at {max_chars} characters; view_range=[{resume}, -1]]\n")
            break
        out.append(row)
        size += len(row)
    return "".join(out)


def _snippet(text: str, first: int, last: int, max_chars: int) -> str:
    lines = _lines(text)
    start = max(1, first - SNIPPET_CONTEXT_LINES)
    end = min(len(lines), max(first, last) + SNIPPET_CONTEXT_LINES)
    body = _numbered(lines[start - 1 : end], start, max_chars)
    return f"Lines {start}-{end} now read:\n{body}"


def _listing(directory: int, rel: str, max_chars: int) -> str:
    """Two levels, sorted, hidden entries skipped; ``/`` marks directories, ``@`` symlinks
    (never descended into, so a link to the outside lists nothing of the outside).
    Subdirectories are opened from their parent's descriptor with ``O_NOFOLLOW``."""
    entries: list[str] = []

    def walk(fd: int, prefix: str, depth: int) -> None:
        with os.scandir(fd) as scan:
            children = sorted(scan, key=lambda entry: entry.name)
        for child in (c for c in children if not c.name.startswith(".")):
            is_dir = child.is_dir(follow_symlinks=False)
            mark = "/" if is_dir else "@" if child.is_symlink() else ""
            entries.append(prefix + child.name + mark)
            if is_dir and depth < LISTING_DEPTH:
                sub = os.open(child.name, _DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    walk(sub, f"{prefix}{child.name}/", depth + 1)
                finally:
                    os.close(sub)

    walk(directory, "", 1)
    listing = "".join(f"{entry}\n" for entry in entries) or "(empty)\n"
    if len(listing) > max_chars:
        cut = listing.rfind("\n", 0, max_chars) + 1
        listing = listing[:cut] + "[... listing truncated; view a subdirectory]\n"
    return f"{rel}/ ({LISTING_DEPTH} levels, hidden entries skipped):\n{listing}"


class FileEditorTool:
    """The :class:`~app.tools.base.Tool` for files: :func:`edit` in a worker thread.

    Cancellation:
        The worker thread runs within the call's ``tool_limiter`` token (taken by the runner;
        see :func:`~app.tools.base.run_in_worker_thread`) and is not abandoned: a cancelled
        run waits for the file operation in flight (short, bounded by ``MAX_FILE_BYTES``)
        so no thread outlives the run and no write is left half-done.
    """

    name: ClassVar[str] = "file_editor"
    description: ClassVar[str] = (
        "View, create and edit UTF-8 text files in the workspace. Paths are relative to the "
        "workspace. view shows a file with line numbers (or lists a directory); create writes a "
        "whole file; str_replace replaces old_str, which must occur exactly once, with new_str; "
        "insert adds new_str after line insert_line (0 = top). View a file before editing it."
    )
    Arguments: ClassVar[type[BaseModel]] = FileEditorArguments

    async def run(self, arguments: Any, env: ToolEnvironment) -> ToolResult:
        """Run :func:`edit` on already validated arguments (a dict is validated here)."""
        args = FileEditorArguments.model_validate(arguments)
        return await run_in_worker_thread(edit, env.workspace, args)
