"""Agents: the protocol, the registry of kinds, and the built-in ``script`` kind."""

from app.agents.base import CONTINUE, Agent, StepContext, StepResult, finish
from app.agents.registry import AgentRegistry, default_registry

__all__ = [
    "CONTINUE",
    "Agent",
    "AgentRegistry",
    "StepContext",
    "StepResult",
    "default_registry",
    "finish",
]
