"""Final statuses that the store could not take yet, retried until it does.

A run's end must always be recorded: a run left ``running`` in the store with no thread
behind it blocks its conversation (every new run is an illegal transition) until a restart.
When the store refuses the final write — a full disk, an I/O error, a read-only file — the
end waits here, in memory, and a retry task of the supervisor writes it as soon as the store
takes writes again. No restart needed.

Ownership: the supervisor creates the ledger and runs :meth:`EndLedger.retry_until_closed`
in its nursery; run tasks call :meth:`EndLedger.record`. All on the Trio thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from app.errors import IllegalTransition, NotFound
from app.lifecycle import Trigger

log = logging.getLogger("trellis.runs")

#: Seconds between retries of unrecorded ends: a full disk is freed by a person or a log
#: rotation, on a scale of seconds to minutes; a retry costs one small transaction.
RETRY_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _End:
    trigger: Trigger
    reason: str
    error: str | None


class EndLedger:
    """Writes run ends through ``write`` (a store call in a worker thread); keeps those
    that failed and retries them."""

    def __init__(self, write: Callable[..., Awaitable[Any]]) -> None:
        self._write = write
        self._pending: dict[str, _End] = {}
        self._wake = trio.Event()

    def __len__(self) -> int:
        """Ends not yet recorded."""
        return len(self._pending)

    async def record(
        self, run_id: str, trigger: Trigger, reason: str, error: str | None = None
    ) -> bool:
        """Write the end now; on a store failure keep it for the retry task.

        Returns whether it is on record (or needs no record: the run already ended, or
        was deleted). Never raises ``Exception``.
        """
        end = _End(trigger, reason, error)
        if await self._try(run_id, end):
            return True
        self._pending[run_id] = end
        self._wake.set()
        return False

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
        """One pass over the pending ends."""
        for run_id, end in list(self._pending.items()):
            if await self._try(run_id, end):
                self._pending.pop(run_id, None)
                log.info("run %s: end recorded after a store failure", run_id)

    async def _try(self, run_id: str, end: _End) -> bool:
        try:
            await self._write(run_id, end.trigger, reason=end.reason, error=end.error)
        except (IllegalTransition, NotFound):
            return True  # already ended (its thread recorded it), or deleted meanwhile
        except Exception as exc:
            log.warning("run %s: could not record its end (%s); will retry", run_id, exc)
            return False
        return True
