"""Prometheus metrics: what ``GET /metrics`` exports, one registry per supervisor.

The numbers come from two places, and none is counted twice:

* **Live state** is *read at scrape time* by :class:`LiveCollector` from the objects that
  own it: runs running and queued, the limits and the io/tool limiters
  (``supervisor.statistics()``, the very record ``GET /api/server`` shows), stream
  subscribers and slow-consumer drops (each feed: the conversations' and the server's,
  labelled ``feed``), and each llm provider's requests and retries
  (``ProviderClient.statistics()``).
* **What happens** is *observed when it happens* by the counters and histograms of
  :class:`Metrics`: how long a run waited for its slot and how long it ran, how long a pause
  or an interrupt took to bring the run's thread back, how long HTTP requests took, which
  events were appended and the llm tokens they record.

Hot paths stay cheap: an observation is O(1) (a bucket search and an add under a lock), and
labels only take values from small fixed sets — route templates (never raw paths), event
kinds, run end statuses, never a conversation or run id — so that the number of series
stays bounded whatever clients send.

Ownership: each :class:`~app.supervisor.RunSupervisor` owns one :class:`Metrics` with its own
:class:`~prometheus_client.CollectorRegistry` — never the process-wide default one, so two
apps (or supervisors) in one process count apart. The app observes its HTTP requests into
its supervisor's metrics. Nothing here owns a task or a thread, and nothing blocks.

Threads: counters and histograms are thread-safe (the store calls :meth:`Metrics.
events_appended` from whatever thread committed). The live collector reads state that
belongs to the Trio thread, so :meth:`Metrics.exposition` is called there (it is quick: a
few dozen series).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.events import EVENT_KINDS, Event, LLMCallPayload

if TYPE_CHECKING:
    from app.handles import RunHandle
    from app.supervisor import RunSupervisor

# Bucket bounds, in seconds. HTTP answers take milliseconds (a store read through the io
# limiter is ~1 ms) up to the /wait long poll; a run waits for its slot from nothing to the
# length of the runs ahead of it, and runs for seconds to hours; a stop takes milliseconds
# (interrupt's target is 50 ms) up to the step a pause waits for.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
RUN_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400)
STOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300)

#: The route label of a request that matched no route (a 404 or 405): one fixed value,
#: whatever path was asked for.
UNMATCHED_ROUTE = "unmatched"
#: Methods counted under their own name; any other (clients may send any token) is "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: How a run's end is labelled (``RunControl.ended_as`` is ``status/reason``).
RUN_END_STATUSES = frozenset({"finished", "paused", "error"})


class Metrics:
    """The counters and histograms of one supervisor, in a registry of their own.

    Observations are made where things happen (``app/run_task.py``, the supervisor's pause
    and interrupt, the interrupt of an admission with ``if_busy=interrupt``
    (``app/admission.py``), ``app/web.py``'s request hook, the store's commit listener); the
    live gauges join with :meth:`collect_live`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.queue_wait = Histogram(
            "trellis_run_queue_wait_seconds",
            "Time from a run's admission until it got a run slot (runs that got one).",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.run_duration = Histogram(
            "trellis_run_duration_seconds",
            "Time from a run getting its slot until its end was recorded, by end status.",
            ["status"],
            buckets=RUN_DURATION_BUCKETS,
            registry=registry,
        )
        self.stop_latency = Histogram(
            "trellis_run_stop_latency_seconds",
            "Time from a pause or interrupt request until the run's thread returned.",
            ["action"],
            buckets=STOP_BUCKETS,
            registry=registry,
        )
        self.http_duration = Histogram(
            "trellis_http_request_duration_seconds",
            "Time until an HTTP response started, by method, route template and status.",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        events = Counter(
            "trellis_events_appended",
            "Events committed to the store, by kind.",
            ["kind"],
            registry=registry,
        )
        tokens = Counter(
            "trellis_llm_tokens",
            "Tokens used by llm requests (as recorded in llm_call events), by type.",
            ["type"],
            registry=registry,
        )
        # Children made once: per event, a dict lookup and an add.
        self._events = {kind: events.labels(kind) for kind in EVENT_KINDS}
        self._prompt_tokens = tokens.labels("prompt")
        self._completion_tokens = tokens.labels("completion")
        #: run id -> (action, when requested): pauses and interrupts waiting for a thread.
        #: Trio thread only; entries leave when the thread returns (or the run never had one).
        self._stops: dict[str, tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"<Metrics {len(self._stops)} stop(s) pending>"

    def collect_live(self, supervisor: RunSupervisor) -> None:
        """Export ``supervisor``'s live state too, read at each scrape."""
        self.registry.register(LiveCollector(supervisor))

    # -- runs (Trio thread) ----------------------------------------------------------------

    def run_seated(self, waited_seconds: float) -> None:
        """A run got its slot after waiting ``waited_seconds`` since its admission."""
        self.queue_wait.observe(waited_seconds)

    def run_ended(self, ended_as: str | None, ran_seconds: float) -> None:
        """A run that had a slot ended (``ended_as``: ``status/reason``, as recorded)."""
        status = (ended_as or "").partition("/")[0]
        self.run_duration.labels(status if status in RUN_END_STATUSES else "unknown").observe(
            ran_seconds
        )

    def stop_requested(self, handles: Iterable[RunHandle], action: str) -> None:
        """A pause or an interrupt was asked of these runs: start the clock of each that
        holds a slot (its thread runs or is about to; the first request counts). A run
        without a slot has no thread to wait for: it is not timed."""
        now = time.monotonic()
        for handle in handles:
            if handle.holds_slot:
                self._stops.setdefault(handle.run_id, (action, now))

    def thread_returned(self, run_id: str) -> None:
        """The run's thread has returned: observe how long the stop asked of it took."""
        stop = self._stops.pop(run_id, None)
        if stop is not None:
            action, requested = stop
            self.stop_latency.labels(action).observe(time.monotonic() - requested)

    def forget_stop(self, run_id: str) -> None:
        """The run gave its slot back without starting a thread: nothing to observe."""
        self._stops.pop(run_id, None)

    # -- events (any thread) ---------------------------------------------------------------

    def events_appended(self, events: Sequence[Event]) -> None:
        """The store's commit listener: count each event by kind, and llm tokens. Never
        blocks (the store's write lock is held)."""
        for event in events:
            payload = event.payload
            self._events[payload.kind].inc()
            if isinstance(payload, LLMCallPayload):
                self._prompt_tokens.inc(payload.prompt_tokens)
                self._completion_tokens.inc(payload.completion_tokens)

    # -- HTTP and scrapes (Trio thread) ----------------------------------------------------

    def observe_http(self, method: str, rule: str | None, status: int, seconds: float) -> None:
        """An HTTP response started ``seconds`` after its request arrived. ``rule`` is the
        matched route's template (``/api/conversations/<conversation_id>``), never the path;
        ``None`` for a request that matched no route."""
        self.http_duration.labels(
            method if method in HTTP_METHODS else "other",
            rule if rule is not None else UNMATCHED_ROUTE,
            str(status),
        ).observe(seconds)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Every metric, encoded as the ``Accept`` header prefers — Prometheus text format
        0.0.4 by default, OpenMetrics when asked — and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class LiveCollector(Collector):
    """Reads the supervisor's live numbers at each scrape (Trio thread)."""

    def __init__(self, supervisor: RunSupervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        sup = self._supervisor
        stats = sup.statistics()
        for name, help_text, field in _RUN_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=float(getattr(stats, field)))
        for name, help_text, io_field, tool_field in _LIMITER_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=["limiter"])
            family.add_metric(["io"], getattr(stats, io_field))
            family.add_metric(["tool"], getattr(stats, tool_field))
            yield family
        yield from _stream_families(sup)
        yield from _provider_families(sup)


#: (metric, help, field of SupervisorStatistics): the numbers GET /api/server shows.
_RUN_GAUGES = (
    ("trellis_runs_running", "Runs holding a run slot.", "running"),
    (
        "trellis_runs_queued",
        "Runs waiting for a run slot or for an earlier run of their conversation.",
        "queued",
    ),
    (
        "trellis_runs_waiting_for_slot",
        "The part of the queued runs that waits in line for a run slot.",
        "waiting_for_slot",
    ),
    ("trellis_run_threads_alive", "Run threads that have not returned.", "run_threads_alive"),
    ("trellis_max_concurrent_runs", "Run slots (max_concurrent_runs).", "max_concurrent_runs"),
    ("trellis_max_queued_runs", "Queue bound (max_queued_runs).", "max_queued_runs"),
    ("trellis_draining", "1 while the server drains, else 0.", "draining"),
)
#: (metric, help, io field, tool field) of SupervisorStatistics, labelled limiter="io"|"tool".
_LIMITER_GAUGES = (
    ("trellis_limiter_borrowed", "Tokens borrowed from a thread limiter.", "io_borrowed",
     "tool_borrowed"),
    ("trellis_limiter_tokens", "Tokens of a thread limiter (io_threads, tool_threads).",
     "io_total", "tool_total"),
    ("trellis_limiter_waiting", "Tasks waiting for a token of a thread limiter.", "io_waiting",
     "tool_waiting"),
)  # fmt: skip


def _stream_families(sup: RunSupervisor) -> Iterable[Metric]:
    """Subscriptions and slow-consumer drops of each feed: ``feed="conversation"`` (the
    conversation streams, SSE and WebSocket) and ``feed="server"`` (``/api/events/stream``)."""
    subscribers = GaugeMetricFamily(
        "trellis_stream_subscribers", "Open event stream subscriptions, by feed.", labels=["feed"]
    )
    drops = CounterMetricFamily(
        "trellis_stream_drops",
        "Stream subscriptions ended because their reader fell behind (slow_consumer), by feed.",
        labels=["feed"],
    )
    for label, feed in (("conversation", sup.feed), ("server", sup.server_feed)):
        subscribers.add_metric([label], len(feed))
        drops.add_metric([label], feed.drops)
    yield subscribers
    yield drops


def _provider_families(sup: RunSupervisor) -> Iterable[Metric]:
    """Each llm provider's requests and retries, as counted by its own client."""
    requests = CounterMetricFamily(
        "trellis_llm_requests",
        "HTTP requests made to an llm provider, retries included.",
        labels=["provider"],
    )
    retries = CounterMetricFamily(
        "trellis_llm_retries",
        "llm requests retried after a 429, a 5xx, a transport error or a timeout.",
        labels=["provider"],
    )
    providers = sup.registry.providers
    if providers is not None:
        for name in providers.names:
            stats = providers.get(name).statistics()
            requests.add_metric([name], stats.requests)
            retries.add_metric([name], stats.retries)
    yield requests
    yield retries
