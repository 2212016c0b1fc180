"""A server whose ``stubborn`` agent kind blocks without any cancellation point.

Used by tests/test_process.py to exercise what only a badly behaved agent can trigger: the
shutdown grace running out, and the second signal. Arguments are ``serve``'s flags.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Literal

import trio
from pydantic import BaseModel

from app import MessagePayload, StepContext, StepResult, default_registry, finish, load_settings
from app.cli import serve


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
    flags = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=True))
    settings = load_settings(**{key.lstrip("-").replace("-", "_"): v for key, v in flags.items()})
    registry = default_registry()
    registry.register("stubborn", StubbornSpec, StubbornAgent)
    return trio.run(functools.partial(serve, settings, registry=registry))


if __name__ == "__main__":
    sys.exit(main())
