"""``GET /api/events/stream``: what changes on the whole server, live, as SSE.

A dashboard's view of the server: status changes of every conversation and run (with queue
positions and running/queued counts), limit changes, conversations created and deleted, and
ephemeral ``step`` frames while runs work. Each numbered frame is one Server-Sent Event
``id: <seq>`` / ``event: <type>`` / ``data: <JSON>``; the ``seq`` is the server-wide feed's
own (see :mod:`app.live.server_feed`), not a conversation's.

Resuming: a client that reconnects with ``Last-Event-ID: N`` (or ``?after_seq=N``) gets
exactly the frames after ``N`` when the server still retains them all (the last
``server_stream_retain_events``), then the live ones. Otherwise — a first connection, a
``N`` too old, or one from an earlier server process (``N`` past the current seq) — the
first frame is a ``snapshot`` of the whole state as of its ``id``: the limits, the
statistics, the running runs and the queue in start order (at most
:data:`SNAPSHOT_QUEUE_LIMIT`). A client replaces its state with a snapshot.

How nothing falls between: the stream subscribes and, in the same synchronous step, takes
the retained frames or the supervisor's state; every later frame reaches the subscription.

A ``: heartbeat`` comment is sent after ``stream_heartbeat_seconds`` of silence. The stream
ends with ``event: end`` and ``{"reason", "last_seq"}``: ``shutdown`` (after the final
statuses of a drain) or ``slow_consumer`` (the client fell ``stream_buffer_events`` frames
behind: it resumes from ``last_seq``).

Cancellation: a client that disconnects cancels the body generator; its subscription is
closed on the way out, so nothing is left behind. The subscription is made when the body
starts, so a response never sent leaves none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import trio
from pydantic import Field
from quart import Blueprint, Response

from app.api import sse
from app.api.http import parse_query, supervisor
from app.api.openapi import documented
from app.api.schemas import _Strict
from app.auth import require_admin
from app.live.feed import StreamEnd
from app.live.server_feed import ServerFeed, ServerFrame, ServerSubscription
from app.records import RunRecord
from app.store.base import INT64_MAX
from app.supervisor import RunSupervisor

blueprint = Blueprint("server_stream", __name__, url_prefix="/api")

#: Queued runs a snapshot lists (the head of the line); the counts cover all of them.
SNAPSHOT_QUEUE_LIMIT = 500


class ServerStreamQuery(_Strict):
    #: Resume after this seq (``Last-Event-ID`` does the same and wins when larger).
    after_seq: int | None = Field(None, ge=0, le=INT64_MAX)


@blueprint.get("/events/stream")
@documented(
    "Server-Sent Events of the whole server: a snapshot (unless resuming with after_seq or"
    " Last-Event-ID within the retained frames), then status (with queue position and"
    " counts), limits and conversation (created, deleted) frames, each with the server"
    " stream's own seq as SSE id, and ephemeral step frames without one. Ends with an"
    " 'end' event (shutdown, slow_consumer). With API keys: admin keys only (403 for"
    " others; their dashboards follow their conversations' own streams).",
    query=ServerStreamQuery,
    errors=(403, 422),
    headers=("Last-Event-ID",),
    media_type="text/event-stream",
)
async def stream_server_events() -> Response:
    require_admin()  # its frames name every tenant's conversations and runs
    sup = supervisor()
    query = parse_query(ServerStreamQuery)
    return sse.sse_response(_body(sup, sse.resume_point(query.after_seq)))


async def _body(sup: RunSupervisor, after: int) -> AsyncGenerator[bytes, None]:
    """Subscribe, then start from the retained frames or a snapshot, then follow."""
    feed = sup.server_feed
    with feed.subscribe() as subscription:
        missed = feed.retained_after(after)  # same synchronous step as subscribing
        if missed is None:
            snapshot = await _snapshot(sup, feed)
            last = snapshot["seq"]
            yield sse.json_frame("snapshot", snapshot, last)
        else:
            last = after
            for frame in missed:
                yield _render(frame)
                last = frame.seq or last
        async with aclosing(_follow(sup, subscription, last)) as live:
            async for chunk in live:
                yield chunk


async def _follow(
    sup: RunSupervisor, subscription: ServerSubscription, last: int
) -> AsyncGenerator[bytes, None]:
    """The live frames, heartbeats while idle, then the ``end`` frame."""
    heartbeat = sup.settings.stream_heartbeat_seconds
    while True:
        with trio.move_on_after(heartbeat) as idle:
            item = await subscription.receive()
        if idle.cancelled_caught:
            yield sse.HEARTBEAT
        elif isinstance(item, StreamEnd):
            yield sse.end_frame(item.reason, last)
            return
        else:
            yield _render(item)
            last = item.seq or last


async def _snapshot(sup: RunSupervisor, feed: ServerFeed) -> dict[str, Any]:
    """The whole state as of the feed's current seq.

    Everything live is read before the first checkpoint (in the caller's synchronous step
    with the subscription); only the runs' stored times and step counts are read after,
    and a run not stored yet (being admitted) is left out: its ``status`` frame follows.
    """
    seq, stats = feed.seq, sup.statistics()
    running = sup.active_runs(running=True)
    queued = sup.active_runs(SNAPSHOT_QUEUE_LIMIT, running=False)
    ids = [run_id for run_id, _, _ in running + queued]
    records = {run.id: run for run in await sup.io(sup.store.get_runs, ids)}
    return {
        "seq": seq,
        "server_started_at": feed.started_at.isoformat(),
        "limits": {
            "max_concurrent_runs": stats.max_concurrent_runs,
            "max_queued_runs": stats.max_queued_runs,
            "io_threads": stats.io_total,
            "tool_threads": stats.tool_total,
        },
        "statistics": dataclasses.asdict(stats),
        "running": [_running(records[r]) for r, _, _ in running if r in records],
        "queued": [_queued(records[r], n) for r, _, n in queued if r in records],
    }


def _running(run: RunRecord) -> dict[str, Any]:
    started = run.started_at.isoformat() if run.started_at else None
    return {
        "conversation_id": run.conversation_id,
        "run_id": run.id,
        "started_at": started,
        "steps": run.steps,
    }


def _queued(run: RunRecord, position: int | None) -> dict[str, Any]:
    return {
        "conversation_id": run.conversation_id,
        "run_id": run.id,
        "position": position,
        "queued_at": run.queued_at.isoformat(),
    }


def _render(frame: ServerFrame) -> bytes:
    """One SSE frame; with an ``id`` line only when it carries a ``seq`` (not a step)."""
    return sse.json_frame(frame.type, frame.data, frame.seq)
