"""The dashboard at ``GET /``: served safely, and live in a real browser.

The first tests speak HTTP: the page and its files, their headers (a strict
Content-Security-Policy, ``nosniff``, revalidation by ``ETag``), 404 for anything else under
``/static/``, the Origin guard letting the page's own origin write while every other
origin stays refused, and the README's reverse-proxy settings doing what it says.

The browser test drives Debian's ``chromium`` (``/usr/bin/chromium``, installed by
``.ci/run``) with Playwright for Python — never a downloaded browser — against a real server
(Hypercorn on 127.0.0.1, port 0) whose runs are ``gated``: they hold their run slots until
the test ends, so what the page must show is exact. Playwright's sync API runs its own event
loop, so the browser part runs in a thread (``trio.to_thread.run_sync``) while Trio serves;
every check is one of Playwright's auto-waiting ``expect`` assertions, never a sleep. With
``api_keys`` the page asks for a key and shows each key what it may see; the stream reader
it uses instead of ``EventSource`` has its own tests (``tests/test_dashboard_event_stream.py``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from playwright.sync_api import ConsoleMessage, Locator, Page, Response, expect, sync_playwright

from app.api.dashboard import PAGE_POLICY
from app.settings import LLMSettings, Settings
from app.testing import FakeChatServer, Gates, gated_registry, text_reply
from app.testing_llm import StreamHold
from app.web import create_app
from tests.conftest import gated, script
from tests.live import live_server

CHROMIUM = Path("/usr/bin/chromium")
#: Headless, no sandbox (CI runs as root), and nothing that would try to reach a network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
]
EXPECT_TIMEOUT_MS = 10_000  # each auto-waiting check; they normally pass within ~100 ms


# -- the page and its files, over HTTP -----------------------------------------------------


async def test_page_and_assets_are_served_with_a_strict_policy(settings: Settings) -> None:
    """``/`` is the page with its CSP; every file it names is served with its type; a file
    the client holds already is a 304; the page holds no inline script or style."""
    app = create_app(settings)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["Content-Security-Policy"] == PAGE_POLICY
        assert "default-src 'self'" in PAGE_POLICY and "connect-src 'self'" in PAGE_POLICY
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        html = (await page.get_data()).decode()
        assert re.findall(r"<script\b[^>]*>", html) == [
            '<script type="module" src="/static/dashboard.js">'
        ]
        assert "<style" not in html and not re.search(r"\son[a-z]+=", html)
        types = {
            "js": "text/javascript; charset=utf-8",
            "css": "text/css; charset=utf-8",
            "svg": "image/svg+xml",
        }
        for name in re.findall(r'"/static/([^"]+)"', html):
            asset = await client.get(f"/static/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["Content-Type"] == types[name.rpartition(".")[2]]
            assert asset.headers["X-Content-Type-Options"] == "nosniff"
            assert asset.headers["Cache-Control"] == "no-cache"
            etag = asset.headers["ETag"]
            again = await client.get(f"/static/{name}", headers={"If-None-Match": etag})
            assert again.status_code == 304
            assert await again.get_data() == b""


@pytest.mark.parametrize(
    "path",
    [
        "/static/missing.js",
        "/static/dashboard.html",  # the page is served at / only, with its policy
        "/static/..%2Fweb.py",
        "/static/%2e%2e/api/dashboard.py",
        "/static/../web.py",
        "/static/",
    ],
)
async def test_anything_else_under_static_is_404(settings: Settings, path: str) -> None:
    """Only the files of app/static are served: no other name, no way out of the folder."""
    app = create_app(settings)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get(path)
        assert response.status_code == 404
        body = await response.get_json()
        assert body["error"]["code"] == "not_found"


@pytest.mark.timeout(30)
async def test_the_servers_own_origin_may_write_and_others_may_not(settings: Settings) -> None:
    """The page's calls carry ``Origin: http://127.0.0.1:<port>`` — this server's own
    origin — and pass; another port, another name for this host, or another site is 403."""
    with trio.fail_after(20):
        async with live_server(settings) as server:
            own = str(server.client.base_url).rstrip("/")
            port = own.rsplit(":", 1)[1]
            limits = {"max_concurrent_runs": 2}
            ok = await server.client.patch(
                "/api/server/limits", json=limits, headers={"Origin": own}
            )
            assert ok.status_code == 200, ok.text
            created = await server.client.post(
                "/api/conversations", json={"agent": script({"say": "hi"})}, headers={"Origin": own}
            )
            assert created.status_code == 201, created.text
            for origin in (
                "http://127.0.0.1:1",
                f"http://localhost:{port}",
                f"https://127.0.0.1:{port}",
                "null",
            ):
                refused = await server.client.patch(
                    "/api/server/limits", json=limits, headers={"Origin": origin}
                )
                assert refused.status_code == 403, origin
                assert refused.json()["error"]["code"] == "forbidden_origin"
            # DNS rebinding: the page's own name as Host is refused before its Origin counts.
            rebound = await server.client.patch(
                "/api/server/limits",
                json=limits,
                headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
            )
            assert rebound.status_code == 421, rebound.text


README = Path(__file__).resolve().parent.parent / "README.md"
PROXY_SECTION = "### Behind a reverse proxy or in a container"


def readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README's ``section`` (up to the next heading)."""
    text = README.read_text(encoding="utf-8").split(section, 1)[1]
    text = re.split(r"\n#{2,3} ", text, maxsplit=1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


async def test_readme_proxy_recipe_lets_the_page_through_a_tls_proxy(tmp_path: Path) -> None:
    """The README's proxy settings, used as written: a request as nginx forwards it (``Host``
    of the site, plain http, the page's ``https`` Origin) passes Host and Origin; without
    ``allowed_origins`` the page's writes are 403, and the nginx block's body limit is
    ``max_request_bytes``."""
    nginx, *_ = readme_blocks(PROXY_SECTION, "nginx")
    assert "proxy_buffering off;" in nginx and "proxy_set_header Host $host;" in nginx
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx
    assert "client_max_body_size 1m;" in nginx and Settings().max_request_bytes == 1 << 20
    recipe = next(
        tomllib.loads(block)
        for block in readme_blocks(PROXY_SECTION, "toml")
        if "allowed_origins" in block
    )
    site = recipe["allowed_hosts"][0]
    keys = [{"key": ADMIN_KEY, "tenant": "ops", "admin": True}]
    forwarded = {"Host": site, "Authorization": f"Bearer {ADMIN_KEY}"}
    write = {**forwarded, "Origin": recipe["allowed_origins"][0]}
    assert write["Origin"] == f"https://{site}"
    for settings, status in (
        (Settings(data_dir=tmp_path / "a", api_keys=keys, **recipe), 200),
        (Settings(data_dir=tmp_path / "b", api_keys=keys, allowed_hosts=[site]), 403),
    ):
        async with create_app(settings).test_app() as test_app:
            client = test_app.test_client()
            assert (await client.get("/api/conversations", headers=forwarded)).status_code == 200
            limits = {"max_concurrent_runs": 3}
            patched = await client.patch("/api/server/limits", json=limits, headers=write)
            assert patched.status_code == status, await patched.get_data()


# -- the page, live, in a real browser ----------------------------------------------------


def require_chromium() -> None:
    """Skip without the system browser, except in CI (``CI=true``), which must have it."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); CI installs it")


@dataclass
class Problems:
    """What went wrong inside the page: uncaught errors, console errors (CSP violations
    are reported there), and requests that failed.

    Answers with a status in ``expected`` (a server with keys answers 401 and 403 by
    design) go to ``refused`` as ``(status, method, path)`` instead, and so do the console
    lines the browser logs for them; ``urls`` is every URL the page requested."""

    expected: frozenset[int] = frozenset()
    seen: list[str] = field(default_factory=list)
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.seen.append(f"page error: {error}"))
        page.on("console", self._console)
        page.on("response", self._response)
        page.on("request", lambda request: self.urls.append(request.url))

    def _console(self, message: ConsoleMessage) -> None:
        expected = any(
            f"status of {status} " in message.text for status in self.expected
        ) and message.text.startswith("Failed to load resource")
        if message.type == "error" and not expected:
            self.seen.append(message.text)

    def _response(self, response: Response) -> None:
        if response.status in self.expected:
            path = urlsplit(response.url).path
            self.refused.append((response.status, response.request.method, path))
        elif response.status >= 400:
            self.seen.append(f"{response.status} {response.url}")


@contextmanager
def browser_page(
    width: int = 1400, height: int = 900, expected: frozenset[int] = frozenset()
) -> Iterator[tuple[Page, Problems]]:
    """A page of a headless system chromium, closed (with the browser) on the way out;
    answers with a status in ``expected`` are not problems (see :class:`Problems`)."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(EXPECT_TIMEOUT_MS)
            expect.set_options(timeout=EXPECT_TIMEOUT_MS)
            problems = Problems(expected)
            problems.watch(page)
            yield page, problems
        finally:
            browser.close()


def titles(page: Page, table: str) -> Locator:
    return page.get_by_test_id(table).locator("tbody tr td.title")


def drive_dashboard(url: str) -> None:
    """The browser's side (in a thread): watch five runs queue for two slots, open one,
    interrupt it, raise the limit, start a demo run, reload."""
    with browser_page() as (page, problems), httpx.Client(base_url=url, timeout=10) as api:
        page.goto(url)
        expect(page.get_by_test_id("connection")).to_have_text("live")
        expect(page.get_by_test_id("version")).to_have_text(re.compile(r"^v\d"))
        expect(page.get_by_test_id("gauge-running-value")).to_have_text("0 / 2")

        for n in range(1, 6):  # in this order: c1 and c2 take the slots, c3..c5 wait
            body = {"agent": gated("hold"), "title": f"c{n}", "run": True}
            assert api.post("/api/conversations", json=body).status_code == 201
        expect(page.get_by_test_id("gauge-running-value")).to_have_text("2 / 2")
        expect(page.get_by_test_id("gauge-queued-value")).to_have_text("3 / 10")
        expect(titles(page, "running-table")).to_have_text(["c1", "c2"])
        expect(titles(page, "queue-table")).to_have_text(["c3", "c4", "c5"])
        positions = page.get_by_test_id("queue-table").locator("tbody tr td:first-child")
        expect(positions).to_have_text(["1", "2", "3"])

        # The conversation view: its events as they arrive, then an interrupt.
        page.get_by_test_id("running-table").get_by_text("c1", exact=True).click()
        view = page.get_by_test_id("conversation-view")
        expect(view.get_by_test_id("conversation-title")).to_have_text("c1")
        expect(view.get_by_test_id("conversation-status")).to_have_text("running")
        expect(view.get_by_test_id("event").last).to_contain_text("gate hold")
        view.get_by_test_id("action-interrupt").click()
        expect(view.get_by_test_id("conversation-status")).to_have_text("paused")
        expect(view.get_by_test_id("event").last).to_contain_text("running → paused")
        expect(titles(page, "running-table")).to_have_text(["c2", "c3"])
        expect(titles(page, "queue-table")).to_have_text(["c4", "c5"])
        expect(page.get_by_test_id("gauge-queued-value")).to_have_text("2 / 10")

        # The max_concurrent_runs control, then a demo run from the page (it queues).
        page.get_by_test_id("max-concurrent-input").fill("3")
        page.get_by_test_id("max-concurrent-set").click()
        expect(page.get_by_test_id("gauge-running-value")).to_have_text("3 / 3")
        expect(titles(page, "running-table")).to_have_text(["c2", "c3", "c4"])
        page.get_by_test_id("new-run").click()
        expect(titles(page, "queue-table")).to_have_text(["c5", "demo 1"])

        # A new page load starts from the stream's snapshot and shows the same state.
        page.reload()
        expect(page.get_by_test_id("connection")).to_have_text("live")
        expect(page.get_by_test_id("gauge-running-value")).to_have_text("3 / 3")
        expect(titles(page, "running-table")).to_have_text(["c2", "c3", "c4"])
        expect(titles(page, "queue-table")).to_have_text(["c5", "demo 1"])
        paused = page.get_by_test_id("conversation-row").filter(has_text="c1")
        expect(paused.locator("td.status")).to_have_text("paused")
        assert problems.seen == []


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_dashboard_in_a_browser_shows_the_queue_and_interrupts(
    tmp_path: Path, gates: Gates
) -> None:
    """Two slots, five runs: the page shows 2/2 running and the other three queued in order;
    interrupting a running one from its view pauses it and the next in line starts."""
    require_chromium()
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_runs=2, max_queued_runs=10)
    with trio.fail_after(100):
        async with live_server(settings, registry=gated_registry(gates)) as server:
            url = str(server.client.base_url).rstrip("/")
            await trio.to_thread.run_sync(drive_dashboard, url)


