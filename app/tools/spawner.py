"""One thread that forks every command, alive as long as the process.

Why not fork from a Trio worker thread, as ``trio.run_process`` does? bubblewrap's
``--die-with-parent`` (``PR_SET_PDEATHSIG``) fires when the *thread* that forked the sandbox
exits, not the process — and Trio's idle worker threads exit after 10 seconds (measured: a
sandboxed ``sleep 25`` was killed after exactly 10.0 s). Why not fork from the Trio thread?
A fork and exec blocks it (0.2 ms typically, 1.3 ms measured at most), and nothing blocking
belongs there. So the fork happens here: one daemon thread, started on first use, that takes
jobs from a queue for the rest of the process's life. A sandbox then dies with the server
process, never earlier.

Cancellation:
    :meth:`Spawner.call` waits for its job shielded: the job takes a fraction of a
    millisecond, and a cancel that abandoned it could leak the process it starts.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Job(Generic[T]):
    """One call to run in the spawner thread, and its result or error."""

    def __init__(self, fn: Callable[[], T], token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.token = token
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed back to the caller, never lost in the thread
            self.error = exc
        with contextlib.suppress(trio.RunFinishedError):  # the caller's run is over
            self.token.run_sync_soon(self.done.set)


class Spawner:
    """Runs blocking calls that start processes in one long-lived thread."""

    def __init__(self, name: str = "trellis-spawner") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job[object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the spawner thread; its result, or its exception raised here."""
        job = _Job(fn, trio.lowlevel.current_trio_token())
        self._start()
        self._jobs.put(job)  # type: ignore[arg-type]
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            self._jobs.get().run()


#: The process's spawner: every terminal command is forked by its one thread.
SPAWNER = Spawner()
