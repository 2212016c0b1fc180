"""The second client of the "latency while runs start" scenario, as its own process.

Usage: ``python bench/start_runs.py PORT COUNT``. Prints ``ready``, waits for a line on stdin,
then creates COUNT conversations with ``run: true`` (the long-sleep script) as fast as it can
and prints one JSON line: how many it created and the window it was busy, as
``time.perf_counter_ns()`` values (CLOCK_MONOTONIC on Linux: comparable across processes).

A separate process, so that its work does not share the sampler's GIL and skew its timings.
"""

from __future__ import annotations

import json
import sys
import time

from workload import LONG_RUN, create_conversations


def main() -> int:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()
    started_ns = time.perf_counter_ns()
    created = create_conversations(port, count, LONG_RUN)
    ended_ns = time.perf_counter_ns()
    report = {
        "created": len(created),
        "conversation_ids": [item["id"] for item in created],
        "started_ns": started_ns,
        "ended_ns": ended_ns,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
