"""The agent protocol: what an agent kind implements, and what a step may use.

An agent is *blocking* code: :meth:`Agent.step` runs in the run's worker thread. One call is
one step of the loop; between steps the loop checks for cancellation and pause, and saves
progress. Inside a step, anything that may block for long must go through the context
(:meth:`StepContext.sleep`, :meth:`StepContext.call_async`, :meth:`StepContext.run_tools`) so
that an interrupt stops it at once.

Cancellation:
    When the run is interrupted (or the server shuts down), the blocking context call in
    progress raises :class:`trio.Cancelled`. Let it propagate: do not catch
    ``BaseException``. A step that raised is *not done* — its state changes are not saved,
    and the next run repeats it.

Errors:
    Any ``Exception`` a step raises ends the run with status ``error``; the exception's
    message is stored as an ``error`` event. Other runs are unaffected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from app.events import Event, Payload, Source
from app.tools.base import ToolResult
from app.tools.calls import ToolCall

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step tells the loop: keep going, or the run is done (``finished``)."""

    done: bool = False
    message: str | None = None


CONTINUE = StepResult()


def finish(message: str | None = None) -> StepResult:
    """The run is complete; the conversation becomes ``finished``."""
    return StepResult(done=True, message=message)


class StepContext(Protocol):
    """What the run loop offers a step. Every method is called from the run thread."""

    @property
    def conversation_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def state(self) -> dict[str, Any]:
        """The agent's own JSON-able state, saved after every completed step."""
        ...

    def history(self, after_seq: int = 0) -> list[Event]:
        """The conversation's events with ``seq`` greater than ``after_seq``, oldest first
        (all of them by default). An agent that keeps what it built from earlier events
        asks only for the new ones: the last ``seq`` it saw."""
        ...

    def emit(self, payload: Payload, source: Source = Source.AGENT) -> Event:
        """Commit an event and return it (committed before this returns)."""
        ...

    def delta(self, text: str) -> None:
        """Show ``text``, a fragment of what the agent is producing right now (a model's
        tokens), to whoever watches the conversation live. Ephemeral: not stored, not in
        :meth:`history`; emit the complete message as an event once it is done. Cheap and
        never blocks; dropped when nobody watches. Callable from the run thread and from
        a function running on the Trio side through :meth:`call_async`."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds``; an interrupt ends it at once with ``trio.Cancelled``."""
        ...

    def call_async(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``afn(*args)`` on the Trio side; it is cancelled together with the run."""
        ...

    def run_tools(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Run blocking calls in parallel on the tool limiter; results in call order."""
        ...

    def call_tools(
        self,
        calls: Sequence[ToolCall],
        max_parallel: int = 4,
        allowed: Collection[str] | None = None,
    ) -> list[ToolResult]:
        """Run tool calls (validated; at most ``max_parallel`` at once) and return their
        results in call order. Records an ``action`` event per call before, and an
        ``observation`` event per result after. A tool not in ``allowed`` (when given) gets
        an error result, like an unknown one. Cancelled together with the run."""
        ...

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        """The function description the model gets for tool ``name`` (None: no such tool)."""
        ...

    def check_cancelled(self) -> None:
        """Raise ``trio.Cancelled`` if the run was interrupted (cheap; call it in loops)."""
        ...


class Agent(Protocol):
    """One agent instance drives one run. Built by its kind's factory from the spec."""

    def step(self, ctx: StepContext) -> StepResult: ...
