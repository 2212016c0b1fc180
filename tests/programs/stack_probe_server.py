"""A server whose ``stack_probe`` agent reports the stack size of the threads it runs in.

Used by tests/test_threads.py: the run's message is ``run=<bytes> tool=<bytes>``, what
``pthread_getattr_np`` says about the run thread and about a tool thread (``ctx.run_tools``)
— an observation of the real threads, not the setting read back. Arguments are ``serve``'s
flags.
"""

from __future__ import annotations

import sys
from typing import Literal

from kind_server import serve_with_kind
from pydantic import BaseModel

from app import MessagePayload, StepContext, StepResult, finish
from app.threads import current_thread_stack_bytes


class StackProbeSpec(BaseModel):
    kind: Literal["stack_probe"]


class StackProbeAgent:
    """One step: measure the run thread and one tool thread, say both, finish."""

    def __init__(self, spec: StackProbeSpec) -> None:
        del spec

    def step(self, ctx: StepContext) -> StepResult:
        [tool] = ctx.run_tools([current_thread_stack_bytes])
        ctx.emit(MessagePayload(text=f"run={current_thread_stack_bytes()} tool={tool}"))
        return finish()


def main() -> int:
    return serve_with_kind("stack_probe", StackProbeSpec, StackProbeAgent)


if __name__ == "__main__":
    sys.exit(main())
