"""Tools run by agents. For now: running blocking calls in parallel on the tool limiter."""

from app.tools.parallel import run_in_tool_threads

__all__ = ["run_in_tool_threads"]
