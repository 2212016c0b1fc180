"""Webhooks: a signed POST to a conversation's URL each time one of its runs ends.

Think of the dispatcher as a mail room next to the event log: every commit passes by its
window (a store listener), it notes which runs just ended, and couriers carry a signed
letter to each conversation that asked for one — while the log, the runs and the HTTP
handlers carry on without waiting for any courier.

Trigger: the store calls :meth:`WebhookDispatcher.listen` after every commit (from the
committing thread, write lock held). A ``status`` event that moves a conversation into a
final status (``finished``, ``error``, ``paused`` — the end every run record gets, whether
it finished, failed, was interrupted, paused, deleted or stopped by a shutdown) is handed
to the Trio thread with ``run_sync_soon`` and put into a bounded queue
(:data:`QUEUE_SIZE`). The listener never waits. A run that ends without ever having
become its conversation's current run (queued behind an earlier run of the same
conversation and stopped before its turn) appends no status event and sends no webhook;
runs a crash interrupted are paused at start-up, before the dispatcher listens, and send
none either.

**Queue full** (more than :data:`QUEUE_SIZE` run ends waiting): the end is not sent; a
warning is logged and a ``failed`` ``webhook`` event with ``attempts: 0`` is recorded on
the conversation, so a client learns what it missed.

Delivery: at most :data:`MAX_CONCURRENT_DELIVERIES` at once, with one
:class:`httpx.AsyncClient` on the Trio thread (built on first use:
:class:`~app.lazy_client.LazyAsyncClient`). Why not a blocking client on the I/O
limiter: a receiver that takes ``webhook_timeout_seconds`` to answer would hold an I/O
thread that long, and eight slow receivers would stall every HTTP handler's store call;
the async request holds no thread, never blocks the Trio thread (every wait is a
checkpoint) and is cancelled at once. The dispatcher's *store* calls (reading the run,
recording the outcome) go through the I/O limiter. Each POST gets
``webhook_timeout_seconds``, answer included. 5xx, 408, 429, timeouts and connection errors
are retried up to ``webhook_max_attempts`` POSTs in all, after
``webhook_backoff_base_seconds * 2^retry`` (jittered 0.5x-1.5x; a ``Retry-After`` header
wins; both at most :data:`BACKOFF_MAX_SECONDS`). Any other answer is final. What is sent, to
which URLs, and how answers are judged: :mod:`app.live.webhook_policy`. Each delivery's
final outcome is recorded as one ``webhook`` event of the run (``delivered`` or ``failed``,
with the number of attempts), not one per attempt: a receiver that fails for an hour
should not flood the log the agent reads.

Ownership and cancellation:
    The supervisor's :class:`~app.live.hub.LiveHub` creates the dispatcher and adds
    :meth:`listen` to the store; the supervisor starts :meth:`WebhookDispatcher.serve` in
    its nursery. Deleting a conversation calls
    :meth:`forget`: its deliveries in flight are cancelled and nothing is recorded (the
    queued ones find the conversation gone). :meth:`aclose` (from the supervisor's drain,
    after every run's final status is committed) stops taking run ends; deliveries still
    queued or in flight get until the drain's deadline, at most one
    ``webhook_timeout_seconds``, with no more backoff waits; what is not delivered then is
    recorded ``failed`` with the error ``shutdown``. Nothing outlives ``aclose``.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import httpx
import trio

from app.backoff import backoff_seconds
from app.errors import NotFound
from app.events import Event, Source, StatusPayload, WebhookPayload
from app.lazy_client import LazyAsyncClient
from app.lifecycle import TERMINAL
from app.live.webhook_policy import (
    Attempt,
    build_client,
    delivery_body,
    delivery_headers,
    judge_answer,
)
from app.live.webhook_policy import check_webhook as check_webhook  # app.api imports it here
from app.records import ConversationRecord, RunRecord
from app.settings import Settings
from app.store.base import EventStore

log = logging.getLogger("trellis.webhooks")

#: Run ends waiting for a courier. A run end is ~100 bytes; 1,000 of them cover every run
#: slot (default 10) ending many times over while receivers are slow.
QUEUE_SIZE = 1000
#: Deliveries in flight at once; the queue waits behind them. Each holds a connection.
MAX_CONCURRENT_DELIVERIES = 16
#: The longest wait between two attempts, whatever the backoff or Retry-After says.
BACKOFF_MAX_SECONDS = 300.0
#: After the drain's deadline, how long recording the last outcomes may take before the
#: dispatcher gives up on them (each is one small transaction).
_RECORD_GRACE_SECONDS = 0.5

IO = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class RunEnd:
    """A run that ended; what the listener hands over."""

    conversation_id: str
    run_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a delivery ended."""

    outcome: Literal["delivered", "failed"]
    attempts: int
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookStatistics:
    """A snapshot: run ends queued, deliveries in flight, and outcomes so far."""

    queued: int
    in_flight: int
    delivered: int
    failed: int


