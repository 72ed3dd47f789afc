"""Who may call and how much: the seam between the request path and keys/quotas.

`OpenAccess` serves everyone (auth disabled in the config); `KeyedAccess` (gateway/auth.py)
checks API keys and quotas in Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    key: Any = None  # the ApiKey record, when there is one

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(slots=True)
class Ticket:
    """An admitted request: what to reconcile at the end and the headers to send."""

    principal: Principal
    admission: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    prompt_estimate: int = 0  # counted at admission; charged when the engine reports no usage
    handed_over: bool = False  # a stream took over the engine slot and the accounting

    def header_pairs(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode()) for k, v in self.headers.items()]


ANONYMOUS = Principal()


class Access(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def authenticate(self, request: Request) -> Principal: ...

    async def admit(self, principal: Principal, model: str, body: dict[str, Any]) -> Ticket: ...

    async def finish(self, ticket: Ticket, status: int, exact: bool, prompt: int, completion: int) -> None: ...


class OpenAccess:
    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def authenticate(self, request: Request) -> Principal:
        return ANONYMOUS

    async def admit(self, principal: Principal, model: str, body: dict[str, Any]) -> Ticket:
        return Ticket(principal)

    async def finish(self, ticket: Ticket, status: int, exact: bool, prompt: int, completion: int) -> None:
        return None
