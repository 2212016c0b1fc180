"""Log lines a person can follow, or one JSON object per line for log shippers.

Every line goes to stderr through the root logger, in one of two formats (``log_format``):

* ``text``: ``2026-12-03T07:20:01.123Z INFO trellis.http: GET /health 200 0.4ms``
* ``json``: ``{"ts": "2026-12-03T07:20:01.123Z", "level": "info", "logger": "trellis.http",
  "message": "GET /health 200 0.4ms", "method": "GET", "path": "/health", "status": 200,
  "ms": 0.4}``

Structured fields come from :func:`log_fields`: the message is a ``str.format`` template over
the fields, so a person reads a sentence and a shipper gets the fields as keys. The text
format appends the fields the sentence does not mention as ``key=value``. Plain
``logger.info("...")`` calls work too; they just carry no fields.

Stdout is not a log: ``trellis serve`` prints exactly one line there, ``trellis: serving on
URL``, for scripts that wait for the server.
"""

from __future__ import annotations

import functools
import json
import logging
import string
import sys
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "log_fields"]

# The LogRecord attributes log_fields() sets: every field, and those the message leaves out.
_FIELDS = "trellis_fields"
_UNSAID = "trellis_unsaid"
# Keys of every JSON line; a field of the same name cannot replace them.
_BASE_KEYS = ("ts", "level", "logger", "message")


def log_fields(
    logger: logging.Logger, message: str, /, level: int = logging.INFO, **fields: Any
) -> None:
    """Log ``message.format(**fields)`` at ``level``, with ``fields`` attached as data.

    ``log_fields(log, "run {run_id} ended {status}", run_id=r, status="finished", steps=3)``
    reads ``run 93b2… ended finished steps=3`` in text and carries ``run_id``, ``status``
    and ``steps`` as keys in JSON. Costs nothing when ``level`` is disabled.

    Errors:
        ``KeyError`` when the template names a field that was not given (a programming
        error, raised at the call instead of a broken line in the log).
    """
    if not logger.isEnabledFor(level):
        return
    said = _named_in(message)
    unsaid = {key: value for key, value in fields.items() if key not in said}
    logger.log(
        level,
        "%s",
        message.format_map(fields),
        extra={_FIELDS: fields, _UNSAID: unsaid},
        stacklevel=2,
    )


@functools.lru_cache(maxsize=256)  # templates are literals: a handful per program
def _named_in(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _logfmt(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message> key=value ...``, then any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        unsaid: dict[str, Any] = getattr(record, _UNSAID, {})
        if unsaid:
            line += " " + " ".join(f"{key}={_logfmt(value)}" for key, value in unsaid.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the fields, any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = dict(getattr(record, _FIELDS, {}))
        entry.update(
            ts=_timestamp(record),
            level=record.levelname.lower(),
            logger=record.name,
            message=record.getMessage(),
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        ordered = {key: entry.pop(key) for key in _BASE_KEYS} | entry
        return json.dumps(ordered, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler[IO[str]]):
    """The root handler :func:`configure_logging` installs (so it can find it again)."""


def configure_logging(level: str, log_format: str, stream: IO[str] | None = None) -> None:
    """Send every logger's records at ``level`` or above to ``stream`` (stderr) as
    ``log_format`` (``text`` or ``json``).

    Calling it again replaces the handler it installed before; handlers installed by others
    (an embedding program, pytest) are left alone.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
