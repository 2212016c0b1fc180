"""Logs (``app/logs.py``) and the request log of ``app/web.py``: one line a request, no secrets."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from app.logs import JsonFormatter, TextFormatter, configure_logging, log_fields
from app.settings import Settings
from app.web import create_app
from tests.conftest import script

MARKERS = ("HEADER-MARKER", "BODY-MARKER", "QUERY-MARKER")


class Lines(logging.Handler):
    """Every record, formatted by both formatters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> list[str]:
        return [TextFormatter().format(record) for record in self.records]

    def json(self) -> list[dict[str, object]]:
        return [json.loads(JsonFormatter().format(record)) for record in self.records]


@pytest.fixture
def lines() -> Iterator[Lines]:
    """A handler on a private logger, and the logger's records."""
    handler = Lines()
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def http_lines() -> Iterator[Lines]:
    """Every record of the request logger ``trellis.http``."""
    handler = Lines()
    logger = logging.getLogger("trellis.http")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_log_fields_text_reads_as_a_sentence_plus_unsaid_fields(lines: Lines) -> None:
    """The template is filled from the fields; fields it does not mention follow as key=value."""
    log_fields(
        logging.getLogger("tests.logs"), "run {run_id} ended", run_id="r1", steps=3, why="a b"
    )
    [line] = lines.text()
    assert line.endswith(' INFO tests.logs: run r1 ended steps=3 why="a b"')
    assert line[:4].isdigit() and line[23] == "Z"  # 2026-12-03T07:20:01.123Z


def test_log_fields_json_is_one_object_with_every_field(lines: Lines) -> None:
    """The JSON line has ts, level, logger, message first, then every field as a key."""
    logger = logging.getLogger("tests.logs")
    log_fields(logger, "run {run_id} ended", level=logging.WARNING, run_id="r1", steps=3)
    [entry] = lines.json()
    assert list(entry)[:4] == ["ts", "level", "logger", "message"]
    assert entry | {"ts": None} == {
        "ts": None,
        "level": "warning",
        "logger": "tests.logs",
        "message": "run r1 ended",
        "run_id": "r1",
        "steps": 3,
    }


def test_json_formatter_keeps_an_exception_on_the_same_line(lines: Lines) -> None:
    """A logged exception is a field of the one JSON line, not extra lines."""
    logger = logging.getLogger("tests.logs")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    formatted = JsonFormatter().format(lines.records[0])
    assert "\n" not in formatted
    assert "RuntimeError: boom" in json.loads(formatted)["exception"]


def test_log_fields_costs_nothing_when_the_level_is_off(lines: Lines) -> None:
    """Below the logger's level, nothing is formatted, so a missing field is not even seen."""
    logging.getLogger("tests.logs").setLevel(logging.INFO)
    log_fields(logging.getLogger("tests.logs"), "{missing}", level=logging.DEBUG)
    assert lines.records == []


async def test_request_log_one_line_per_request_without_headers_or_bodies(
    settings: Settings, http_lines: Lines
) -> None:
    """Each request logs one line (method, path, status, ms), never headers, body or query."""
    app = create_app(settings)
    with trio.fail_after(10):  # store calls run in threads
        async with app.test_app() as test_app:
            client = test_app.test_client()
            created = await client.post(
                "/api/conversations?note=QUERY-MARKER",
                json={"title": "BODY-MARKER", "agent": script({"say": "hi"})},
                headers={"Authorization": "Bearer HEADER-MARKER"},
            )
            missing = await client.get("/no/such/route", headers={"Cookie": "s=HEADER-MARKER"})
    assert (created.status_code, missing.status_code) == (201, 404)
    text, entries = http_lines.text(), http_lines.json()
    assert len(text) == len(entries) == 2
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("POST", "/api/conversations", 201),
        ("GET", "/no/such/route", 404),
    ]
    assert all(isinstance(e["ms"], float) and e["ms"] >= 0 for e in entries)
    assert text[0].split(": ", 1)[1].startswith("POST /api/conversations 201 ")
    for line in [*text, *map(json.dumps, entries)]:
        assert not any(marker in line for marker in MARKERS), line


def test_configure_logging_replaces_only_its_own_handler(tmp_path: Path) -> None:
    """Configuring twice leaves one Trellis handler; other handlers stay."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        with (tmp_path / "a.log").open("w") as first, (tmp_path / "b.log").open("w") as second:
            configure_logging("warning", "text", first)
            configure_logging("info", "json", second)
            logging.getLogger("tests.logs.configured").info("hello")
        assert (tmp_path / "a.log").read_text() == ""
        assert json.loads((tmp_path / "b.log").read_text())["message"] == "hello"
        assert len(root.handlers) == len(before) + 1
    finally:
        root.handlers[:] = before
        root.setLevel(level)


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_serve_json_logs_one_object_per_line_and_no_duplicate_banner(tmp_path: Path) -> None:
    """`serve --log-format json`: every stderr line is a JSON object, requests carry fields, and
    Hypercorn's own "Running on" line does not repeat the stdout banner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    command = [sys.executable, "-m", "app", "serve", "--port", "0", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        [*command, "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        assert banner.startswith("trellis: serving on http://127.0.0.1:"), banner
        url = banner.split()[-1]
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/health", headers={"X-Token": "HEADER-MARKER"}).status_code == 200
            assert client.get("/api/server").status_code == 200
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert out == ""  # the banner was the one stdout line
    entries = [json.loads(line) for line in err.splitlines()]
    requests = [e for e in entries if e["logger"] == "trellis.http"]
    assert [(e["method"], e["path"], e["status"]) for e in requests] == [
        ("GET", "/health", 200),
        ("GET", "/api/server", 200),
    ]
    assert all(set(e) >= {"ts", "level", "logger", "message"} for e in entries)
    assert not any("Running on" in e["message"] for e in entries)
    assert "HEADER-MARKER" not in err
