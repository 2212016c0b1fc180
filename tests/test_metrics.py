"""GET /metrics over real HTTP: live gauges equal /api/server, histograms count what
happened, labels stay bounded, and each app has a registry of its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.agents.llm import LLMSpec
from app.events import MessagePayload, Source
from app.live.feed import StreamEnd
from app.settings import LLMSettings, Settings
from app.testing import FakeChatServer, Gates, error_reply, gated_registry, text_reply
from tests.conftest import gated, script
from tests.live import LiveServer, live_server
from tests.test_server_stream import server_stream

pytestmark = pytest.mark.timeout(30)

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
CONVERSATION_ROUTE = "/api/conversations/<conversation_id>"


class Scrape:
    """One parsed exposition: every sample, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The one sample called ``name`` with these labels (others may differ); 0 if none."""
        found = self.matching(name, **labels)
        assert len(found) <= 1, found
        return found[0].value if found else 0.0


async def scrape(server: LiveServer) -> Scrape:
    response = await server.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == TEXT_FORMAT
    return Scrape(response.text)


async def create(server: LiveServer, agent: dict[str, Any], **fields: Any) -> tuple[str, str]:
    """A conversation with a run started: (conversation id, run id)."""
    response = await server.client.post(
        "/api/conversations", json={"agent": agent, "run": True, **fields}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], body["run"]["id"]


async def wait_ended(server: LiveServer, conversation_id: str, run_id: str) -> dict[str, Any]:
    response = await server.client.get(
        f"/api/conversations/{conversation_id}/runs/{run_id}/wait", params={"timeout": 15}
    )
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()
    return run


@pytest.fixture
def provider() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


async def test_metrics_live_gauges_match_api_server_while_runs_queue(
    settings: Settings, gates: Gates
) -> None:
    """With more runs than slots held mid-step, the run, limit and limiter gauges are the
    numbers /api/server shows; once the runs finished, the queue-wait and run-duration
    histograms hold one observation per run."""
    async with live_server(settings, gated_registry(gates)) as server:
        started = [await create(server, gated("a")) for _ in range(4)]  # 2 slots
        await gates["a"].wait_entered(2)
        metrics = await scrape(server)
        stats = (await server.client.get("/api/server")).json()["statistics"]
        assert (stats["running"], stats["queued"], stats["waiting_for_slot"]) == (2, 2, 2)
        for name, field in [
            ("trellis_runs_running", "running"),
            ("trellis_runs_queued", "queued"),
            ("trellis_runs_waiting_for_slot", "waiting_for_slot"),
            ("trellis_run_threads_alive", "run_threads_alive"),
            ("trellis_max_concurrent_runs", "max_concurrent_runs"),
            ("trellis_max_queued_runs", "max_queued_runs"),
            ("trellis_draining", "draining"),
        ]:
            assert metrics.value(name) == stats[field], name
        for limiter in ("io", "tool"):
            assert (
                metrics.value("trellis_limiter_tokens", limiter=limiter)
                == (stats[f"{limiter}_total"])
            )
            assert (
                metrics.value("trellis_limiter_borrowed", limiter=limiter)
                == (stats[f"{limiter}_borrowed"])
            )
            assert (
                metrics.value("trellis_limiter_waiting", limiter=limiter)
                == (stats[f"{limiter}_waiting"])
            )
        assert metrics.value("trellis_run_queue_wait_seconds_count") == 2  # the seated ones
        gates["a"].release()
        for conversation_id, run_id in started:
            assert (await wait_ended(server, conversation_id, run_id))["status"] == "finished"
        metrics = await scrape(server)
        assert metrics.value("trellis_runs_running") == 0
        assert metrics.value("trellis_run_queue_wait_seconds_count") == 4
        assert metrics.value("trellis_run_duration_seconds_count", status="finished") == 4
        assert metrics.value("trellis_run_duration_seconds_sum", status="finished") > 0


@pytest.mark.parametrize("action", ["interrupt", "pause"])
async def test_metrics_stop_latency_is_observed_once_per_stopped_run(
    settings: Settings, gates: Gates, action: str
) -> None:
    """An interrupt (mid-step) or a pause (at the next step boundary) of a running run is
    one observation of the stop latency, labelled with the action, once its thread
    returned; a queued run stopped with it had no thread and is not timed."""
    async with live_server(settings, gated_registry(gates)) as server:
        conversation_id, run_id = await create(server, gated("a", "b"))
        await gates["a"].wait_entered()
        queued = await server.client.post(
            f"/api/conversations/{conversation_id}/runs", json={"if_busy": "enqueue"}
        )
        assert queued.status_code == 202, queued.text
        response = await server.client.post(f"/api/conversations/{conversation_id}/{action}")
        assert response.status_code == 202, response.text
        gates["a"].release()  # a pause stops at the boundary after this step
        run = await wait_ended(server, conversation_id, run_id)
        assert (run["status"], run["reason"]) == ("paused", action)
        await wait_ended(server, conversation_id, queued.json()["id"])
        metrics = await scrape(server)
        assert metrics.value("trellis_run_stop_latency_seconds_count", action=action) == 1
        assert metrics.value("trellis_run_stop_latency_seconds_sum", action=action) > 0
        assert len(metrics.matching("trellis_run_stop_latency_seconds_count")) == 1
        assert metrics.value("trellis_run_duration_seconds_count", status="paused") == 1


async def test_metrics_an_interrupt_by_if_busy_interrupt_is_timed(
    settings: Settings, gates: Gates
) -> None:
    """A new run started with ``if_busy=interrupt`` interrupts the running one: that stop
    is one observation of the stop latency labelled ``interrupt``, as an interrupt request
    is; the new run, which was not stopped, adds none."""
    async with live_server(settings, gated_registry(gates)) as server:
        conversation_id, run_id = await create(server, gated("a"))
        await gates["a"].wait_entered()
        replacing = await server.client.post(
            f"/api/conversations/{conversation_id}/runs", json={"if_busy": "interrupt"}
        )
        assert replacing.status_code == 202, replacing.text
        run = await wait_ended(server, conversation_id, run_id)
        assert (run["status"], run["reason"]) == ("paused", "interrupt")
        gates["a"].release()
        new_run = await wait_ended(server, conversation_id, replacing.json()["id"])
        assert new_run["status"] == "finished"
        metrics = await scrape(server)
        assert metrics.value("trellis_run_stop_latency_seconds_count", action="interrupt") == 1
        assert metrics.value("trellis_run_stop_latency_seconds_sum", action="interrupt") > 0
        assert len(metrics.matching("trellis_run_stop_latency_seconds_count")) == 1


async def test_metrics_http_latency_is_labelled_by_route_template_and_status(
    settings: Settings,
) -> None:
    """Requests are counted under their route template, never the raw path or id; a path
    that matches no route and an unknown method get fixed labels."""
    async with live_server(settings) as server:
        conversation_id, run_id = await create(server, script({"say": "hi"}))
        await wait_ended(server, conversation_id, run_id)
        assert (await server.client.get(f"/api/conversations/{conversation_id}")).is_success
        missing = await server.client.get("/api/conversations/no-such-id")
        assert missing.status_code == 404
        assert (await server.client.get("/no/such/path/4711")).status_code == 404
        assert (await server.client.request("BREW", "/health")).status_code == 405
        metrics = await scrape(server)
        name = "trellis_http_request_duration_seconds_count"
        assert metrics.value(name, method="GET", route=CONVERSATION_ROUTE, status="200") == 1
        assert metrics.value(name, method="GET", route=CONVERSATION_ROUTE, status="404") == 1
        assert metrics.value(name, method="POST", route="/api/conversations", status="201") == 1
        assert metrics.value(name, method="GET", route="unmatched", status="404") == 1
        assert metrics.value(name, method="other", route="unmatched", status="405") == 1
        routes = {s.labels["route"] for s in metrics.matching(name)}
        assert not any(conversation_id in r or "no-such-id" in r or "4711" in r for r in routes)
        assert metrics.families["trellis_http_request_duration_seconds"].documentation


async def test_metrics_events_appended_count_every_stored_event_by_kind(
    settings: Settings,
) -> None:
    """The events counter, by kind, equals the events the store holds."""
    async with live_server(settings) as server:
        steps = [{"say": "one"}, {"tool": "finish", "args": {"message": "done"}}]
        conversation_id, run_id = await create(server, script(*steps), initial_message="go")
        await wait_ended(server, conversation_id, run_id)
        listed = await server.client.get(
            f"/api/conversations/{conversation_id}/events", params={"limit": 1000}
        )
        stored = Counter(event["kind"] for event in listed.json()["items"])
        metrics = await scrape(server)
        counted = {
            s.labels["kind"]: s.value
            for s in metrics.matching("trellis_events_appended_total")
            if s.value
        }
        assert counted == stored
        assert len(stored) >= 3  # message, status, action/observation: a real mix


def stream_counts(metrics: Scrape, feed: str) -> tuple[float, float]:
    """(open subscriptions, drops) of one feed."""
    return (
        metrics.value("trellis_stream_subscribers", feed=feed),
        metrics.value("trellis_stream_drops_total", feed=feed),
    )


async def test_metrics_a_dropped_slow_subscriber_is_counted(
    settings: Settings, gates: Gates
) -> None:
    """A conversation subscription that falls behind is dropped (slow_consumer): its
    feed's subscriber gauge goes back down and its drop counter goes up by one; the
    server feed's series stay apart, at 0."""
    settings = settings.model_copy(update={"stream_buffer_events": 3})
    async with live_server(settings, gated_registry(gates)) as server:
        sup = server.supervisor
        conversation_id, _ = await create(server, gated("slow"))
        await gates["slow"].wait_entered()
        with sup.feed.subscribe(conversation_id) as subscription:
            metrics = await scrape(server)
            assert stream_counts(metrics, "conversation") == (1, 0)
            assert stream_counts(metrics, "server") == (0, 0)
            for i in range(5):  # nobody reads
                await sup.io(
                    sup.store.append_event,
                    conversation_id,
                    None,
                    Source.USER,
                    MessagePayload(text=f"m{i}"),
                )
            await sup.feed.flush()
            assert subscription.ended == StreamEnd("slow_consumer")
            metrics = await scrape(server)
        assert stream_counts(metrics, "conversation") == (0, 1)
        assert stream_counts(metrics, "server") == (0, 0)
        gates["slow"].release()


