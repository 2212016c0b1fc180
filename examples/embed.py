"""Run conversations without HTTP: the run supervisor inside your own Trio program.

    .venv/bin/python examples/embed.py

Registers a custom agent kind (``echo``), runs two conversations through the same
supervisor the server uses, and prints their messages. When the ``async with`` block
ends, every run still going is stopped with reason ``shutdown`` and its thread joined.
"""

from __future__ import annotations

import tempfile
from typing import Literal

import trio
from pydantic import BaseModel

from app import (
    EventQuery,
    MessagePayload,
    NewConversation,
    Settings,
    SqliteStore,
    StepContext,
    StepResult,
    default_registry,
    finish,
    open_run_supervisor,
)


class EchoSpec(BaseModel):
    """What a request says about an echo agent: ``{"kind": "echo", "times": 2}``."""

    kind: Literal["echo"]
    times: int = 1


class EchoAgent:
    """Repeats the conversation's last user message, ``times`` times, then finishes."""

    def __init__(self, spec: EchoSpec) -> None:
        self.times = spec.times

    def step(self, ctx: StepContext) -> StepResult:  # runs in the run's worker thread
        said = [e.payload.text for e in ctx.history() if e.source == "user"]  # type: ignore[union-attr]
        for _ in range(self.times):
            ctx.emit(MessagePayload(text=f"echo: {said[-1]}"))
        return finish()


async def main() -> None:
    settings = Settings(data_dir=tempfile.mkdtemp(), max_concurrent_runs=2)
    store = SqliteStore(settings.database_path)
    registry = default_registry()
    registry.register("echo", EchoSpec, EchoAgent)
    try:
        async with open_run_supervisor(settings, store, registry=registry) as supervisor:
            for text, times in [("hello", 1), ("trio", 2)]:
                new = NewConversation(
                    agent={"kind": "echo", "times": times},
                    title=text,
                    max_iterations=10,
                    initial_message=text,
                )
                conversation, _ = await supervisor.io(store.create_conversation, new)
                run = await supervisor.start_run(conversation.id)
                ended = await supervisor.wait_run(conversation.id, run.id, timeout_seconds=10)
                assert ended is not None
                query = EventQuery(kind="message", source="agent")
                page = await supervisor.io(store.search_events, conversation.id, query)
                texts = [event.payload.text for event in page.items]  # type: ignore[union-attr]
                print(f"{conversation.title}: {ended.status} after {ended.steps} step(s): {texts}")
            print(supervisor)
    finally:
        store.close()


if __name__ == "__main__":
    trio.run(main)
