"""The store at scale: append rate across concurrent runs, queries at a million events.

    .venv/bin/python bench/store_scale.py [--quick]

Prints machine, date and commit, then a table (metric | value | target):

* **append rate**: 100 threads, each appending ``say`` (message) events to its own
  conversation straight through ``SqliteStore.append_event``, with group commit and — the
  baseline, in the same run — with one transaction per event (``group_commit=False``);
* **queries**: p50/p99 of ``search_events`` / ``count_events`` on a fixture store of
  1,000,000 events in 10,000 conversations, one of them holding 100,000 (``--quick``:
  10,000 / 100 / 5,000; 100 threads x 20 appends), through the store API (each call is
  one read transaction and renders its page), in the big conversation: ``q`` with a rare
  and a common word, ``kind``, ``after_seq`` deep (90% in), and combined;
* **bytes per event** of the fixture file.

The fixture is written straight into SQLite with ``executemany`` through the store's own
schema (its triggers keep the full-text index) and cached under ``/tmp``, keyed by schema
version and size, so reruns skip the build (full size: 12 minutes on the loaded 2-core
machine of 2026-12-03; the full run's appends and queries take ~5 more).

``measure(quick)`` returns the rows, for ``bench/scale.py``; ``quick=True`` took 10 s with
the fixture cached and ~14 s building it, on 2 busy cores (the suite runs it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import TypeAdapter

from app.events import MessagePayload, Payload, Source, searchable_text
from app.store import EventQuery, NewConversation, SqliteStore
from app.store.schema import INDEX_ALL_TEXT, SCHEMA_VERSION

Row = tuple[str, str, str]

#: Words that occur where the fixture puts them: RARE once per 10,000 events, COMMON in
#: about one event in five (both also occur in the big conversation, deep in it too).
RARE, COMMON = "zebracorn", "deploy"
QUERY_TARGET_MS = 10.0
APPEND_TARGET = 20_000


@dataclass(frozen=True)
class Sizes:
    events: int
    conversations: int
    big: int  # events in the one big conversation
    threads: int  # concurrent appenders
    appends: int  # events each appender appends
    repeats: int  # timed calls per query

    @property
    def key(self) -> str:
        return f"v{SCHEMA_VERSION}-{self.events}-{self.conversations}-{self.big}"


FULL = Sizes(1_000_000, 10_000, 100_000, threads=100, appends=1_000, repeats=200)
QUICK = Sizes(10_000, 100, 5_000, threads=100, appends=20, repeats=30)


# -- append rate -------------------------------------------------------------------------


def append_rate(directory: Path, sizes: Sizes, *, group_commit: bool) -> tuple[float, float]:
    """Events/s and CPU µs (this process) per event: ``sizes.threads`` threads each append
    ``sizes.appends`` messages to a conversation of their own, all released at once; timed
    until the last one returned."""
    store = SqliteStore(directory / f"append-{group_commit}.sqlite3", group_commit=group_commit)
    try:
        agent = {"kind": "script", "steps": []}
        ids = [
            store.create_conversation(NewConversation(agent, "bench", 5))[0].id
            for _ in range(sizes.threads)
        ]
        start = threading.Barrier(sizes.threads + 1)
        failures: list[BaseException] = []

        def append(conversation_id: str) -> None:
            start.wait()
            try:
                for i in range(sizes.appends):
                    payload = MessagePayload(text=f"step {i}: said something worth keeping")
                    store.append_event(conversation_id, None, Source.AGENT, payload)
            except BaseException as error:  # reported below
                failures.append(error)

        threads = [threading.Thread(target=append, args=(cid,)) for cid in ids]
        for thread in threads:
            thread.start()
        start.wait()
        began, cpu = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.join()
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
        if failures:
            raise failures[0]
        events = sizes.threads * sizes.appends
        return events / elapsed, cpu / events * 1e6
    finally:
        store.close()


# -- the fixture -------------------------------------------------------------------------


def _vocabulary(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnoprstuvwy"
    words = {"".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(3000)}
    return sorted(words - {RARE, COMMON})


def _rows(rng: random.Random, count: int) -> Iterator[tuple[str, str, str, str]]:
    """``(source, kind, payload JSON, searchable text)`` for ``count`` events: messages,
    actions, observations, written as plain JSON (fast); :func:`_check_rows` proves they
    are what the store would write."""
    vocabulary = _vocabulary(rng)
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocabulary))))
    for n in range(count):  # Zipf-like word frequencies
        words = rng.choices(vocabulary, cum_weights=cumulative, k=rng.randint(6, 16))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), COMMON)
        if n % 10_000 == 5_000:
            words.insert(rng.randrange(len(words) + 1), RARE)
        text = " ".join(words)
        pick = rng.random()
        if pick < 0.6:
            payload = {"kind": "message", "text": text}
            yield ("agent" if pick < 0.4 else "user"), "message", json.dumps(payload), text
        elif pick < 0.8:
            action = {"kind": "action", "call_id": f"c{n}", "tool": "terminal"}
            payload = {**action, "arguments": {"command": text}}
            yield "agent", "action", json.dumps(payload), f"terminal {text}"
        else:
            observation = {"kind": "observation", "call_id": f"c{n}", "tool": "terminal"}
            payload = {**observation, "content": text, "is_error": False}
            yield "tool", "observation", json.dumps(payload), f"terminal {text}"


def _check_rows() -> None:
    """The fixture's rows parse as payloads whose searchable text is the row's text."""
    for _, _, payload_json, text in _rows(random.Random(1), 50):
        payload: Payload = TypeAdapter(Payload).validate_json(payload_json)
        assert searchable_text(payload) == text, (payload, text)


def fixture(sizes: Sizes) -> Path:
    """The cached fixture store's file (built if missing): ``sizes.events`` events in
    ``sizes.conversations`` conversations; the first one (id ``big``) holds ``sizes.big``."""
    path = Path(tempfile.gettempdir()) / f"trellis-store-scale-{sizes.key}.sqlite3"
    if path.exists():
        return path
    _check_rows()
    building = path.with_suffix(f".building-{os.getpid()}")
    SqliteStore(building).close()  # the schema, as the store makes it
    with closing(sqlite3.connect(building, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")  # one file to rename
        for pragma in ("synchronous = OFF", "cache_size = -524288", "temp_store = MEMORY"):
            conn.execute(f"PRAGMA {pragma}")  # a scratch file: rebuilt if a crash broke it
        _fill(conn, sizes)
    building.rename(path)
    return path


def _fill(conn: sqlite3.Connection, sizes: Sizes) -> None:
    rng = random.Random(11)
    small = sizes.conversations - 1
    counts = [sizes.big] + [(sizes.events - sizes.big) // small] * small
    counts[-1] += sizes.events - sum(counts)
    ids = ["big"] + [f"c{n:06d}" for n in range(1, sizes.conversations)]
    now = "2026-12-01T00:00:00+00:00"
    agent = json.dumps({"kind": "script", "steps": []})
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO conversations (id, title, status, agent, max_iterations, created_at,"
        " updated_at, last_seq) VALUES (?, 'bench', 'idle', ?, 5, ?, ?, ?)",
        [(cid, agent, now, now, count) for cid, count in zip(ids, counts, strict=True)],
    )
    rows = _rows(rng, sizes.events)
    for cid, count in zip(ids, counts, strict=True):
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
            [(cid, seq, str(uuid.uuid4()), now, *next(rows)) for seq in range(1, count + 1)],
        )
    for statement in INDEX_ALL_TEXT:  # the q index, as the v5 migration fills it
        conn.execute(statement)
    conn.execute("COMMIT")


# -- queries -----------------------------------------------------------------------------


def _percentiles(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    call()  # warm the page cache and the statement cache
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return statistics.median(times), p99


def query_rows(store: SqliteStore, sizes: Sizes) -> list[Row]:
    deep = sizes.big * 9 // 10
    cases: list[tuple[str, EventQuery]] = [
        (f"q={RARE} (rare)", EventQuery(q=RARE)),
        (f"q={COMMON} (~20%)", EventQuery(q=COMMON)),
        ("kind=action", EventQuery(kind="action")),
        (f"after_seq={deep:,}", EventQuery(after_seq=deep)),
        (f"q={RARE} after_seq={deep:,}", EventQuery(q=RARE, after_seq=deep)),
        (
            f"q={COMMON} kind=action after_seq={deep:,}",
            EventQuery(q=COMMON, kind="action", after_seq=deep),
        ),
        (f"q={COMMON} desc", EventQuery(q=COMMON, order="desc")),
    ]
    count_cases: list[tuple[str, EventQuery]] = [
        ("all", EventQuery()),
        *cases[:4],
        (f"q={COMMON} kind=action", EventQuery(q=COMMON, kind="action")),
    ]
    target = f"p99 <= {QUERY_TARGET_MS:g} ms"
    rows: list[Row] = []
    for label, query in cases:
        p50, p99 = _percentiles(lambda q=query: store.search_events("big", q), sizes.repeats)
        rows.append((f"search {label}", f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", target))
    for label, query in count_cases:
        p50, p99 = _percentiles(lambda q=query: store.count_events("big", q), sizes.repeats)
        rows.append((f"count {label}", f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", target))
    return rows


def size_rows(path: Path, sizes: Sizes) -> list[Row]:
    total = path.stat().st_size
    rows = [("database bytes per event", f"{total / sizes.events:,.0f}", "reported")]
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            text_index = conn.execute(
                "SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'events_text%'"
            ).fetchone()[0]
        except sqlite3.OperationalError:  # SQLite built without dbstat
            return rows
    rows.append(("  of which the q index (events_text)", f"{text_index / sizes.events:,.0f}", ""))
    return rows


# -- all of it ---------------------------------------------------------------------------


@contextmanager
def _scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="trellis-store-scale-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def measure(quick: bool) -> list[Row]:
    """The table's rows (metric, value, target)."""
    sizes = QUICK if quick else FULL
    total = sizes.threads * sizes.appends
    rows: list[Row] = []
    with _scratch() as directory:
        grouped, grouped_cpu = append_rate(directory, sizes, group_commit=True)
        single, single_cpu = append_rate(directory, sizes, group_commit=False)
    rows.append(
        (
            f"append, {sizes.threads} threads, {total:,} events, group commit",
            f"{grouped:,.0f} events/s ({grouped / single:.1f}x), {grouped_cpu:.0f} µs CPU/event",
            f">= {APPEND_TARGET:,} events/s",
        )
    )
    rows.append(
        (
            "append, same, one transaction per event",
            f"{single:,.0f} events/s, {single_cpu:.0f} µs CPU/event",
            "baseline",
        )
    )
    began = time.perf_counter()
    path = fixture(sizes)
    built = time.perf_counter() - began
    label = f"fixture: {sizes.events:,} events, {sizes.conversations:,} conversations"
    rows.append((label, f"ready in {built:.1f} s", f"big: {sizes.big:,} events"))
    with _scratch() as directory:
        copy = directory / "fixture.sqlite3"
        shutil.copyfile(path, copy)  # the store switches it to WAL; keep the cache pristine
        store = SqliteStore(copy)
        try:
            rows += query_rows(store, sizes)
        finally:
            store.close()
    rows += size_rows(path, sizes)
    return rows


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 15 s)")
    args = parser.parse_args()
    print(
        f"store_scale{' --quick' if args.quick else ''}: {platform.machine()},"
        f" {os.cpu_count()} cores, Python {platform.python_version()}, SQLite"
        f" {sqlite3.sqlite_version}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())};"
        f" commit {_commit()}"
    )
    rows = [("metric", "value", "target"), *measure(args.quick)]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for number, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if number == 0:
            print("-+-".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
