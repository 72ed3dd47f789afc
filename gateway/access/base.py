"""Who may call and how much: the seam between the request path and keys/quotas.

`OpenAccess` serves everyone (auth disabled in the config); `KeyedAccess` (gateway/access/auth.py)
checks API keys and quotas in Redis. The exchange calls `admit` once and `settle` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from starlette.types import Scope

from gateway.core.request import ApiRequest

if TYPE_CHECKING:  # records of the keyed implementation (gateway/access/auth.py), typed here without a cycle
    from gateway.access.keys import ApiKey
    from gateway.access.quota import Admission

PRIORITIES = ("high", "normal", "low")  # a key's scheduling band, in dispatch order (gateway/dispatch/fair_queue.py)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    key: ApiKey | None = None  # the key's record, when there is one
    priority: str = "normal"  # the scheduler's band: high, normal, low (gateway/dispatch/fair_queue.py)
    weight: float = 1.0  # the key's share within its band

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal()


@dataclass(slots=True)
class Grant:
    """An admitted request: what to reconcile at the end and the headers to send."""

    principal: Principal
    request: ApiRequest | None = None
    admission: Admission | None = None  # the quota's reservation, when one was made
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    route: str | None = None  # the route that served it (set by the exchange before settling)
    # What settle charged, and its cost in nano-units: a batch line's spend row (gateway/monitor/spend.py).
    usage: Usage | None = None
    cost: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    exact: bool  # reported by the engine; otherwise estimated from what was relayed
    cached_tokens: int = 0  # of the prompt, served from the engine's prefix cache (priced as cached_input)


class Access(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def authenticate(self, scope: Scope) -> Principal: ...

    async def admit(self, principal: Principal, request: ApiRequest) -> Grant:
        """Checks the key's limits and reserves; a request with `batch_id` set is a batch line, to
        which rpm and max_concurrent do not apply."""
        ...

    async def principal_of(self, key_id: str | None) -> Principal:
        """The principal that owns a stored batch (its key id, None when auth was off), for the
        batch runner, which has no request to authenticate. Raises GatewayError (401) when the
        key is unknown."""
        ...

    async def settle(self, grant: Grant, usage: Usage) -> Usage:
        """Reconciles the reservation with what was used; returns the usage it charged."""
        ...


class OpenAccess:
    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def authenticate(self, scope: Scope) -> Principal:
        return ANONYMOUS

    async def admit(self, principal: Principal, request: ApiRequest) -> Grant:
        return Grant(principal)

    async def principal_of(self, key_id: str | None) -> Principal:
        return ANONYMOUS

    async def settle(self, grant: Grant, usage: Usage) -> Usage:
        return usage
