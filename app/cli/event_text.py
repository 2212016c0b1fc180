"""How one stored event reads in a terminal: ``#seq``, who, and what.

::

      #2 user    Count to three, slowly.
      #3 status  running (start)
      #4 agent   one
      #5 call    terminal {"command": "ls"}
      #6 output  terminal: a.txt
                 b.txt
      #9 error   ScriptFailure: boom

Used by ``trellis watch`` (each event as it arrives) and ``trellis show`` (the last ones).
Pure functions: no I/O.
"""

from __future__ import annotations

import json

from rich.text import Text

from app.events import (
    ActionPayload,
    ErrorPayload,
    Event,
    LLMCallPayload,
    MessagePayload,
    ObservationPayload,
    StatusPayload,
    WebhookPayload,
)

SEQ_WIDTH = 6  # "#12345" and a space: seqs past 99,999 just push the line right
LABEL_WIDTH = 7  # the longest labels ("status", "output": 6 characters) and a space
#: Lines of a tool's output shown; the rest is counted ("… 12 more lines").
OUTPUT_LINES = 20

_STATUS_STYLES = {
    "finished": "bold green",
    "error": "bold red",
    "paused": "bold yellow",
    "pausing": "yellow",
}


def event_text(event: Event) -> Text:
    """The event as one entry (a message or a tool's output may span several lines)."""
    label, body, style = _describe(event)
    return entry(label, body, style, seq=event.seq)


def entry(label: str, body: str, style: str = "", *, seq: int | None = None) -> Text:
    """``#seq label body``, continuation lines indented under ``body``."""
    head = f"#{seq}" if seq is not None else ""
    text = Text()
    text.append(head.rjust(SEQ_WIDTH) + " ", style="dim")
    text.append(label.ljust(LABEL_WIDTH), style=f"bold {style}".strip())
    indent = "\n" + " " * (SEQ_WIDTH + 1 + LABEL_WIDTH)
    text.append(body.replace("\n", indent), style=style)
    return text


def _describe(event: Event) -> tuple[str, str, str]:
    """(label, body, style) of one event."""
    match event.payload:
        case MessagePayload(text=text):
            return event.source.value, text, "cyan" if event.source.value == "agent" else ""
        case StatusPayload(status=status, reason=reason):
            return "status", f"{status.value} ({reason})", _STATUS_STYLES.get(status.value, "dim")
        case ActionPayload(tool=tool, arguments=arguments):
            return "call", f"{tool} {json.dumps(arguments, ensure_ascii=False)}", "magenta"
        case ObservationPayload(tool=tool, content=content, is_error=is_error):
            return "output", f"{tool}: {_cut(content)}", "red" if is_error else ""
        case ErrorPayload(message=message, error_type=error_type):
            return "error", f"{error_type}: {message}", "bold red"
        case LLMCallPayload(model=model, prompt_tokens=p, completion_tokens=c, duration_ms=ms):
            return "llm", f"{model}: {p} + {c} tokens, {ms:.0f} ms", "dim"
        case WebhookPayload(outcome=outcome, url=url, attempts=attempts):
            return "hook", f"webhook {outcome} to {url} after {attempts} attempt(s)", "dim"
    return event.kind, event.payload.model_dump_json(), "dim"  # pragma: no cover


def _cut(content: str) -> str:
    """At most :data:`OUTPUT_LINES` lines of a tool's output."""
    lines = content.rstrip("\n").split("\n")
    if len(lines) <= OUTPUT_LINES:
        return "\n".join(lines)
    rest = len(lines) - OUTPUT_LINES
    return "\n".join([*lines[:OUTPUT_LINES], f"… {rest} more lines"])
