"""A server whose ``stubborn`` agent kind blocks without any cancellation point.

Used by tests/test_process.py to exercise what only a badly behaved agent can trigger: the
shutdown grace running out, and the second signal. Arguments are ``serve``'s flags.
"""

from __future__ import annotations

import sys
import time
from typing import Literal

from kind_server import serve_with_kind
from pydantic import BaseModel

from app import MessagePayload, StepContext, StepResult, finish


class StubbornSpec(BaseModel):
    kind: Literal["stubborn"]
    seconds: float


class StubbornAgent:
    """Sleeps in the run thread with ``time.sleep``: an interrupt cannot reach it."""

    def __init__(self, spec: StubbornSpec) -> None:
        self.seconds = spec.seconds

    def step(self, ctx: StepContext) -> StepResult:
        ctx.emit(MessagePayload(text="sleeping"))  # from here on, no cancellation point
        time.sleep(self.seconds)
        return finish()


def main() -> int:
    return serve_with_kind("stubborn", StubbornSpec, StubbornAgent)


if __name__ == "__main__":
    sys.exit(main())
