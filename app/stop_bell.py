"""The stop bell: how a stop reaches a sleeping run thread, and how a drain wakes thousands.

A script's ``{"sleep": 60}`` step blocks its run thread. It used to sleep on the Trio side
(``trio.from_thread.run(trio.sleep, 60)``): a stop then cancelled the sleep in the run's host
task, and the thread could wake up only after the Trio thread had given that host two more
scheduler passes. Now the thread sleeps on a lock of its own (:meth:`StopBell.wait`), and
:meth:`StopBell.ring` — called right after the run's thread scope was cancelled
(:meth:`RunHandle.stop <app.handles.RunHandle.stop>`) — releases it: the OS wakes the thread
directly, and it raises ``trio.Cancelled`` from ``trio.from_thread.check_cancelled()`` (the
scope's cancel registered it synchronously).

Waking thousands at once is slower than waking them a few at a time. A thread waiting for
the GIL wakes every switch interval (5 ms) to ask for it, so 3,000 threads woken together
spend the two cores on asking, while the Trio thread and the store's writer queue behind
them. Measured with 3,000 threads asleep in ``to_thread`` and nothing else
(``bench/drain_profile.py --threads-only``, 3 runs each): rung all at once, 1.09-1.80 s
until every thread had returned; in 64 chains, 0.30-0.57 s; in 16, 0.27-0.63 s. So a drain rings
through a :class:`BellRinger`: it wakes ``window`` sleepers, and each woken sleeper, as it
wakes, rings the next one in line itself (no trip through Trio, whose thread is busy
recording ends). At most ``window`` chains run at once; none can stall, since a sleeper
passes its turn on the moment it wakes, whatever it does next.

A lock costs ~100 bytes and exists only while the thread sleeps; an idle bell is 3 slots.

Rules (why no wake-up is lost and none is counted twice, without a lock of the bell's own):
    The sleeper's lock sits in a one-item list (its *slot*), and whoever pops it owns it:
    :meth:`ring` pops it to release it, the sleeper pops it back when its time is up; a
    ``list.pop`` is atomic, so exactly one of them gets it. :meth:`ring` sets ``_rung``
    *before* it looks for the slot; :meth:`wait` publishes the slot *before* it reads
    ``_rung``: either the ring finds the slot, or the sleeper sees ``_rung`` and does not
    wait. A sleeper passes the turn on exactly when a ring took its lock.

Ownership: one bell per run, in its :class:`~app.conversation.RunControl`. The run thread
waits on it; the Trio thread rings it, or a ringer's chain from another run thread. Once
rung it stays rung: the run is stopping.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterable

import trio

__all__ = ["WAKE_WINDOW", "BellRinger", "StopBell"]

#: How many chains of wake-ups a drain runs at once (see :class:`BellRinger`). Measured
#: with ``bench/drain_profile.py`` (3,000 sleeping runs, 2 cores shared with other work, so
#: noisy: medians of 3 to 7 runs, interleaved): 4 chains drained in 1.10 s, 16 in 1.26 s,
#: 32 in 0.90 s, 64 in 0.95 s (0.85-1.02 in the last 3); every sleeper rung at once, 1.7-2.0.
WAKE_WINDOW = 64


class StopBell:
    """Wakes a run thread's :meth:`wait` when the run is stopped (see the module docstring)."""

    __slots__ = ("_ringer", "_rung", "_slot")

    def __init__(self) -> None:
        self._slot: list[threading.Lock] | None = None
        self._rung = False
        self._ringer: BellRinger | None = None

    @property
    def rung(self) -> bool:
        return self._rung

    @property
    def sleeping(self) -> bool:
        """A thread waits on the bell now (for tests and diagnostics)."""
        return bool(self._slot)

    def ring(self) -> bool:
        """The run is stopped: end the current :meth:`wait` and every later one at once.
        Returns whether a sleeping thread was woken. Never blocks; idempotent; any thread.
        """
        self._rung = True
        slot = self._slot
        if not slot:
            return False
        try:
            lock = slot.pop()
        except IndexError:  # the sleeper took it back: its time was up
            return False
        lock.release()
        return True

    def wait(self, seconds: float) -> bool:
        """Block the calling thread for ``seconds``, or until :meth:`ring`. Returns whether
        the bell rang (``False``: the time passed). A sleeper woken by a ring that came
        through a :class:`BellRinger` rings the next bell in its line."""
        if self._rung:
            return True
        lock = threading.Lock()
        lock.acquire()  # held: the timed acquire below waits until ring() releases it
        slot = self._slot = [lock]
        try:
            if not self._rung:
                lock.acquire(timeout=seconds)
        finally:
            try:
                slot.pop()  # take it back: no ring can release it any more
                woken = False
            except IndexError:  # a ring took it
                woken = True
            self._slot = None
        ringer = self._ringer
        if woken and ringer is not None:
            ringer.pass_on()
        return woken or self._rung


class BellRinger:
    """Rings many bells, ``window`` chains at a time (see the module docstring).

    :meth:`ring_all` is called on the Trio thread; :meth:`pass_on` by the woken sleepers,
    from their own threads (a ``deque.popleft`` is atomic: each bell is taken once).
    """

    def __init__(self, window: int | None = None) -> None:
        self._window = WAKE_WINDOW if window is None else window  # read now: benchmarks set it
        self._line: deque[StopBell] = deque()
        self._emptied = trio.Event()
        self._emptied.set()
        self._token: trio.lowlevel.TrioToken | None = None

    def ring_all(self, bells: Iterable[StopBell]) -> None:
        """Ring every bell: ``window`` sleepers now, the others as those wake. Trio thread
        only (:meth:`wait_all_rung` then waits for the last ring)."""
        bells = list(bells)
        for bell in bells:
            bell._ringer = self
        if self._emptied.is_set():
            self._emptied = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._line.extend(bells)
        for _ in range(self._window):
            self.pass_on()

    async def wait_all_rung(self) -> None:
        """Wait until every bell given to :meth:`ring_all` so far has been rung (the last
        sleepers may still be waking up). Cancellation: a plain wait; the ringing goes on."""
        await self._emptied.wait()

    def pass_on(self) -> None:
        """Ring the next bell in line that wakes a sleeper; those nobody sleeps on are rung
        on the way (their threads will see the cancel through Trio). Any thread."""
        while True:
            try:
                bell = self._line.popleft()
            except IndexError:
                self._tell_emptied()
                return
            if bell.ring():
                return

    def _tell_emptied(self) -> None:
        token, emptied = self._token, self._emptied
        if token is not None and not emptied.is_set():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(emptied.set)
