"""Fakes for tests and for embedders' own tests (in the spirit of ``trio.testing``).

The fake model provider lives in :mod:`app.testing_llm` and is re-exported here:
:class:`FakeChatServer`, :func:`text_reply`, :func:`tool_call_reply`, :func:`error_reply`.

:class:`Gates` and the ``gated`` agent kind make run threads deterministic: a gated step
announces that it has *entered* and then blocks until the test *releases* it, so a test can
hold any number of runs mid-step, assert on ``supervisor.statistics()``, and let them go —
no sleeps, no luck::

    gates = Gates()
    registry = gated_registry(gates)
    async with open_run_supervisor(settings, store, registry=registry) as supervisor:
        ...  # create a conversation with agent {"kind": "gated", "steps": ["a", "b"]}
        await gates["a"].wait_entered()
        gates["a"].release()

A gated step waits with ``ctx.check_cancelled()`` between short waits on its
``threading.Event``, so an interrupt stops it within one poll interval (10 ms).
"""

from __future__ import annotations

import threading
from typing import Literal

import trio
from pydantic import BaseModel, ConfigDict, Field

from app.agents.base import CONTINUE, StepContext, StepResult, finish
from app.agents.registry import AgentRegistry, default_registry
from app.events import MessagePayload
from app.testing_llm import FakeChatServer, error_reply, text_reply, tool_call_reply

__all__ = [
    "FakeChatServer",
    "Gate",
    "GatedAgent",
    "GatedSpec",
    "Gates",
    "error_reply",
    "gated_registry",
    "text_reply",
    "tool_call_reply",
]

POLL_SECONDS = 0.01  # how often a blocked gated step checks for cancellation


class Gate:
    """A named meeting point between a test (Trio side) and gated steps (run threads)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._entered = threading.Condition(self._lock)
        self.entries = 0  # how many steps have entered this gate so far
        self._released = threading.Event()

    def __repr__(self) -> str:
        state = "released" if self._released.is_set() else "closed"
        return f"<Gate {self.name!r} {state}, entered {self.entries}x>"

    def release(self) -> None:
        """Let every step waiting at this gate (and every later one) pass."""
        self._released.set()

    async def wait_entered(self, count: int = 1) -> None:
        """Wait until ``count`` steps in total have entered this gate (from Trio)."""

        def wait() -> None:
            with self._entered:
                self._entered.wait_for(lambda: self.entries >= count)

        # Its own limiter: never Trio's default one, never the supervisor's.
        await trio.to_thread.run_sync(wait, limiter=trio.CapacityLimiter(1), abandon_on_cancel=True)

    def pass_through(self, ctx: StepContext) -> None:
        """Called by a gated step in its run thread: enter, then block until released."""
        with self._entered:
            self.entries += 1
            self._entered.notify_all()
        while not self._released.wait(POLL_SECONDS):
            ctx.check_cancelled()


class Gates:
    """Gates by name, created on first use."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Gate:
        with self._lock:
            if name not in self._gates:
                self._gates[name] = Gate(name)
            return self._gates[name]

    def release_all(self) -> None:
        with self._lock:
            gates = list(self._gates.values())
        for gate in gates:
            gate.release()


class GatedSpec(BaseModel):
    """``{"kind": "gated", "steps": ["a", "b"]}``: one step per gate name, then finish."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["gated"]
    steps: list[str] = Field(min_length=1)


class GatedAgent:
    """Each step says the gate's name, then passes through that gate."""

    def __init__(self, spec: GatedSpec, gates: Gates) -> None:
        self.spec = spec
        self.gates = gates

    def step(self, ctx: StepContext) -> StepResult:
        index = int(ctx.state.get("next_step", 0)) % len(self.spec.steps)
        name = self.spec.steps[index]
        ctx.emit(MessagePayload(text=f"gate {name}"))
        self.gates[name].pass_through(ctx)
        last = index + 1 == len(self.spec.steps)
        ctx.state["next_step"] = 0 if last else index + 1
        return finish() if last else CONTINUE


def gated_registry(gates: Gates, registry: AgentRegistry | None = None) -> AgentRegistry:
    """``registry`` (default: the built-in kinds) with the ``gated`` kind added."""
    registry = registry or default_registry()
    registry.register("gated", GatedSpec, lambda spec: GatedAgent(spec, gates))
    return registry
