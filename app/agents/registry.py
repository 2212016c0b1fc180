"""The registry of agent kinds: ``agent.kind`` in a request picks one.

A kind is a pydantic model for its spec (with a ``kind: Literal[...]`` field) and a factory
that builds an :class:`~app.agents.base.Agent` from a validated spec; optionally a
validation *context* its model's validators read (the ``llm`` kind passes the names of the
operator's providers, so an unknown one is refused before anything is stored). Embedders
register their own kinds on a registry and hand it to the supervisor::

    registry = default_registry()
    registry.register("echo", EchoSpec, EchoAgent)
    async with open_run_supervisor(settings, store, registry=registry) as supervisor: ...

Ownership: a kind may share a resource among its runs (the ``llm`` kind shares one HTTP
client per provider). Its closer is registered with :meth:`AgentRegistry.add_closer`; the supervisor
that owns the registry awaits :meth:`AgentRegistry.aclose` when its ``serve()`` ends, after
every run has returned.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from pydantic import BaseModel, ValidationError

from app.agents.base import Agent
from app.errors import InvalidInput
from app.settings import LLMSettings

if TYPE_CHECKING:
    import httpx  # imported with the llm kind, when a default registry is built

    from app.agents.providers import Providers

log = logging.getLogger("trellis.agents")


@dataclass(frozen=True, slots=True)
class AgentKind:
    spec_model: type[BaseModel]
    factory: Callable[[Any], Agent]
    context: Mapping[str, Any] | None = None  # pydantic's validation context for the spec


class AgentRegistry:
    """Maps ``agent.kind`` to its spec model and factory."""

    def __init__(self) -> None:
        self._kinds: dict[str, AgentKind] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []
        #: The ``llm`` kind's providers (set by :func:`default_registry`), whose request
        #: and retry counts ``GET /metrics`` exports; None in a registry without them.
        self.providers: Providers | None = None

    def __repr__(self) -> str:
        return f"<AgentRegistry kinds={sorted(self._kinds)}>"

    @property
    def kinds(self) -> list[str]:
        return sorted(self._kinds)

    def spec_models(self) -> dict[str, type[BaseModel]]:
        """Each registered kind's spec model, by kind (e.g. for the OpenAPI document)."""
        return {kind: self._kinds[kind].spec_model for kind in self.kinds}

    def register(
        self,
        kind: str,
        spec_model: type[BaseModel],
        factory: Callable[[Any], Agent],
        *,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a kind; ``context`` is handed to every validation of its specs.

        Errors: ``ValueError`` if ``kind`` is already registered.
        """
        if kind in self._kinds:
            raise ValueError(f"agent kind {kind!r} is already registered")
        self._kinds[kind] = AgentKind(spec_model, factory, context)

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Have :meth:`aclose` await ``closer()``: it releases what a kind shares among its
        runs (a connection pool). It must be idempotent and must not block for long."""
        self._closers.append(closer)

    async def aclose(self) -> None:
        """Await every closer, the last added first. Call it once no run is left; calling it
        again is harmless, and a kind may reopen its resource if the registry is reused.

        Cancellation:
            Shielded: a supervisor closes its registry while it is being cancelled.

        Errors:
            None raised: a closer that fails is logged, and the others still run.
        """
        with trio.CancelScope(shield=True):
            for closer in reversed(self._closers):
                try:
                    await closer()
                except Exception:
                    log.exception("closing %r failed", closer)

    def validate(
        self,
        spec: Mapping[str, Any],
        *,
        loc: tuple[str, ...] = ("agent",),
        tools: Collection[str] | None = None,
    ) -> BaseModel:
        """Validate a raw spec against its kind's model; with ``tools`` (the names that
        exist), a spec's ``tools`` list may only name those.

        Errors:
            :class:`~app.errors.InvalidInput` naming the field (``agent.kind`` for an
            unknown kind, ``agent.steps.0.sleep`` for a bad step, ``agent.tools.1`` for a
            tool that does not exist, …).
        """
        kind = spec.get("kind")
        if not isinstance(kind, str) or kind not in self._kinds:
            raise InvalidInput(
                f"invalid input: {'.'.join(loc)}.kind must be one of {self.kinds}",
                detail=[
                    {
                        "loc": [*loc, "kind"],
                        "msg": f"unknown agent kind {kind!r}",
                        "type": "unknown_agent_kind",
                    }
                ],
            )
        known = self._kinds[kind]
        # A kind whose spec names tools in other places (script steps) checks them
        # against the context's "tools"; the kind's own context comes with them.
        context = {**(known.context or {}), "tools": tools}
        try:
            validated = known.spec_model.model_validate(spec, context=context)
        except ValidationError as exc:
            raise InvalidInput.from_validation_error(exc, prefix=loc) from None
        if tools is not None:
            _check_tool_names(getattr(validated, "tools", None), tools, loc)
        return validated

    def create(self, spec: Mapping[str, Any]) -> Agent:
        """Build an agent for one run from a stored spec (validated again: the server's
        settings may have changed since it was stored — a provider removed).

        Errors: :class:`~app.errors.InvalidInput` whose message says what no longer fits.
        """
        try:
            validated = self.validate(spec)
        except InvalidInput as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in exc.detail or []
            )
            raise InvalidInput(
                f"the conversation's agent spec is not valid on this server: {problems}",
                detail=exc.detail,
            ) from None
        return self._kinds[str(spec["kind"])].factory(validated)


def _check_tool_names(named: Any, known: Collection[str], loc: tuple[str, ...]) -> None:
    if not isinstance(named, list):
        return  # this kind has no tool list
    unknown = [(index, name) for index, name in enumerate(named) if name not in known]
    if unknown:
        raise InvalidInput(
            f"invalid input: {'.'.join(loc)}.tools names unknown tools; the tools are "
            f"{sorted(known)}",
            detail=[
                {
                    "loc": [*loc, "tools", index],
                    "msg": f"unknown tool {name!r}",
                    "type": "unknown_tool",
                }
                for index, name in unknown
            ],
        )


def default_registry(
    llm: LLMSettings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> AgentRegistry:
    """A registry with the built-in kinds: ``script``, and ``llm`` with the providers of
    ``llm`` (the ``[llm]`` table).

    Building it takes the providers' API keys out of the environment (see
    :mod:`app.agents.providers`). The ``llm`` runs that pick a provider share its
    :class:`~app.agents.provider.ProviderClient` (one HTTP client), closed by
    :meth:`AgentRegistry.aclose`. ``transport`` (tests) replaces their network transport.
    """
    from app.agents.llm import LLMAgent, LLMSpec
    from app.agents.providers import PROVIDERS_CONTEXT, Providers
    from app.agents.script import ScriptAgent, ScriptSpec

    providers = Providers(llm or LLMSettings(), transport=transport)
    registry = AgentRegistry()
    registry.register("script", ScriptSpec, ScriptAgent)
    registry.register(
        "llm",
        LLMSpec,
        lambda spec: LLMAgent(spec, providers.get(spec.provider)),
        context={PROVIDERS_CONTEXT: providers.names},
    )
    registry.add_closer(providers.aclose)
    registry.providers = providers
    return registry
