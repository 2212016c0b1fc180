"""What ``trellis watch`` shows while it follows a run: printed events above, and below
them a live area with the agent's answer as it streams in and a spinner with the run's
state (its place in the line while it is queued).

Two renderings of the same state:

- on an interactive terminal, a rich :class:`~rich.live.Live` area redrawn by rich's own
  refresh thread (12.5 times a second) — a streamed answer grows token by token and is
  replaced by the stored message once it is committed;
- anywhere else (a pipe, a file, a dumb terminal), plain appended text: the tokens are
  written as they come and the line is ended when the message is stored; a change of queue
  position is one more line.

Threads: the watch loop (the command's thread) feeds events and tokens; the position poller
(a thread of :mod:`app.cli.watch`) feeds positions; rich's refresh thread reads. One lock
serializes the writers (see :class:`WatchView` for why rich's thread does without it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from app.cli.event_text import entry, event_text
from app.events import Event, MessagePayload, StatusPayload
from app.lifecycle import Status

REFRESHES_PER_SECOND = 12.5  # smooth enough for streamed tokens, cheap for the terminal


@dataclass(frozen=True)
class WatchState:
    """What the live area shows; replaced whole, so rich's thread reads it without a lock."""

    status: Status | None = None
    position: int | None = None  # in the line, while queued
    partial: str = ""  # the agent's answer so far, from delta frames

    def describe(self) -> str:
        if self.status == Status.QUEUED:
            if self.position is None:
                return "queued"
            return f"queued: position {self.position} in the line"
        return self.status.value if self.status is not None else "reading the stored events"


class WatchView:
    """The console side of one watch: call :meth:`event`, :meth:`delta` and
    :meth:`set_position` from any thread, inside ``with view:``.

    Locks: writers hold ``_lock`` while they change :attr:`state` and print (rich takes
    its own lock inside: ours is always taken first). Rich's refresh thread holds rich's
    lock and reads :attr:`state` without ours, so the two never wait for each other in
    opposite orders.
    """

    def __init__(self, console: Console, run_id: str | None, status: Status | None) -> None:
        self.console = console
        self.run_id = run_id
        self.state = WatchState(status)
        self._lock = threading.Lock()
        self._line_open = False  # piped: the cursor is at the end of streamed tokens
        self._printed = ""  # piped: the tokens printed since the last stored message
        self._spinner = Spinner("dots", style="yellow")  # one instance: it keeps its frame
        self._live: Live | None = None
        if console.is_interactive:
            self._live = Live(
                console=console,
                get_renderable=self._live_area,
                refresh_per_second=REFRESHES_PER_SECOND,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )

    @property
    def status(self) -> Status | None:
        return self.state.status

    def __enter__(self) -> WatchView:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()  # joins rich's refresh thread; the area is erased (transient)
        elif self._line_open:
            self._write("\n")

    def event(self, event: Event) -> None:
        """Show a stored event. The stored agent message ends the streamed answer: on a
        terminal it replaces it; piped, it is not printed again when the tokens said it
        all already."""
        with self._lock:
            state, payload = self.state, event.payload
            if isinstance(payload, StatusPayload) and event.run_id == self.run_id:
                position = state.position if payload.status == Status.QUEUED else None
                state = replace(state, status=payload.status, position=position)
            if isinstance(payload, MessagePayload):
                state = replace(state, partial="")
            self.state = state
            if self._line_open:
                self._write("\n")  # end the streamed line
                self._line_open = False
            shown = self._live is None and self._streamed_shown(payload)
            if not shown:
                self.console.print(event_text(event))
            if self._live is not None:
                self._live.refresh()

    def delta(self, text: str) -> None:
        """A piece of the agent's answer, before the answer is stored."""
        with self._lock:
            if self._live is None:
                if not self._line_open:
                    self.console.print(entry("agent", "", "cyan"), end="")
                    self._line_open = True
                self._write(text)
            self._printed += text
            self.state = replace(self.state, partial=self.state.partial + text)

    def set_position(self, position: int | None) -> None:
        """The run's place in the line (1 = next to start), while it is queued."""
        with self._lock:
            if position == self.state.position or self.state.status != Status.QUEUED:
                return
            self.state = replace(self.state, position=position)
            if self._live is None and position is not None and not self._line_open:
                self.console.print(entry("queue", f"position {position}", "yellow"))

    def _streamed_shown(self, payload: object) -> bool:
        """Piped: is ``payload`` the message whose tokens were printed already?"""
        if not isinstance(payload, MessagePayload):
            return False
        printed, self._printed = self._printed, ""
        return bool(printed) and payload.text == printed

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()

    def _live_area(self) -> RenderableType:
        """Called by rich (under rich's lock), never with ours."""
        state = self.state
        self._spinner.update(text=Text(state.describe(), style="yellow"))
        if not state.partial:
            return self._spinner
        return Group(entry("agent", state.partial, "cyan"), self._spinner)
