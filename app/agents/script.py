"""The ``script`` agent: deterministic steps from the request — for demos, tests, teaching.

::

    {"kind": "script", "steps": [{"say": "hi"}, {"sleep": 2.5}, {"fail": "boom"},
                                 {"finish": "done"}]}

Each script step is one step of the loop. ``say`` emits an agent message; ``sleep`` blocks
the run thread (interruptible); ``fail`` raises inside the step (the run ends ``error``);
``finish`` ends the run ``finished`` with its text as the agent's last message. A run that
executes the last step finishes.

Tools without a model: ``{"tool": "terminal", "args": {"command": "ls"}}`` calls one tool;
a *list* of such objects is one step whose calls run in parallel (results in call order).
Each call is recorded as an ``action`` and an ``observation`` event; a ``finish`` tool call
ends the run.

Validation is strict, and happens before a conversation is stored: ``{"sleep": "5"}`` is
not a number, and a request naming a tool the server does not have is refused (422).

Resuming: the index of the next step lives in the conversation's agent state, saved after
each *completed* step. A new run continues where the previous run stopped; a step that was
interrupted or failed was not completed, so it runs again. Once the script has finished, a
new run starts it from the first step.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from app.agents.base import CONTINUE, StepContext, StepResult, finish
from app.events import MessagePayload
from app.tools.calls import ToolCall

MAX_SLEEP_SECONDS = 86_400.0  # one day: longer is surely a typo in a script


class ScriptFailure(Exception):
    """Raised by a ``fail`` step."""


class _Step(BaseModel):
    # strict: "sleep": "5" or true is a mistake in the script, not a number
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SayStep(_Step):
    say: str = Field(max_length=100_000)


class SleepStep(_Step):
    sleep: float = Field(ge=0, le=MAX_SLEEP_SECONDS)


class FailStep(_Step):
    fail: str = Field(max_length=10_000)


class FinishStep(_Step):
    finish: str = Field(max_length=100_000)


class ToolStep(_Step):
    tool: str = Field(min_length=1, max_length=100)
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tool")
    @classmethod
    def _known_tool(cls, name: str, info: ValidationInfo) -> str:
        """With the validation context's ``tools`` (the names that exist, given when a
        request is validated), only those. A stored spec is validated without them: a tool
        gone since is then an error observation of the run, as for a model's call."""
        known = (info.context or {}).get("tools")
        if known is not None and name not in known:
            raise PydanticCustomError(
                "unknown_tool",
                "unknown tool '{name}'; the tools are {known}",
                {"name": name, "known": sorted(known)},
            )
        return name


_STEP_KEYS = ("say", "sleep", "fail", "finish", "tool")
MAX_PARALLEL_SCRIPT_TOOLS = 16  # a list step runs at most this many calls at once


def _step_key(value: Any) -> str | None:
    """The discriminator: which key a step has, or "tools" for a list (None → an error)."""
    if isinstance(value, list):
        return "tools"
    if isinstance(value, dict):
        keys = [key for key in _STEP_KEYS if key in value]
        return keys[0] if len(keys) == 1 else None
    return next((key for key in _STEP_KEYS if hasattr(value, key)), None)


ScriptStep = Annotated[
    Annotated[SayStep, Tag("say")]
    | Annotated[SleepStep, Tag("sleep")]
    | Annotated[FailStep, Tag("fail")]
    | Annotated[FinishStep, Tag("finish")]
    | Annotated[ToolStep, Tag("tool")]
    | Annotated[list[ToolStep], Tag("tools"), Field(min_length=1, max_length=64)],
    Discriminator(
        _step_key,
        custom_error_type="invalid_step",
        custom_error_message=(
            "a step is an object with exactly one of: say, sleep, fail, finish, tool;"
            " or a list of tool steps"
        ),
    ),
]


class ScriptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    kind: Literal["script"]
    steps: list[ScriptStep] = Field(min_length=1, max_length=10_000)


class ScriptAgent:
    """Plays a :class:`ScriptSpec` one step per loop iteration."""

    def __init__(self, spec: ScriptSpec) -> None:
        self.steps = spec.steps

    def step(self, ctx: StepContext) -> StepResult:
        index = int(ctx.state.get("next_step", 0))
        if index >= len(self.steps):  # the script was edited shorter: start over
            index = 0
        step = self.steps[index]
        last = index + 1 == len(self.steps)
        ctx.state["next_step"] = 0 if last else index + 1
        match step:
            case SayStep(say=text):
                ctx.emit(MessagePayload(text=text))
            case SleepStep(sleep=seconds):
                ctx.sleep(seconds)
            case FailStep(fail=message):
                raise ScriptFailure(message)
            case FinishStep(finish=text):
                ctx.emit(MessagePayload(text=text))
                ctx.state["next_step"] = 0
                return finish(text)
            case ToolStep() | list():
                done = self._call_tools(ctx, index, step if isinstance(step, list) else [step])
                if done is not None:
                    ctx.state["next_step"] = 0
                    return done
        return finish() if last else CONTINUE

    @staticmethod
    def _call_tools(ctx: StepContext, index: int, steps: list[ToolStep]) -> StepResult | None:
        """Run the step's calls; a ``finish`` call ends the run with its message."""
        calls = [
            ToolCall(call_id=f"{ctx.run_id}:{index}:{n}", tool=step.tool, arguments=step.args)
            for n, step in enumerate(steps)
        ]
        for result in ctx.call_tools(calls, max_parallel=MAX_PARALLEL_SCRIPT_TOOLS):
            if result.data.get("finish"):
                message = str(result.data.get("message", ""))
                ctx.emit(MessagePayload(text=message))
                return finish(message)
        return None
