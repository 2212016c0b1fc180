"""One server per data directory: an exclusive ``flock`` on ``data_dir/trellis.lock``.

Two servers on one database would each believe they own its runs: the second one's crash
recovery would pause the first one's running runs. So a server claims the directory before
it touches the database, and holds the claim for as long as it lives.

The claim is a BSD lock (``flock(2)``) on an open file. The kernel drops it when the file is
closed — by :meth:`DataDirLock.release` or by the process ending *in any way*, ``SIGKILL``
included — so a crash never leaves a stale claim behind: the next server starts and runs
crash recovery. The file itself stays on disk and means nothing without a live holder; it
holds the holder's pid, for the error message only. (It is never deleted: unlinking a lock
file while another process opens it is the classic way to end up with two holders.)

The descriptor is close-on-exec, so commands started by the terminal tool do not inherit
the claim and cannot keep it alive after the server is gone.

Cancellation:
    Acquiring never waits: a directory already claimed fails at once.

Errors::

    DataDirError          the data directory cannot be used: not creatable, not writable,
    │                     or its database cannot be opened (the message is one line)
    └── DataDirInUse      another live process holds the claim
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE_NAME = "trellis.lock"


class DataDirError(Exception):
    """The data directory cannot be used; the message is one line that says why."""


class DataDirInUse(DataDirError):
    """Another live process (a Trellis server) holds the data directory."""


class DataDirLock:
    """An exclusive claim on one data directory; a context manager, not re-entrant."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"<DataDirLock {self.path} {'held' if self.held else 'free'}>"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create the directory if needed and claim it. Blocking I/O: call from a thread.

        Errors:
            :class:`DataDirInUse` when another process holds it; :class:`DataDirError` when
            the directory cannot be created or written.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already held")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(
                f"cannot create data directory {self.data_dir}: {_why(exc)}"
            ) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self._not_writable(exc) from None
        try:
            self._claim(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _claim(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            raise DataDirInUse(
                f"data directory {self.data_dir} is in use by another Trellis server"
                f"{f' (pid {holder})' if holder else ''}; stop it, or choose another data_dir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            raise self._not_writable(exc) from None

    def _not_writable(self, exc: OSError) -> DataDirError:
        return DataDirError(f"data directory {self.data_dir} is not writable: {_why(exc)}")

    def release(self) -> None:
        """Give up the claim (closing the file drops the lock). Idempotent, never blocks."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
