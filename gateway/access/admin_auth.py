"""The admin API's one door: who is calling (an Actor with a role), from the admin key, a console
session or a provider's access token (gateway/access/oidc.py when `auth.oidc` is set).

401 without credentials; 403 `not_admin` for a client key or a token that maps to no role; 403
`admin_disabled` when neither an admin key nor sign-in is configured.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import Scope

from gateway.access.auth import bearer, is_admin_key
from gateway.access.roles import Actor
from gateway.core.errors import Code, GatewayError
from gateway.core.request import header


class SignIn(Protocol):
    """What OIDC adds: a console session (with its CSRF check) and provider access tokens."""

    async def session_actor(self, scope: Scope) -> Actor | None:
        """The signed-in person of the session cookie; raises 403 `csrf_failed` on a change
        without the session's CSRF token. None when there is no valid session."""
        ...

    async def token_actor(self, token: str, scope: Scope) -> Actor | None:
        """The role of a provider's JWT access token; None when it is not one (not a JWT)."""
        ...


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


class AdminAuth:
    def __init__(self, admin_key: str | None, sign_in: SignIn | None = None) -> None:
        self.admin_key = admin_key
        self.sign_in = sign_in

    async def actor(self, scope: Scope) -> Actor:
        if self.admin_key is None and self.sign_in is None:
            raise GatewayError(
                403,
                "The admin API is disabled: no admin key is configured. Set the environment variable "
                "GATEWAY_ADMIN_KEY (or configure auth.oidc sign-in) and restart the gateway.",
                code=Code.ADMIN_DISABLED,
            )
        address = client_address(scope)
        if self.sign_in is not None and not header(scope, b"authorization"):
            found = await self.sign_in.session_actor(scope)
            if found is not None:
                return found
        if not header(scope, b"authorization"):
            raise GatewayError(
                401,
                "Missing admin key: send GATEWAY_ADMIN_KEY as 'Authorization: Bearer <key>'"
                + (", or sign in." if self.sign_in is not None else "."),
                code=Code.MISSING_API_KEY,
            )
        secret = bearer(scope)
        if is_admin_key(secret, self.admin_key):
            return Actor("admin-key", "admin", address=address)
        if self.sign_in is not None:
            found = await self.sign_in.token_actor(secret, scope)
            if found is not None:
                return found
        if self.sign_in is not None:
            raise GatewayError(
                403,
                "Not the admin key, nor a sign-in token with a role: the admin API refuses it.",
                code=Code.NOT_ADMIN,
            )
        raise GatewayError(403, "Not the admin key: the admin API takes only GATEWAY_ADMIN_KEY.", code=Code.NOT_ADMIN)