class WebhookDispatcher:
    """Sends the webhooks of run ends (see the module docstring). Trio thread, except
    :meth:`listen`. ``io`` runs a blocking store call on the I/O limiter."""

    def __init__(self, settings: Settings, store: EventStore, io: IO) -> None:
        self.settings = settings
        self._store = store
        self._io = io
        self.queue_size = QUEUE_SIZE
        self._send, self._receive = trio.open_memory_channel[RunEnd](self.queue_size)
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._slots = trio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        self._scopes: dict[str, set[trio.CancelScope]] = {}  # by conversation
        self._deadline = math.inf  # set by aclose: when the last deliveries are cut
        self._http = LazyAsyncClient(partial(build_client, settings.webhook_timeout_seconds))
        self._in_flight = 0
        self._delivered = 0
        self._failed = 0
        self._idle = trio.Event()
        self._idle.set()
        self._done = trio.Event()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<WebhookDispatcher {s.queued} queued, {s.in_flight} in flight"
            f" | {s.delivered} delivered, {s.failed} failed>"
        )

    def statistics(self) -> WebhookStatistics:
        queued = self._receive.statistics().current_buffer_used
        return WebhookStatistics(queued, self._in_flight, self._delivered, self._failed)

    # -- intake ----------------------------------------------------------------------------

    def listen(self, events: list[Event]) -> None:
        """Store listener: hand the run ends among ``events`` to the Trio thread. Any
        thread, write lock held: never blocks. Without ``webhook_secret`` nothing can be
        signed (and no conversation can have been given a webhook): nothing to do."""
        if not self.settings.webhook_secret:
            return
        ends = [
            RunEnd(event.conversation_id, event.run_id)
            for event in events
            if event.run_id is not None
            and isinstance(event.payload, StatusPayload)
            and event.payload.status in TERMINAL
        ]
        token = self._token
        if ends and token is not None:
            try:
                token.run_sync_soon(self._enqueue, ends)
            except trio.RunFinishedError:
                self._token = None

    def _enqueue(self, ends: list[RunEnd]) -> None:
        for end in ends:
            cached = self._store.cached_conversation(end.conversation_id)
            if cached is not None and cached.webhook is None:
                continue  # most conversations: nothing to send, no queue slot used
            try:
                self._send.send_nowait(end)
            except (trio.WouldBlock, trio.ClosedResourceError):
                self._refuse(end)
            else:
                self._idle = trio.Event() if self._idle.is_set() else self._idle

    def _refuse(self, end: RunEnd) -> None:
        closed = self._nursery is None or self._token is None or self._deadline < math.inf
        reason = "shutdown" if closed else f"queue full ({self.queue_size} run ends waiting)"
        log.warning("webhook of run %s not sent: %s", end.run_id, reason)
        if self._nursery is not None and not closed:
            self._in_flight += 1  # not a courier, but wait_idle waits for its record
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._nursery.start_soon(self._record_refused, end, reason)

    async def _record_refused(self, end: RunEnd, reason: str) -> None:
        try:
            await self._record(end, None, Outcome("failed", 0, error=reason))
        finally:
            self._in_flight -= 1
            self._settle()

    # -- lifetime --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take run ends and deliver them until :meth:`aclose`. For ``nursery.start``."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                task_status.started()
                async for end in self._receive:
                    self._in_flight += 1  # before a checkpoint: wait_idle must see it
                    await self._slots.acquire()
                    nursery.start_soon(self._deliver, end)
        finally:
            self._token = None
            await self._http.aclose()
            self._done.set()

    async def aclose(self, deadline: float) -> None:
        """Stop taking run ends; give what is queued or in flight until ``deadline`` (and
        at most ``webhook_timeout_seconds``), then record it ``failed`` (``shutdown``).

        Idempotent. Cancellation: bounded by ``deadline`` plus a moment to record.
        """
        if self._nursery is None or self._done.is_set():
            return
        await self._flush()  # run ends already handed over are queued first
        self._token = None
        deadline = min(deadline, trio.current_time() + self.settings.webhook_timeout_seconds)
        self._deadline = min(self._deadline, deadline)
        for scopes in self._scopes.values():
            for scope in scopes:
                scope.deadline = min(scope.deadline, self._deadline)
        self._send.close()
        with trio.move_on_at(self._deadline + _RECORD_GRACE_SECONDS):
            await self._done.wait()
        if not self._done.is_set():
            log.error("webhook deliveries did not finish in time; dropped unrecorded")
            self._nursery.cancel_scope.cancel()
            await self._done.wait()

    def forget(self, conversation_id: str) -> None:
        """The conversation was deleted: cancel its deliveries; nothing is recorded."""
        for scope in self._scopes.get(conversation_id, ()):
            scope.cancel()

    async def wait_idle(self) -> None:
        """Return once every run end committed before this call has been delivered or
        given up on, and its outcome recorded."""
        await self._flush()
        while not self._idle.is_set():
            await self._idle.wait()

    async def _flush(self) -> None:
        token = self._token
        if token is not None:  # hops are FIFO: one queued now runs after the earlier ones
            hopped = trio.Event()
            token.run_sync_soon(hopped.set)
            await hopped.wait()

    # -- delivery --------------------------------------------------------------------------

    async def _deliver(self, end: RunEnd) -> None:
        """Read the run, POST until done, record the outcome. Never raises ``Exception``
        (a failure here must not take the supervisor's nursery down)."""
        try:
            found = await self._read(end)
            if found is not None:
                conversation, run = found
                assert conversation.webhook is not None
                url, delivery_id = conversation.webhook.url, str(uuid.uuid4())
                body = delivery_body(run, delivery_id)
                outcome = await self._attempts(end, url, delivery_id, body)
                if outcome is not None:
                    await self._record(end, (url, delivery_id), outcome)
        except Exception:
            log.exception("webhook of run %s failed unexpectedly", end.run_id)
        finally:
            self._in_flight -= 1
            self._slots.release()
            self._settle()

    def _settle(self) -> None:
        if self._in_flight == 0 and self._receive.statistics().current_buffer_used == 0:
            self._idle.set()

    async def _read(self, end: RunEnd) -> tuple[ConversationRecord, RunRecord] | None:
        def read() -> tuple[ConversationRecord, RunRecord]:
            conversation = self._store.get_conversation(end.conversation_id)
            return conversation, self._store.get_run(end.conversation_id, end.run_id)

        try:
            conversation, run = await self._io(read)
        except NotFound:
            return None  # deleted meanwhile: dropped quietly
        return (conversation, run) if conversation.webhook is not None else None

    async def _attempts(
        self, end: RunEnd, url: str, delivery_id: str, body: bytes
    ) -> Outcome | None:
        """POST ``body`` until delivered, refused or out of attempts; ``None`` when the
        conversation was deleted meanwhile (:meth:`forget`). ``attempts`` counts the POSTs
        started, one cut by the shutdown deadline included."""
        headers = delivery_headers(self.settings.webhook_secret, delivery_id, body)
        scope = trio.CancelScope(deadline=self._deadline)
        self._scopes.setdefault(end.conversation_id, set()).add(scope)
        attempts, last = 0, Attempt()
        try:
            with scope:
                client = await self._http.get()
                while True:
                    attempts += 1
                    last = await self._attempt(client, url, body, headers)
                    if last.error is None:
                        return Outcome("delivered", attempts, last.status_code)
                    if not last.retry or attempts >= self.settings.webhook_max_attempts:
                        return Outcome("failed", attempts, last.status_code, last.error)
                    if self._deadline < math.inf:
                        return Outcome("failed", attempts, last.status_code, "shutdown")
                    await trio.sleep(
                        backoff_seconds(
                            attempts - 1,
                            last.retry_after,
                            base_seconds=self.settings.webhook_backoff_base_seconds,
                            max_seconds=BACKOFF_MAX_SECONDS,
                        )
                    )
        finally:
            scopes = self._scopes[end.conversation_id]
            scopes.discard(scope)
            if not scopes:
                del self._scopes[end.conversation_id]
        if self._deadline < math.inf:  # cut by aclose's deadline
            return Outcome("failed", attempts, last.status_code, "shutdown")
        return None  # cancelled by forget()

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> Attempt:
        seconds = self.settings.webhook_timeout_seconds
        with trio.move_on_after(seconds):
            try:
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code  # the body is never read
            except httpx.RequestError as exc:
                return Attempt(error=f"cannot reach the receiver: {type(exc).__name__}", retry=True)
            return judge_answer(status, response.headers.get("Retry-After"))
        return Attempt(
            error=f"no answer within webhook_timeout_seconds ({seconds:g} s)", retry=True
        )

    async def _record(self, end: RunEnd, sent: tuple[str, str] | None, outcome: Outcome) -> None:
        """Append the outcome as a ``webhook`` event of the run (shielded; skipped when
        the conversation is gone). ``sent``: the URL and delivery id, if it got that far."""
        if outcome.outcome == "delivered":
            self._delivered += 1
        else:
            self._failed += 1
        with trio.CancelScope(shield=True):
            if sent is None:  # refused before reading the conversation
                try:
                    conversation = await self._io(self._store.get_conversation, end.conversation_id)
                except NotFound:
                    return
                if conversation.webhook is None:
                    return
                sent = (conversation.webhook.url, str(uuid.uuid4()))
            url, delivery_id = sent
            payload = WebhookPayload(
                delivery_id=delivery_id,
                url=url,
                attempts=outcome.attempts,
                status_code=outcome.status_code,
                outcome=outcome.outcome,
                error=outcome.error,
            )
            log_as = log.info if outcome.outcome == "delivered" else log.warning
            log_as(
                "webhook of run %s %s after %d attempt(s)%s",
                end.run_id,
                outcome.outcome,
                outcome.attempts,
                f": {outcome.error}" if outcome.error else "",
            )
            try:
                await self._io(
                    self._store.append_event,
                    end.conversation_id,
                    end.run_id,
                    Source.SYSTEM,
                    payload,
                )
            except NotFound:
                pass  # deleted meanwhile
            except Exception:
                log.exception("could not record the webhook outcome of run %s", end.run_id)