def watch_typing(url: str, hold: StreamHold) -> None:
    """The browser's side: start the conversation's run from its view; the model's text
    shows as a typing line while the provider holds the rest, then as the stored message."""
    with browser_page() as (page, problems):
        page.goto(url)
        page.get_by_test_id("conversations-table").get_by_text("chat", exact=True).click()
        view = page.get_by_test_id("conversation-view")
        expect(view.get_by_test_id("conversation-status")).to_have_text("idle")
        view.get_by_test_id("action-start").click()
        expect(view.get_by_test_id("typing")).to_have_text("Hello you, ")
        messages = view.locator('[data-testid="event"][data-kind="message"]')
        expect(messages).to_have_count(1)  # the user's: the answer is not stored yet
        hold.release()
        expect(messages.last).to_contain_text("Hello you, and goodbye.")
        expect(view.get_by_test_id("typing")).to_be_hidden()
        expect(view.get_by_test_id("conversation-status")).to_have_text("finished")
        assert problems.seen == []


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_dashboard_shows_streamed_text_until_the_message_is_stored(tmp_path: Path) -> None:
    """Token deltas of an ``llm`` run (a fake provider holding its stream after two words)
    appear as the view's typing line; the stored message replaces it."""
    require_chromium()
    hold = StreamHold(after_chunks=3)  # the role chunk, "Hello ", "you, "
    with FakeChatServer() as provider:
        provider.add(dataclasses.replace(text_reply("Hello you, and goodbye."), hold=hold))
        settings = Settings(data_dir=tmp_path / "data", llm=LLMSettings(base_url=provider.url))
        with trio.fail_after(100):
            async with live_server(settings) as server:
                body = {"agent": {"kind": "llm", "model": "m"}, "title": "chat"}
                body["initial_message"] = "hello"
                created = await server.client.post("/api/conversations", json=body)
                assert created.status_code == 201, created.text
                url = str(server.client.base_url).rstrip("/")
                await trio.to_thread.run_sync(watch_typing, url, hold)


