"""The store on SQLite and on PostgreSQL, side by side, at a small scale.

    .venv/bin/python bench/store_engines.py [--threads 16] [--events 200] [--fixture 20000]

For each engine (PostgreSQL: a throwaway database on ``$TRELLIS_TEST_POSTGRES`` or the local
server, as the tests use; dropped at the end):

* **append**: ``--threads`` threads, each appending ``--events`` ``say`` events to its own
  conversation through ``append_event`` (group commit), in events/s;
* **search**: p50/p99 of ``search_events``/``count_events`` in one conversation of
  ``--fixture`` events (appended through the store beforehand; on PostgreSQL then
  ``ANALYZE``, as autovacuum would within a minute: without statistics the planner scans
  the conversation for every ``q``, ~10 ms here): ``q`` rare (one event), ``q`` common
  (one in five), ``kind``, ``after_seq`` 90% in, 200 calls each.

A small scale only: a tool to compare engines on one machine, not a capacity figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from app.events import ActionPayload, MessagePayload, Payload, Source
from app.store import EventQuery, NewConversation, PostgresStore, SqliteStore, SqlStore
from tests import pg

RARE, COMMON = "zebracorn", "deploy"
QUERIES = {
    "q rare": EventQuery(q=RARE),
    "q common": EventQuery(q=COMMON),
    "kind=action": EventQuery(kind="action"),
    "after_seq 90%": EventQuery(after_seq=0),  # set from the fixture size
}


def create(store: SqlStore) -> str:
    return store.create_conversation(NewConversation({"kind": "script", "steps": []}, "b", 5))[0].id


def append_rate(store: SqlStore, threads: int, events: int) -> float:
    """Events/s of ``threads`` threads appending ``events`` each to their own conversation."""
    conversations = [create(store) for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def run(conversation_id: str) -> None:
        start.wait()
        for i in range(events):
            store.append_event(conversation_id, None, Source.AGENT, MessagePayload(text=f"m{i}"))

    workers = [threading.Thread(target=run, args=(c,)) for c in conversations]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * events / (time.perf_counter() - began)


def fill(store: SqlStore, size: int) -> str:
    """One conversation of ``size`` events: one RARE, COMMON in one of five, actions."""
    conversation_id = create(store)
    for n in range(size):
        text = RARE if n == size // 2 else (f"{COMMON} {n}" if n % 5 == 0 else f"other {n}")
        payload: Payload = (
            ActionPayload(call_id=str(n), tool="terminal", arguments={"command": text})
            if n % 7 == 0
            else MessagePayload(text=text)
        )
        store.append_event(conversation_id, None, Source.AGENT, payload)
    return conversation_id


def percentiles(call: Callable[[], object], times: int = 200) -> tuple[float, float]:
    samples = []
    for _ in range(times):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    cuts = statistics.quantiles(samples, n=100)
    return statistics.median(samples), cuts[98]


def measure(store: SqlStore, args: argparse.Namespace) -> dict[str, str]:
    rows = {"append (events/s)": f"{append_rate(store, args.threads, args.events):,.0f}"}
    rows["append, 1 thread (events/s)"] = f"{append_rate(store, 1, args.events * 4):,.0f}"
    conversation_id = fill(store, args.fixture)
    if isinstance(store, PostgresStore):  # the statistics autovacuum gathers within a minute
        with psycopg.connect(store.url, autocommit=True) as connection:
            connection.execute("ANALYZE")
    for name, query in QUERIES.items():
        if name.startswith("after_seq"):
            query = query.model_copy(update={"after_seq": args.fixture * 9 // 10})
        s50, s99 = percentiles(lambda q=query: store.search_events(conversation_id, q))
        c50, c99 = percentiles(lambda q=query: store.count_events(conversation_id, q))
        rows[f"{name}: search / count p50, p99 (ms)"] = (
            f"{s50:.2f}, {s99:.2f} / {c50:.2f}, {c99:.2f}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--fixture", type=int, default=20_000)
    args = parser.parse_args()
    results: dict[str, dict[str, str]] = {}
    with TemporaryDirectory() as directory:
        sqlite = SqliteStore(Path(directory) / "bench.sqlite3")
        try:
            results["SQLite"] = measure(sqlite, args)
        finally:
            sqlite.close()
    with pg.throwaway_database() as url:
        postgres = PostgresStore(url)
        try:
            results["PostgreSQL"] = measure(postgres, args)
        finally:
            postgres.close()
    print(f"| {vars(args)} | SQLite | PostgreSQL |\n|---|---|---|")
    for metric in results["SQLite"]:
        print(f"| {metric} | {results['SQLite'][metric]} | {results['PostgreSQL'][metric]} |")


if __name__ == "__main__":
    main()
