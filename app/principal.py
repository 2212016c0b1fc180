"""Who is asking: the principal a request acts for (its tenant, and whether it is an admin).

Every conversation belongs to one tenant. With API keys configured, a request's key decides
its principal (``app/auth.py`` sets it before any handler runs); without keys (the open,
loopback-only mode) every request acts as :data:`OPEN_PRINCIPAL`: the tenant ``default``,
with admin rights, which is exactly the single-user server that existed before tenants.

Code below the HTTP layer (the supervisor, the store) takes the tenant as an argument and
never reads request state: embedders call it with the tenant they mean.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The tenant of conversations created without keys (and of every conversation stored
#: before tenants existed).
DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    """The tenant a request acts for; ``admin`` may act across tenants and read server
    details. ``key_id`` names the key (never the key itself) for logs; ``None`` in open
    mode."""

    tenant: str
    admin: bool = False
    key_id: str | None = None

    def sees(self, tenant: str) -> bool:
        """Whether a conversation of ``tenant`` exists for this principal."""
        return self.admin or tenant == self.tenant


#: The principal of every request when no API keys are configured.
OPEN_PRINCIPAL = Principal(tenant=DEFAULT_TENANT, admin=True)
