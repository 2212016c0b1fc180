"""Run ends written from the Trio side: stops in batches; ends the store refused, retried.

Batches: runs that end together — a drain of 10,000 runs, a delete, an interrupt of
several — must not cost a transaction each. Their run tasks hand their ``stop`` ends to
:meth:`EndLedger.record`, which writes them as a *group commit*: the first task to arrive
becomes the batch's writer and waits its turn (one batch is written at a time, and none
while a drain holds the writes: :meth:`EndLedger.hold`); every stop that arrives meanwhile
joins its batch. The writer then records the whole batch with one ``store.stop_runs`` call
per reason — one transaction — and wakes the others. A drain of N runs thus takes a few
transactions (2 to 4 measured for 3,000 runs), however large N is. Other ends
(``error/internal_error``) are written one by one with ``store.transition_run``.

Retries: a run's end must always be recorded: a run left ``running`` in the store with no
thread behind it blocks its conversation (every new run is an illegal transition) until a
restart. When the store refuses a write — a full disk, an I/O error, a read-only file — the
ends it held wait here, in memory, and a retry task of the supervisor writes them (stops
again in batches) as soon as the store takes writes again. No restart needed.

Ownership: the supervisor creates the ledger, giving it a function that runs a store call
in a worker thread, and runs :meth:`EndLedger.retry_until_closed` in its nursery; run tasks
call :meth:`EndLedger.record`. All on the Trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from app.errors import IllegalTransition, NotFound
from app.lifecycle import Trigger
from app.store.base import EventStore

log = logging.getLogger("trellis.runs")

#: Seconds between retries of unrecorded ends: a full disk is freed by a person or a log
#: rotation, on a scale of seconds to minutes; a retry costs one small transaction.
RETRY_INTERVAL_SECONDS = 1.0

#: ``write(call)`` runs ``call(store)`` in a worker thread and returns its result.
StoreWrite = Callable[[Callable[[EventStore], Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _End:
    trigger: Trigger
    reason: str
    error: str | None


@dataclass(eq=False)
class _Batch:
    """Stop ends (run id → reason) written together; ``written`` is set after the write."""

    ends: dict[str, str] = field(default_factory=dict)
    has_writer: bool = False
    failed: set[str] = field(default_factory=set)
    written: trio.Event = field(default_factory=trio.Event)


class EndLedger:
    """Writes run ends through ``write`` (stops batched); keeps those that failed and
    retries them."""

    def __init__(self, write: StoreWrite) -> None:
        self._write = write
        self._pending: dict[str, _End] = {}
        self._wake = trio.Event()
        self._filling = _Batch()  # the batch stops join now
        self._turn = trio.Lock()  # one batch written at a time; the next fills meanwhile
        self._holds = 0
        self._open = trio.Event()  # set while nobody holds the writes (see hold())
        self._open.set()
        #: Transactions written for stops (successful or not): for tests and benchmarks.
        self.stop_writes = 0

    def __len__(self) -> int:
        """Ends not yet recorded."""
        return len(self._pending)

    async def record(
        self, run_id: str, trigger: Trigger, reason: str, error: str | None = None
    ) -> bool:
        """Write the end now (a stop: with the other stops of its batch); on a store
        failure keep it for the retry task. Call it shielded from cancellation.

        Returns whether it is on record (or needs no record: the run already ended, or
        was deleted). Never raises ``Exception``.
        """
        end = _End(trigger, reason, error)
        if trigger is Trigger.STOP:
            recorded = await self._join_batch(run_id, reason)
        else:
            recorded = await self._try(run_id, end)
        if not recorded:
            self._pending[run_id] = end
            self._wake.set()
        return recorded

    def hold(self) -> None:
        """Keep stops from being written until :meth:`release`: they gather in one batch.

        For a drain (``app/stopping.py``): while its runs' threads are still being woken,
        a write would only be starved of the GIL by them — a batch of a few dozen ends
        took 0.3 s then, with every later end waiting behind it — so the stops that arrive
        meanwhile wait, and are written together once the last thread has been woken.
        Holds nest; every ``hold()`` must be paired with a :meth:`release` (``finally``).
        """
        self._holds += 1
        if self._open.is_set():
            self._open = trio.Event()

    def release(self) -> None:
        """Undo one :meth:`hold`; with none left, the gathered batch is written."""
        self._holds -= 1
        if self._holds == 0:
            self._open.set()

    async def retry_until_closed(self) -> None:
        """Retry pending ends every ``RETRY_INTERVAL_SECONDS`` while there are any.

        Cancellation: runs until its nursery is cancelled; what is still pending then is
        left to crash recovery at the next start (the store still says ``running``).
        """
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._pending:
                await trio.sleep(RETRY_INTERVAL_SECONDS)
                await self.retry_now()

    async def retry_now(self) -> None:
        """One pass over the pending ends (the stops in one batch)."""
        pending = dict(self._pending)
        stops = {run: end.reason for run, end in pending.items() if end.trigger is Trigger.STOP}
        recorded = set(stops) - await self._write_stops(stops)
        for run_id, end in pending.items():
            if end.trigger is not Trigger.STOP and await self._try(run_id, end):
                recorded.add(run_id)
        for run_id in recorded:
            self._pending.pop(run_id, None)
        if recorded:
            log.info("%d run end(s) recorded after a store failure", len(recorded))

    async def _join_batch(self, run_id: str, reason: str) -> bool:
        """Add the stop to the filling batch; its first member writes it once it is its
        turn (shielded: the others wait for it). Returns whether it was recorded."""
        batch = self._filling
        batch.ends[run_id] = reason
        if batch.has_writer:
            await batch.written.wait()
        else:
            batch.has_writer = True
            with trio.CancelScope(shield=True):
                async with self._turn:  # stops arriving meanwhile join this batch
                    await self._open.wait()  # ... and while the writes are held
                    self._filling = _Batch()
                    batch.failed = await self._write_stops(batch.ends)
                    batch.written.set()
        return run_id not in batch.failed

    async def _write_stops(self, ends: dict[str, str]) -> set[str]:
        """Record the stops, one ``stop_runs`` transaction per reason; return the run ids
        whose write failed."""
        by_reason: dict[str, list[str]] = {}
        for run_id, reason in ends.items():
            by_reason.setdefault(reason, []).append(run_id)
        failed: set[str] = set()
        for reason, run_ids in by_reason.items():
            self.stop_writes += 1
            try:
                await self._write(partial(_stop_runs, run_ids, reason))
            except Exception as exc:
                others = f" and {len(run_ids) - 1} other run(s)" if len(run_ids) > 1 else ""
                log.warning(
                    "run %s%s: could not record its end (%s); will retry", run_ids[0], others, exc
                )
                failed.update(run_ids)
        return failed

    async def _try(self, run_id: str, end: _End) -> bool:
        def transition(store: EventStore) -> Any:
            return store.transition_run(run_id, end.trigger, reason=end.reason, error=end.error)

        try:
            await self._write(transition)
        except (IllegalTransition, NotFound):
            return True  # already ended (its thread recorded it), or deleted meanwhile
        except Exception as exc:
            log.warning("run %s: could not record its end (%s); will retry", run_id, exc)
            return False
        return True


def _stop_runs(run_ids: list[str], reason: str, store: EventStore) -> Any:
    return store.stop_runs(run_ids, reason=reason)