# -- the page with API keys ----------------------------------------------------------------

ADMIN_KEY = "admin-key-0123456789abcdef"
ALPHA_KEY = "alpha-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef0"
WRONG_KEY = "wrong-key-0123456789abcdef"
KEYS = [
    {"key": ADMIN_KEY, "tenant": "ops", "admin": True},
    {"key": ALPHA_KEY, "tenant": "alpha"},
    {"key": BETA_KEY, "tenant": "beta"},
]


def sign_in(page: Page, key: str) -> None:
    page.get_by_test_id("key-input").fill(key)
    page.get_by_test_id("key-submit").click()


def drive_dashboard_with_keys(url: str) -> list[tuple[int, str, str]]:
    """The browser's side: the page asks for a key, refuses a wrong one, shows everything
    to the admin key and only alpha's conversations to alpha's key. Returns the refused
    answers."""
    with browser_page(expected=frozenset({401, 403})) as (page, problems):
        page.goto(url)
        form = page.get_by_test_id("key-form")
        expect(form).to_be_visible()
        expect(page.get_by_test_id("connection")).to_have_text("key needed")
        expect(page.get_by_test_id("key-input")).to_have_attribute("type", "password")

        sign_in(page, WRONG_KEY)
        expect(page.get_by_test_id("key-error")).to_have_text("That key was refused.")
        expect(form).to_be_visible()

        sign_in(page, ADMIN_KEY)
        expect(form).to_be_hidden()
        expect(page.get_by_test_id("connection")).to_have_text("live")
        expect(page.get_by_test_id("version")).to_have_text(re.compile(r"^v\d"))
        expect(page.get_by_test_id("gauge-running-value")).to_have_text("1 / 1")
        expect(titles(page, "running-table")).to_have_text(["a1"])
        expect(titles(page, "queue-table")).to_have_text(["b1"])
        expect(titles(page, "conversations-table")).to_have_text(["b1", "a1"])
        expect(page.get_by_test_id("max-concurrent-input")).to_be_visible()
        for part in ("gauges", "limits", "running", "queue"):
            expect(page.get_by_test_id(f"{part}-locked")).to_be_hidden()

        # The key lives in this tab's sessionStorage, nowhere else, and survives a reload.
        assert page.evaluate("localStorage.length") == 0
        assert page.evaluate("sessionStorage.getItem('trellis.api_key')") == ADMIN_KEY
        page.reload()
        expect(page.get_by_test_id("connection")).to_have_text("live")
        expect(form).to_be_hidden()
        expect(titles(page, "queue-table")).to_have_text(["b1"])

        page.get_by_test_id("sign-out").click()
        expect(form).to_be_visible()
        expect(page.get_by_test_id("sign-out")).to_be_hidden()
        expect(titles(page, "conversations-table")).to_have_count(0)
        assert page.evaluate("sessionStorage.length") == 0

        # A tenant's key: its own conversations, live; the admin-only parts say so.
        sign_in(page, ALPHA_KEY)
        expect(form).to_be_hidden()
        expect(titles(page, "conversations-table")).to_have_text(["a1"])
        for part in ("gauges", "limits", "running", "queue"):  # the server stream is admin's
            expect(page.get_by_test_id(f"{part}-locked")).to_be_visible()
        expect(page.get_by_test_id("limits-form").locator("input")).to_be_hidden()
        expect(page.get_by_test_id("queue-table")).to_be_hidden()
        expect(page.get_by_test_id("connection")).to_have_text("admin key needed")
        page.get_by_test_id("conversations-table").get_by_text("a1", exact=True).click()
        view = page.get_by_test_id("conversation-view")
        expect(view.get_by_test_id("conversation-status")).to_have_text("running")
        expect(view.get_by_test_id("event").last).to_contain_text("gate hold")
        view.get_by_test_id("action-interrupt").click()  # a tenant acts on its own
        expect(view.get_by_test_id("conversation-status")).to_have_text("paused")
        row = page.get_by_test_id("conversation-row").filter(has_text="a1")
        expect(row.locator("td.status")).to_have_text("paused")

        assert problems.seen == []
        assert not [u for u in problems.urls if any(k in u for k in (ADMIN_KEY, ALPHA_KEY))]
        return problems.refused


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_dashboard_with_api_keys_asks_for_one_and_shows_a_tenant_its_own(
    tmp_path: Path, gates: Gates
) -> None:
    """With ``api_keys``, the page asks for a key (kept in sessionStorage, sent only as
    ``Authorization``), refuses a wrong one, shows the queue to an admin key and only the
    tenant's conversations to a tenant's key, with the admin-only parts marked."""
    require_chromium()
    settings = Settings(
        data_dir=tmp_path / "data", max_concurrent_runs=1, max_queued_runs=10, api_keys=KEYS
    )
    with trio.fail_after(100):
        async with live_server(settings, registry=gated_registry(gates)) as server:
            for title, key in (("a1", ALPHA_KEY), ("b1", BETA_KEY)):  # a1 runs, b1 waits
                body = {"agent": gated("hold"), "title": title, "run": True}
                headers = {"Authorization": f"Bearer {key}"}
                created = await server.client.post("/api/conversations", json=body, headers=headers)
                assert created.status_code == 201, created.text
            url = str(server.client.base_url).rstrip("/")
            refused = await trio.to_thread.run_sync(drive_dashboard_with_keys, url)
    assert {status for status, _, _ in refused} <= {401, 403}
    assert all(path.startswith("/api/") for _, _, path in refused), refused
    assert (401, "GET", "/api/conversations") in refused  # the wrong key, tried
    assert (403, "GET", "/api/server") in refused  # alpha's key, on the admin-only parts
    assert (403, "GET", "/api/events/stream") in refused
