"""Webhooks (``app/live/webhooks.py``) over real HTTP both ways: the server on Hypercorn, and
a local receiver (``http.server`` in a thread) that answers what each test scripts."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio

from app.events import WebhookPayload
from app.live import webhooks
from app.live.webhook_policy import url_problem
from app.settings import Settings
from app.store import EventQuery, SqliteStore
from tests.live import LiveServer, live_server

pytestmark = pytest.mark.timeout(30)

SECRET = "whsec-test-0123456789"
FINISH = {"kind": "script", "steps": [{"say": "hi"}, {"finish": "done"}]}


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP server on 127.0.0.1:0: answers the n-th POST with ``statuses[n]`` (the
    last one again when they run out); POSTs whose number is in ``held`` wait for
    :meth:`release` first (a receiver that hangs)."""

    def __init__(self) -> None:
        self.statuses: list[int] = [200]
        self.held: set[int] = set()
        self.requests: list[Received] = []
        self._arrived = threading.Condition()
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.receiver = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def arrive(self, received: Received) -> int:
        with self._arrived:
            self.requests.append(received)
            self._arrived.notify_all()
            return len(self.requests) - 1

    def answer(self, index: int) -> int:
        if index in self.held:
            self._released.wait(timeout=30)
        return self.statuses[min(index, len(self.statuses) - 1)]

    def release(self) -> None:
        self._released.set()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Let held POSTs answer, stop serving, join the server thread."""
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    async def wait_requests(self, count: int) -> None:
        """Wait (from Trio) until ``count`` POSTs have arrived."""

        def wait() -> None:
            with self._arrived:
                self._arrived.wait_for(lambda: len(self.requests) >= count)

        await trio.to_thread.run_sync(wait, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        receiver: Receiver = self.server.receiver  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        index = receiver.arrive(Received(self.path, dict(self.headers.items()), body))
        status = receiver.answer(index)
        try:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the client gave up (a timeout test)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    receiver.start()
    yield receiver
    receiver.close()


def hook_settings(tmp_path: Path, receiver: Receiver, **fields: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "webhook_allowed_urls": [f"{receiver.url}/hooks/"],
        "webhook_secret": SECRET,
        "webhook_backoff_base_seconds": 0.001,  # no sleeping in tests
        "webhook_timeout_seconds": 5.0,
        **fields,
    }
    return Settings(**values)


async def create(server: LiveServer, url: str, agent: dict[str, Any] = FINISH) -> dict[str, Any]:
    response = await server.client.post(
        "/api/conversations", json={"agent": agent, "webhook": {"url": url}}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def run_to_end(server: LiveServer, conversation_id: str) -> dict[str, Any]:
    """Start a run and wait for its end; the run's record."""
    base = f"/api/conversations/{conversation_id}/runs"
    run = (await server.client.post(base, json={})).json()
    ended = await server.client.get(f"{base}/{run['id']}/wait", params={"timeout": 10})
    assert ended.status_code == 200, ended.text
    record: dict[str, Any] = ended.json()
    return record


async def webhook_events(server: LiveServer, conversation_id: str) -> list[dict[str, Any]]:
    await server.supervisor.webhooks.wait_idle()
    response = await server.client.get(
        f"/api/conversations/{conversation_id}/events", params={"kind": "webhook"}
    )
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# -- delivery ------------------------------------------------------------------------------


