"""Take ``docs/dashboard.png``: the dashboard of a real server under load.

Run from the repository root: ``.venv/bin/python docs/screenshot.py`` (a few seconds).

It serves the app in this process (Hypercorn on 127.0.0.1, port 0, a temporary data
directory, 4 run slots) and starts a dozen ``script`` conversations whose steps sleep or
run a terminal command, so four run and the rest queue. Then it opens the page in Debian's
chromium exactly as ``tests/test_dashboard_browser.py`` does, opens a running conversation
and saves the picture. Everything is stopped (the runs drained) before it exits.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.settings import Settings  # noqa: E402
from tests.live import live_server  # noqa: E402
from tests.test_dashboard_browser import browser_page, titles  # noqa: E402

OUTPUT = REPO / "docs" / "dashboard.png"
TASKS = [
    "Refactor the parser",
    "Summarise server logs",
    "Fix flaky test",
    "Write release notes",
    "Triage issue #482",
    "Upgrade dependencies",
    "Review pull request",
    "Translate README",
    "Profile slow query",
    "Draft API docs",
    "Rename settings",
    "Clean up fixtures",
]


def agent(n: int) -> dict[str, Any]:
    """A script that says a few things (n % 3 + 1 steps), then works for a while: every
    other one in a terminal command (it holds a tool thread), the rest in a sleep."""
    says = [{"say": line} for line in ("Reading the code…", "Found 3 call sites.", "Editing.")]
    work = {"tool": "terminal", "args": {"command": "sleep 120", "timeout": 130}}
    steps = [*says[: n % 3 + 1], work if n % 2 else {"sleep": 120}, {"finish": "Done."}]
    return {"kind": "script", "steps": steps}


def shoot(url: str) -> None:
    with browser_page(width=1400, height=860) as (page, problems):
        page.goto(url)
        page.get_by_test_id("queue-table").locator("tbody tr").nth(7).wait_for()
        page.get_by_test_id("running-table").get_by_text(TASKS[1], exact=True).click()
        page.get_by_test_id("event").filter(has_text="sleep 120").wait_for()
        page.get_by_test_id("version").filter(has_text="v").wait_for()
        titles(page, "queue-table").first.wait_for()
        page.wait_for_timeout(3000)  # let waiting and elapsed times tick a little
        page.screenshot(path=str(OUTPUT))
        assert problems.seen == [], problems.seen


async def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(data_dir=Path(data), max_concurrent_runs=4, max_queued_runs=100)
        async with live_server(settings) as server:
            for n, title in enumerate(TASKS):
                body = {"agent": agent(n), "title": title, "run": True}
                response = await server.client.post("/api/conversations", json=body)
                response.raise_for_status()
            url = str(server.client.base_url).rstrip("/")
            await trio.to_thread.run_sync(shoot, url)
    print(f"wrote {OUTPUT.relative_to(REPO)}")


if __name__ == "__main__":
    trio.run(main)
