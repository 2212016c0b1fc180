"""The operator's model providers, by name: what an ``llm`` agent spec may choose from.

``[llm]`` is the provider called ``default``; each ``[llm.providers.NAME]`` table adds one
more. An agent spec names one (``"provider": "NAME"``, or nothing for ``default``) and
never a URL or an environment variable: the spec picks a line, the operator wired it.

Keys: building a :class:`Providers` takes each provider's key out of the environment
(:func:`app.redact.take_secret`: read once, removed from ``os.environ`` and wiped from
``/proc/<pid>/environ``, kept in memory for the process's life), so a command a run starts
can never read it, and no later change to the environment can redirect it.

Ownership: one :class:`~app.agents.provider.ProviderClient` per provider, each with its own
HTTP client (its own timeouts; one provider's connections never carry another's key).
:func:`~app.agents.registry.default_registry` builds the set and registers
:meth:`Providers.aclose` as a closer of the registry.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import httpx

from app.agents.provider import ProviderClient
from app.redact import take_secret
from app.settings import DEFAULT_PROVIDER, LLMSettings

#: The pydantic validation context key under which ``LLMSpec`` finds the provider names.
PROVIDERS_CONTEXT = "llm_providers"


class UnknownProvider(LookupError):
    """An agent spec names a provider the server does not have."""


class Providers:
    """Every configured provider's client, by name; ``default`` first.

    ``environ`` (default ``os.environ``) is where the keys are taken from; ``transport``
    (tests) replaces every client's network transport.
    """

    def __init__(
        self,
        llm: LLMSettings,
        *,
        environ: MutableMapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._clients = {
            name: ProviderClient(
                table,
                name=name,
                api_key=take_secret(table.api_key_env, environ) if table.api_key_env else None,
                transport=transport,
            )
            for name, table in llm.provider_tables().items()
        }

    def __repr__(self) -> str:
        return f"<Providers {self.names}>"

    @property
    def names(self) -> list[str]:
        """The provider names, ``default`` first."""
        return list(self._clients)

    def get(self, name: str | None) -> ProviderClient:
        """The provider called ``name`` (None: ``default``).

        Errors: :class:`UnknownProvider` naming the providers there are.
        """
        try:
            return self._clients[name or DEFAULT_PROVIDER]
        except KeyError:
            raise UnknownProvider(unknown_provider_message(name, self.names)) from None

    async def aclose(self) -> None:
        """Close every provider's HTTP client (idempotent; see ``ProviderClient.aclose``)."""
        for client in self._clients.values():
            await client.aclose()


def unknown_provider_message(name: object, names: list[str]) -> str:
    """What to tell whoever named a provider that does not exist."""
    return (
        f"unknown provider {name!r}; this server's providers are {names}"
        " (the operator adds one as an [llm.providers.NAME] table)"
    )
