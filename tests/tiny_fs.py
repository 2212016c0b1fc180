"""Real storage faults for tests: a tiny tmpfs to fill, an ext4 image the kernel makes read-only.

No mock of SQLite: the database lives on a real filesystem that really refuses. Both need
``mount`` (root with ``CAP_SYS_ADMIN``); a test that cannot mount is skipped with the reason.

Recipes, measured here (Linux 6.18, SQLite 3.40.1, WAL, ``synchronous=NORMAL``):

* **SQLITE_FULL at COMMIT** — a ``tmpfs`` of 1 MiB holds the database; :meth:`TinyFs.fill`
  grows a filler file until ``ENOSPC`` (64 KiB, then 4 KiB, then 1-byte writes, so not even a
  partly used page is left). Statements still succeed: their pages stay in SQLite's cache.
  The ``COMMIT`` must append frames to the WAL file and fails with ``SQLITE_FULL``, and
  SQLite has *already rolled the transaction back* (``in_transaction`` is false) — the
  automatic rollback a second ``ROLLBACK`` must not mask. :meth:`TinyFs.free` deletes the
  filler; the same connection then commits again. Caveat: after a checkpoint has reset the
  WAL, SQLite rewrites the WAL file from its start, and a write that fits in it needs no new
  space and succeeds on a full disk; test stores stay far below the 1000-page
  auto-checkpoint, so every commit here appends.
* **Read-only filesystem with the database open** — ``mount -o remount,ro`` is refused
  (``EBUSY``): Linux never makes a mount read-only under files open for writing, and SQLite
  keeps its files open read-write. What happens in production is the kernel's emergency
  remount after a filesystem error (ext4 ``errors=remount-ro``); ext4 triggers one on demand
  through ``/sys/fs/ext4/<device>/trigger_fs_error``. The next ``COMMIT`` then fails with
  ``SQLITE_IOERR_WRITE`` (``EROFS``), again after SQLite's own rollback. Such a mount stays
  read-only (``emergency_ro``) until it is unmounted and checked: no recovery in place.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FILLER = "filler"


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _mount_or_skip(what: str, *command: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mounting {what} needs root")
    result = _run(*command)
    if result.returncode != 0:
        pytest.skip(f"cannot mount {what} here: {result.stderr.strip()}")


@contextmanager
def _mounted(directory: Path) -> Iterator[None]:
    """Unmount ``directory`` on the way out; a mount still in use fails a passing test."""
    try:
        yield
    except BaseException:
        _unmount(directory)
        raise
    if not _unmount(directory):
        pytest.fail(f"{directory} was still in use at the end of the test (a leaked file?)")


def _unmount(directory: Path) -> bool:
    """Unmount; if it is busy, detach it lazily and return False."""
    if _run("umount", str(directory)).returncode == 0:
        return True
    _run("umount", "--lazy", str(directory))
    return False


class TinyFs:
    """A mounted tmpfs of a few hundred KiB that :meth:`fill` makes refuse every new byte."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self) -> None:
        """Write a filler file until the filesystem has no byte left."""
        descriptor = os.open(self.path / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
                try:
                    while True:
                        os.write(descriptor, chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    # this chunk size no longer fits: go on with a smaller one
        finally:
            os.close(descriptor)
        assert self.free_bytes() == 0

    def free(self) -> None:
        """Delete the filler: the space is back."""
        (self.path / FILLER).unlink()


@contextmanager
def tiny_tmpfs(path: Path, size_bytes: int = 1 << 20) -> Iterator[TinyFs]:
    """A tmpfs of ``size_bytes`` mounted on ``path`` (created), unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}"
    _mount_or_skip("a tmpfs", "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
    with _mounted(path):
        yield TinyFs(path)


class Ext4Fs:
    """A mounted ext4 image (``errors=remount-ro``) that :meth:`break_` makes read-only."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        self.device = device

    def break_(self) -> None:
        """Report a filesystem error to ext4: the kernel remounts it read-only at once."""
        trigger = Path("/sys/fs/ext4", Path(self.device).name, "trigger_fs_error")
        trigger.write_text("trellis test: simulated filesystem error\n")
        with pytest.raises(OSError, match="Read-only file system"):
            (self.path / "probe").touch()


@contextmanager
def ext4_image(path: Path, image: Path, size_bytes: int = 4 << 20) -> Iterator[Ext4Fs]:
    """A fresh ext4 image file mounted on ``path`` through a loop device."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    with image.open("wb") as file:
        file.truncate(size_bytes)
    assert _run("mkfs.ext4", "-q", "-F", str(image)).returncode == 0
    path.mkdir(parents=True, exist_ok=True)
    _mount_or_skip("an ext4 image", "mount", "-o", "loop,errors=remount-ro", str(image), str(path))
    with _mounted(path):
        device = _run("findmnt", "-n", "-o", "SOURCE", str(path)).stdout.strip()
        if not Path("/sys/fs/ext4", Path(device).name, "trigger_fs_error").exists():
            pytest.skip("this kernel's ext4 has no trigger_fs_error")
        yield Ext4Fs(path, device)