async def test_webhook_retries_until_accepted_with_one_signed_delivery(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A receiver failing twice then accepting gets three identical signed POSTs; one
    ``delivered`` event with 3 attempts is recorded on the run."""
    receiver.statuses = [500, 503, 200]
    async with live_server(hook_settings(tmp_path, receiver)) as server:
        conversation = await create(server, f"{receiver.url}/hooks/a?x=1")
        assert conversation["webhook"] == {"url": f"{receiver.url}/hooks/a?x=1"}
        run = await run_to_end(server, conversation["id"])
        events = await webhook_events(server, conversation["id"])

    assert len(receiver.requests) == 3
    first = receiver.requests[0]
    assert first.path == "/hooks/a?x=1"
    assert {r.body for r in receiver.requests} == {first.body}
    assert {r.headers["Trellis-Delivery"] for r in receiver.requests} == {
        first.headers["Trellis-Delivery"]
    }
    expected = hmac.new(SECRET.encode(), first.body, hashlib.sha256).hexdigest()
    assert first.headers["Trellis-Signature"] == f"sha256={expected}"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith("trellis/")
    body = json.loads(first.body)
    assert body == {
        "delivery_id": first.headers["Trellis-Delivery"],
        "conversation_id": conversation["id"],
        "run_id": run["id"],
        "status": "finished",
        "reason": run["reason"],
        "queued_at": run["queued_at"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "queue_wait_ms": body["queue_wait_ms"],
        "duration_ms": body["duration_ms"],
        "steps": 2,
    }
    assert body["queue_wait_ms"] >= 0 and body["duration_ms"] >= 0
    [event] = events
    assert event["run_id"] == run["id"] and event["source"] == "system"
    payload = WebhookPayload.model_validate(event["payload"])
    assert payload == WebhookPayload(
        delivery_id=first.headers["Trellis-Delivery"],
        url=f"{receiver.url}/hooks/a?x=1",
        attempts=3,
        status_code=200,
        outcome="delivered",
    )


@pytest.mark.parametrize(
    ("statuses", "posts", "error"),
    [
        pytest.param([500], 3, "the receiver answered 500", id="always-500-gives-up"),
        pytest.param([404], 1, "the receiver answered 404", id="4xx-is-final"),
        pytest.param([302], 1, "(redirects are not followed)", id="redirect-not-followed"),
        pytest.param([429, 200], 2, None, id="429-is-retried"),
    ],
)
async def test_webhook_final_outcome_after_retries(
    tmp_path: Path, receiver: Receiver, statuses: list[int], posts: int, error: str | None
) -> None:
    """5xx and 429 are retried up to webhook_max_attempts; another 4xx or a redirect ends
    the delivery at once; the outcome is one event."""
    receiver.statuses = statuses
    settings = hook_settings(tmp_path, receiver, webhook_max_attempts=3)
    async with live_server(settings) as server:
        conversation = await create(server, f"{receiver.url}/hooks/")
        await run_to_end(server, conversation["id"])
        [event] = await webhook_events(server, conversation["id"])
    assert len(receiver.requests) == posts
    payload = event["payload"]
    assert payload["attempts"] == posts
    assert payload["status_code"] == statuses[min(posts, len(statuses)) - 1]
    if error is None:
        assert payload["outcome"] == "delivered"
    else:
        assert payload["outcome"] == "failed"
        assert error in payload["error"]


async def test_webhook_timeout_is_retried(tmp_path: Path, receiver: Receiver) -> None:
    """A POST left unanswered past webhook_timeout_seconds is retried; the next one lands."""
    receiver.held = {0}  # the first POST never gets an answer (until the test ends)
    settings = hook_settings(tmp_path, receiver, webhook_timeout_seconds=0.2)
    async with live_server(settings) as server:
        conversation = await create(server, f"{receiver.url}/hooks/")
        await run_to_end(server, conversation["id"])
        [event] = await webhook_events(server, conversation["id"])
    assert event["payload"]["outcome"] == "delivered"
    assert event["payload"]["attempts"] == 2
    assert len(receiver.requests) == 2


async def test_webhook_slow_receiver_delays_neither_run_nor_requests(
    tmp_path: Path, receiver: Receiver
) -> None:
    """While the receiver hangs, the run has ended, reads answer, the next run runs, and the
    delivery holds no I/O thread; released, it is delivered."""
    receiver.held = {0, 1}
    async with live_server(hook_settings(tmp_path, receiver)) as server:
        conversation = await create(server, f"{receiver.url}/hooks/")
        first = await run_to_end(server, conversation["id"])
        assert first["status"] == "finished"
        with trio.fail_after(5):
            await receiver.wait_requests(1)
        read = await server.client.get(f"/api/conversations/{conversation['id']}")
        assert read.json()["status"] == "finished"
        second = await run_to_end(server, conversation["id"])  # not queued behind the POST
        assert second["status"] == "finished"
        with trio.fail_after(5):
            await receiver.wait_requests(2)
        webhooks = server.supervisor.webhooks.statistics()
        assert (webhooks.in_flight, webhooks.delivered) == (2, 0)
        assert server.supervisor.io_limiter.statistics().borrowed_tokens == 0
        receiver.release()
        events = await webhook_events(server, conversation["id"])
    assert sorted(e["run_id"] for e in events) == sorted([first["id"], second["id"]])
    assert {e["payload"]["outcome"] for e in events} == {"delivered"}


async def test_webhook_queue_full_records_the_unsent_end(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the queue's bound a run end is not sent: it is recorded ``failed`` with 0
    attempts and the reason; the ends already queued are delivered."""
    monkeypatch.setattr(webhooks, "QUEUE_SIZE", 1)
    monkeypatch.setattr(webhooks, "MAX_CONCURRENT_DELIVERIES", 1)
    receiver.held = {0}
    async with live_server(hook_settings(tmp_path, receiver)) as server:
        conversation = await create(server, f"{receiver.url}/hooks/")
        runs = [await run_to_end(server, conversation["id"])]
        with trio.fail_after(5):
            await receiver.wait_requests(1)  # 1st: in flight (the one slot)
        for _ in range(3):  # 2nd: taken, waits for the slot; 3rd: queued; 4th: refused
            runs.append(await run_to_end(server, conversation["id"]))
        receiver.release()
        events = await webhook_events(server, conversation["id"])
    outcomes = {e["run_id"]: e["payload"] for e in events}
    assert [outcomes[run["id"]]["outcome"] for run in runs] == ["delivered"] * 3 + ["failed"]
    refused = outcomes[runs[3]["id"]]
    assert refused["attempts"] == 0
    assert refused["error"] == "queue full (1 run ends waiting)"
    assert len(receiver.requests) == 3


async def test_webhook_delete_drops_pending_delivery(tmp_path: Path, receiver: Receiver) -> None:
    """Deleting a conversation cancels its delivery in flight; nothing is recorded."""
    receiver.held = {0}
    async with live_server(hook_settings(tmp_path, receiver)) as server:
        conversation = await create(server, f"{receiver.url}/hooks/")
        await run_to_end(server, conversation["id"])
        with trio.fail_after(5):
            await receiver.wait_requests(1)
        deleted = await server.client.delete(f"/api/conversations/{conversation['id']}")
        assert deleted.status_code == 204
        webhooks = server.supervisor.webhooks
        await webhooks.wait_idle()
        stats = webhooks.statistics()
        assert (stats.in_flight, stats.delivered, stats.failed) == (0, 0, 0)


async def test_webhook_shutdown_cuts_delivery_and_records_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A delivery still waiting for its receiver at shutdown is cut within the grace period
    and recorded ``failed`` with the error ``shutdown``."""
    receiver.held = {0}
    settings = hook_settings(
        tmp_path, receiver, shutdown_grace_seconds=0.5, webhook_timeout_seconds=30.0
    )
    async with live_server(settings) as server:
        conversation = await create(server, f"{receiver.url}/hooks/")
        await run_to_end(server, conversation["id"])
        with trio.fail_after(5):
            await receiver.wait_requests(1)
        stopping = trio.current_time()
    assert trio.current_time() - stopping < 3.0  # Hypercorn's 1 s + the 0.5 s grace, +slack
    store = SqliteStore(settings.database_path)
    try:
        page = store.search_events(conversation["id"], EventQuery(kind="webhook"))
    finally:
        store.close()
    [event] = page.items
    assert isinstance(event.payload, WebhookPayload)
    assert (event.payload.outcome, event.payload.error) == ("failed", "shutdown")
    assert event.payload.attempts == 1


# -- who may ask -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "url", "message"),
    [
        pytest.param({}, "http://127.0.0.1:9/elsewhere", "does not start with", id="not-allowed"),
        pytest.param({"webhook_allowed_urls": []}, None, "webhook_allowed_urls is empty", id="off"),
        pytest.param(
            {"webhook_secret": ""}, None, "needs the server setting webhook_secret", id="no-secret"
        ),
    ],
)
async def test_webhook_refused_at_create_stores_nothing(
    tmp_path: Path, receiver: Receiver, fields: dict[str, Any], url: str | None, message: str
) -> None:
    """A URL outside webhook_allowed_urls, or any webhook without the settings it needs, is
    a 422 at body.webhook.url, and no conversation is stored."""
    settings = hook_settings(tmp_path, receiver, **fields)
    async with live_server(settings) as server:
        response = await server.client.post(
            "/api/conversations",
            json={"agent": FINISH, "webhook": {"url": url or f"{receiver.url}/hooks/"}},
        )
        listed = (await server.client.get("/api/conversations")).json()["items"]
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["detail"][0]["loc"] == ["body", "webhook", "url"]
    assert message in error["message"]
    assert listed == []


ALLOWED = ["http://hooks.test:8080", "https://h.test/in/"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        pytest.param("http://hooks.test:8080", True, id="exact"),
        pytest.param("http://hooks.test:8080/x?y=1", True, id="path-below"),
        pytest.param("https://h.test/in/deep", True, id="below-slash-prefix"),
        pytest.param("http://hooks.test:80800/x", False, id="longer-port"),
        pytest.param("http://hooks.test:8080.evil.test/", False, id="longer-host"),
        pytest.param("http://hooks.test:8080@evil.test/", False, id="userinfo-trick"),
        pytest.param("https://h.test/in/../admin", False, id="dot-dot"),
        pytest.param("https://h.test/inside", False, id="outside-prefix"),
        pytest.param("ftp://hooks.test:8080/", False, id="not-http"),
        pytest.param("http://hooks.test:8080/a b", False, id="space"),
    ],
)
def test_url_problem_prefix_must_end_at_a_boundary(url: str, allowed: bool) -> None:
    """A URL is allowed only when an allowed prefix ends at a boundary of it."""
    assert (url_problem(url, ALLOWED) is None) is allowed


async def test_webhook_secret_is_never_shown(tmp_path: Path, receiver: Receiver) -> None:
    """GET /api/server shows webhook_secret as *** and the settings' repr leaves it out."""
    settings = hook_settings(tmp_path, receiver)
    async with live_server(settings) as server:
        response = await server.client.get("/api/server")
    assert SECRET not in response.text
    assert response.json()["settings"]["webhook_secret"] == "***"
    assert SECRET not in repr(settings)
