"""Trellis: a Trio structured-concurrency server for AI-agent conversations.

The public surface, for embedders: run the supervisor in your own Trio program with
:func:`open_run_supervisor`, serve it over HTTP with :func:`create_app`, register agent
kinds on an :class:`AgentRegistry` and tools on a :class:`ToolRegistry`. Test doubles live in
``app.testing`` (gated agents) and ``app.testing_llm`` (a fake model provider).
"""

from app._version import __version__
from app.agents import (
    CONTINUE,
    Agent,
    AgentRegistry,
    StepContext,
    StepResult,
    default_registry,
    finish,
)
from app.errors import TrellisError
from app.events import Event, MessagePayload, Source
from app.handles import IfBusy, SupervisorStatistics
from app.lifecycle import Status
from app.records import ConversationRecord, RunRecord
from app.settings import LLMSettings, Settings, load_settings
from app.store import EventQuery, EventStore, NewConversation, SqliteStore
from app.supervisor import RunSupervisor, open_run_supervisor
from app.tools.base import Tool, ToolEnvironment, ToolResult
from app.tools.calls import ToolCall, ToolRegistry, default_tools
from app.web import create_app

__all__ = [
    "CONTINUE",
    "Agent",
    "AgentRegistry",
    "ConversationRecord",
    "Event",
    "EventQuery",
    "EventStore",
    "IfBusy",
    "LLMSettings",
    "MessagePayload",
    "NewConversation",
    "RunRecord",
    "RunSupervisor",
    "Settings",
    "Source",
    "SqliteStore",
    "Status",
    "StepContext",
    "StepResult",
    "SupervisorStatistics",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "ToolRegistry",
    "ToolResult",
    "TrellisError",
    "__version__",
    "create_app",
    "default_registry",
    "default_tools",
    "finish",
    "load_settings",
    "open_run_supervisor",
]