async def test_metrics_a_dropped_server_stream_subscriber_is_counted(
    settings: Settings,
) -> None:
    """A client of GET /api/events/stream that falls ``stream_buffer_events`` frames behind
    is dropped (slow_consumer): the server feed's subscriber gauge goes back down and its
    drop counter goes up by one; the conversation feed's series stay at 0."""
    settings = settings.model_copy(update={"stream_buffer_events": 3})
    async with live_server(settings) as server:
        sup = server.supervisor
        async with server_stream(server) as frames:
            assert (await frames.next())["event"] == "snapshot"
            metrics = await scrape(server)
            assert stream_counts(metrics, "server") == (1, 0)
            await trio.testing.wait_all_tasks_blocked()  # the stream waits for its next frame
            for limit in range(4, 9):  # five frames in one step: nobody reads meanwhile
                sup.set_limits(max_queued_runs=limit)
            frame = await frames.next()
            while frame.get("event") != "end":
                frame = await frames.next()
        assert frame["data"]["reason"] == "slow_consumer"
        metrics = await scrape(server)
        assert stream_counts(metrics, "server") == (0, 1)
        assert stream_counts(metrics, "conversation") == (0, 0)


async def test_metrics_llm_requests_retries_and_tokens(
    settings: Settings, provider: FakeChatServer
) -> None:
    """An llm run whose first request gets a 500 counts two requests and one retry for
    its provider, and the tokens its llm_call event records."""
    settings = settings.model_copy(
        update={"llm": LLMSettings(base_url=provider.url, max_retries=2, backoff_base_seconds=0.01)}
    )
    provider.add(error_reply(500, "busy"), text_reply("hi", prompt_tokens=11, completion_tokens=7))
    agent: dict[str, Any] = {"kind": "llm", "model": "test-model", "tools": []}
    if "stream" in LLMSpec.model_fields:  # a plain JSON answer, streaming or not
        agent["stream"] = False
    async with live_server(settings) as server:
        conversation_id, run_id = await create(server, agent, initial_message="hello")
        assert (await wait_ended(server, conversation_id, run_id))["status"] == "finished"
        metrics = await scrape(server)
    assert metrics.value("trellis_llm_requests_total", provider="default") == 2
    assert metrics.value("trellis_llm_retries_total", provider="default") == 1
    assert metrics.value("trellis_llm_tokens_total", type="prompt") == 11
    assert metrics.value("trellis_llm_tokens_total", type="completion") == 7


async def test_metrics_two_apps_in_one_process_count_apart(settings: Settings) -> None:
    """Each app exports its own registry (never the process-wide default one): requests
    to one app do not show in the other's metrics."""
    other_settings = settings.model_copy(update={"data_dir": settings.data_dir / "other"})
    async with live_server(settings) as first, live_server(other_settings) as second:
        for _ in range(3):
            assert (await first.client.get("/health")).status_code == 200
        name = "trellis_http_request_duration_seconds_count"
        health = {"method": "GET", "route": "/health", "status": "200"}
        assert (await scrape(first)).value(name, **health) == 3
        assert (await scrape(second)).value(name, **health) == 0
        registries = {id(s.supervisor.metrics.registry) for s in (first, second)}
        assert len(registries) == 2 and id(REGISTRY) not in registries
    assert REGISTRY.get_sample_value("trellis_runs_running") is None


async def test_metrics_answers_openmetrics_when_asked(settings: Settings) -> None:
    """A scraper asking for OpenMetrics (as Prometheus does) gets it."""
    async with live_server(settings) as server:
        response = await server.client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "trellis_runs_running" in response.text
