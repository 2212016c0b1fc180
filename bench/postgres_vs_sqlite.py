"""The server on PostgreSQL vs SQLite: run-start cost, events/s, short-request latency.

    .venv/bin/python bench/postgres_vs_sqlite.py [--quick] [--json PATH]

Two real servers in turn (``python -m app serve --port 0``), one per store, the same
workload on each, in the same run of this script; one table with both columns and the
ratio PostgreSQL / SQLite (machine, date and commit above it):

* **run start**: the server's CPU (utime + stime of its process) per ``POST …/runs`` on
  idle conversations, until every run thread is running (``runs.cpu_per_start``); on
  PostgreSQL also the CPU of the database's own processes over the same span (work that
  SQLite does inside the server), and their sum;
* **events/s**: ``RUNS`` script runs at once (as many run slots), each saying ``SAYS``
  messages — events committed through the server's run loop and store (group commit on
  both), from the first create to the last run finished;
* **short request**: ``GET …/events?limit=10`` (a store read in an I/O thread), p50/p99 of
  3,000 on a warm keep-alive connection, idle.

PostgreSQL: the local server at ``$TRELLIS_BENCH_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, these machines' trust-auth server); a
throwaway database is created and dropped. Several nodes are not measured here (one
server on the database).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from latency import events_path, sample_raw
from raw_client import RawClient
from runs import cpu_per_start
from scale import machine_header
from server_process import TrellisServer
from tables import aligned
from workload import create_conversations, log, wait_for_statistics

ADMIN_URL = os.environ.get(
    "TRELLIS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
FULL = {"starts": 192, "runs": 64, "says": 100, "samples": 3000}
QUICK = {"starts": 24, "runs": 8, "says": 20, "samples": 300}


@contextmanager
def throwaway_database() -> Iterator[str]:
    name = f"trellis_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(ADMIN_URL)._replace(path="/" + name))
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_cpu_seconds() -> float:
    """utime + stime of every ``postgres`` process of this machine (the server's backends
    included; readable as root, which these benchmark machines run as)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended meanwhile
        if "(postgres)" not in text:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLOCK_TICKS_PER_SECOND


def say_run(says: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"say": f"line {i}"} for i in range(says)]
    return {"kind": "script", "steps": [*steps, {"finish": "ok"}]}


def measure(flags: list[str], sizes: dict[str, int]) -> dict[str, Any]:
    """One server with ``flags``: the three measurements."""
    result: dict[str, Any] = {}
    slots = max(sizes["starts"], sizes["runs"])
    with TrellisServer("--max-concurrent-runs", str(slots), *flags) as server:
        with RawClient(server.port) as client:
            pg_before = postgres_cpu_seconds()
            result["start"] = cpu_per_start(server, client, sizes["starts"])
            result["postgres_cpu_ms_per_start_window"] = (
                (postgres_cpu_seconds() - pg_before) / sizes["starts"] * 1e3
            )
        log("interrupting the sleeping runs")
        _interrupt_all(server)
        result["events"] = events_per_second(server, sizes)
        target = create_conversations(server.port, 1, say_run(5))[0]["id"]
        with RawClient(server.port) as client:
            wait_for_statistics(client, lambda s: s["running"] == 0, "the target's run ended")
        result["short"] = sample_raw(server.port, events_path(target), sizes["samples"])
    return result


def _interrupt_all(server: TrellisServer) -> None:
    with RawClient(server.port) as client:
        page = client.call("GET", "/api/conversations?status=running&limit=1000")
        for item in page["items"]:
            client.call("POST", f"/api/conversations/{item['id']}/interrupt", None, 202)
        wait_for_statistics(client, lambda s: s["running"] == 0, "every run interrupted")


def events_per_second(server: TrellisServer, sizes: dict[str, int]) -> dict[str, float]:
    """``runs`` runs of ``says`` messages at once; events committed per second."""
    started = time.perf_counter()
    created = create_conversations(server.port, sizes["runs"], say_run(sizes["says"]))
    with RawClient(server.port) as client:
        wait_for_statistics(
            client, lambda s: s["running"] == 0 and s["queued"] == 0, "the say runs", 300
        )
        seconds = time.perf_counter() - started
        events = sum(
            client.call("GET", f"/api/conversations/{c['id']}")["event_count"] for c in created
        )
    return {"events": events, "seconds": seconds, "per_second": events / seconds}


Line = tuple[str, str, str, str]


def rows(sqlite: dict[str, Any], postgres: dict[str, Any]) -> list[Line]:
    """metric | SQLite | PostgreSQL | PostgreSQL / SQLite."""

    def line(metric: str, lite: float, pg: float, unit: str, digits: int = 2) -> Line:
        ratio = f"{pg / lite:.2f}x" if lite else "n/a"
        return (metric, f"{lite:,.{digits}f}{unit}", f"{pg:,.{digits}f}{unit}", ratio)

    def start_cpu(result: dict[str, Any], database: bool) -> float:
        own: float = result["start"]["cpu_ms_per_start"]
        return own + (result["postgres_cpu_ms_per_start_window"] if database else 0.0)

    table = [
        line("run start: server CPU", start_cpu(sqlite, False), start_cpu(postgres, False), " ms"),
        line(
            "run start: server + postgres processes' CPU",
            start_cpu(sqlite, True),
            start_cpu(postgres, True),
            " ms",
        ),
        line(
            "events/s through runs",
            sqlite["events"]["per_second"],
            postgres["events"]["per_second"],
            "",
            0,
        ),
    ]
    for key in ("p50_ms", "p99_ms"):
        metric = f"GET events?limit=10 {key[:3]}"
        table.append(line(metric, sqlite["short"][key], postgres["short"][key], " ms"))
    return table


def format_rows(lines: list[Line]) -> str:
    header: Line = ("metric", "SQLite", "PostgreSQL", "PostgreSQL / SQLite")
    return aligned([header, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    arguments = parser.parse_args(argv)
    sizes = QUICK if arguments.quick else FULL
    log("SQLite server")
    sqlite = measure([], sizes)
    with throwaway_database() as url:
        log("PostgreSQL server")
        postgres = measure(["--database-url", url], sizes)
    for key, value in machine_header().items():
        print(f"{key}: {value}")
    print(f"sizes: {sizes}")
    print(format_rows(rows(sqlite, postgres)))
    if arguments.json:
        arguments.json.write_text(json.dumps({"sqlite": sqlite, "postgres": postgres}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
