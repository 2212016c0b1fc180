"""``trellis watch ID``: follow a conversation's events live until its run ends.

The events come from the server's resumable stream (``GET …/events/stream`` through
:meth:`TrellisClient.stream`: a dropped connection is resumed without gap or duplicate);
:class:`~app.cli.watch_view.WatchView` shows them. The stream itself never ends with a run
(it follows the conversation), so the watch decides when it is over:

- the conversation has an active run (``queued``, ``running``, ``pausing``): until that
  run's final ``status`` event; the exit code is the run's (0 finished, 4 error, 5 paused);
- no active run: the events stored when the watch began, then the exit code of the last
  run (0 when there never was one).

``new --watch``, ``send --watch`` and ``run --watch`` watch the run they started.

Threads: the command's thread reads the stream. While the run is queued, a poller thread
(owned here, started and joined by :func:`watch_run`) asks for its place in the line every
:data:`POSITION_POLL_SECONDS`: the conversation's stream says when the run starts, not
when the line moves. Ctrl-C stops both (the poller notices within one poll).
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.cli.output import ENDED, ExitCode, UsageError, run_exit_code
from app.cli.session import Session
from app.cli.watch_view import WatchView
from app.client import ClientError, Delta
from app.events import EVENT_KINDS, Event, StatusPayload
from app.lifecycle import Status
from app.records import RunRecord

POSITION_POLL_SECONDS = 0.5  # a place in the line changes when a run ends: seconds apart


@dataclass(frozen=True)
class Target:
    """What a watch waits for: ``run`` to end while it is active; else (an ended run, or
    none) the stored event ``until_seq``."""

    run: RunRecord | None
    until_seq: int = 0

    @property
    def active(self) -> bool:
        return self.run is not None and self.run.status not in ENDED


def parse_kinds(text: str | None) -> frozenset[str] | None:
    """``"message,status"`` as a set of event kinds; ``None`` for all.

    Errors:
        :class:`UsageError` naming a kind that does not exist.
    """
    if text is None:
        return None
    kinds = frozenset(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = sorted(kinds - set(EVENT_KINDS))
    if unknown or not kinds:
        raise UsageError(f"--kinds: unknown kind(s) {unknown}; kinds are {list(EVENT_KINDS)}")
    return kinds


def watch_conversation(
    session: Session, conversation_id: str, *, after_seq: int, kinds: frozenset[str] | None
) -> ExitCode:
    """``trellis watch``: the conversation's active run, or its stored events."""
    conversation = session.client.get_conversation(conversation_id)
    target = Target(conversation.run, until_seq=conversation.event_count)
    return watch_run(session, conversation_id, target, after_seq=after_seq, kinds=kinds)


def watch_run(
    session: Session,
    conversation_id: str,
    target: Target,
    *,
    after_seq: int,
    kinds: frozenset[str] | None = None,
) -> ExitCode:
    """Show the events after ``after_seq`` until ``target`` is reached; its exit code."""
    final = target.run.status if target.run is not None else None
    if not target.active and after_seq >= target.until_seq:
        return run_exit_code(final)
    output = session.output
    run_id = target.run.id if target.active and target.run is not None else None
    view = WatchView(output.console, run_id, final if target.active else None)
    if target.active and target.run is not None:
        view.set_position(target.run.queue_position)
    deltas = not output.json and (kinds is None or "message" in kinds)
    stream = session.client.stream(conversation_id, after_seq=after_seq, deltas=deltas)
    with _closing(stream), _position_poller(session, conversation_id, view), view:
        for item in stream:
            if isinstance(item, Delta):
                view.delta(item.text)
                continue
            shown = kinds is None or item.kind in kinds
            if shown and output.json:
                output.model(item)
            elif shown:
                view.event(item)
            ended = _final_status(item, run_id) if target.active else None
            if ended is not None:
                return run_exit_code(ended)
            if not target.active and item.seq >= target.until_seq:
                return run_exit_code(final)
    session.client.get_conversation(conversation_id)  # deleted: raises not_found
    output.error("the stream ended before the run did (the server is shutting down?)")
    return ExitCode.API_ERROR


def _final_status(event: Event, run_id: str | None) -> Status | None:
    """The status ``event`` ends the run ``run_id`` with, if it does."""
    payload = event.payload
    if event.run_id == run_id and isinstance(payload, StatusPayload) and payload.status in ENDED:
        return payload.status
    return None


@contextmanager
def _closing(stream: Generator[Event | Delta, None, None]) -> Iterator[None]:
    """Close the stream's connection when the watch returns, not when the iterator is
    collected."""
    try:
        yield
    finally:
        stream.close()


@contextmanager
def _position_poller(session: Session, conversation_id: str, view: WatchView) -> Iterator[None]:
    """A thread that keeps ``view``'s queue position fresh while the run is queued; it
    lives exactly as long as the block (stopped and joined on the way out, also on Ctrl-C
    or an error)."""
    if view.run_id is None or session.output.json:
        yield
        return
    stop = threading.Event()
    run_id = view.run_id

    def poll() -> None:
        with session.open_client(timeout=POSITION_POLL_SECONDS * 10) as client:
            while not stop.wait(POSITION_POLL_SECONDS):
                if view.status != Status.QUEUED:
                    continue
                try:
                    run = client.get_run(conversation_id, run_id)
                except ClientError:  # shown where it matters: the stream sees it too
                    continue
                if run.status == Status.QUEUED:
                    view.set_position(run.queue_position)

    thread = threading.Thread(target=poll, name="trellis-watch-position")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
