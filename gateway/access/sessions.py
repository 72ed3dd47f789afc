"""Console sessions after an OIDC sign-in, and the sign-ins in progress, in Redis so that any
replica serves them.

    gw:session:<sha256 of the session id>   HASH subject, role, teams, csrf   (TTL: auth.oidc.session_ttl)
    gw:signin:<state>                       HASH verifier, nonce, redirect     (TTL: SIGNIN_TTL; used once)

The session id lives only in the browser's cookie (HttpOnly, SameSite=Strict, Secure under TLS);
Redis holds its hash. Every change made with a session must carry the session's CSRF token in the
`x-csrf-token` header (the console reads it from /ui/auth/me), compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from http.cookies import SimpleCookie
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from starlette.types import Scope

from gateway.access.admin_auth import client_address
from gateway.access.keys import redis_or_503, texts
from gateway.access.oidc import OidcError, OidcProvider, looks_like_jwt, pkce_pair
from gateway.access.oidc_roles import actor_of
from gateway.access.roles import Actor
from gateway.core.errors import Code, GatewayError
from gateway.core.request import header

COOKIE = "gw_session"
SIGNIN_TTL = 600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def session_cookie(scope: Scope) -> str | None:
    raw = header(scope, b"cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw.decode("latin-1"))
    except Exception:  # http.cookies raises CookieError (and worse) on hostile headers
        return None
    morsel = jar.get(COOKIE)
    value = morsel.value if morsel is not None else None
    return value if value and len(value) <= 128 else None


class OidcSignIn:
    """The SignIn of gateway/access/admin_auth.py: sessions and provider access tokens."""

    def __init__(self, provider: OidcProvider, redis: aioredis.Redis | RedisCluster, prefix: str = "gw") -> None:
        self.provider = provider
        self.settings = provider.settings
        self.redis = redis
        self.prefix = prefix

    def _session_key(self, sid: str) -> str:
        return f"{self.prefix}:session:{hashlib.sha256(sid.encode()).hexdigest()}"

    # ---- sign-in in progress ------------------------------------------------------------------

    async def begin(self, redirect_url: str) -> str:
        """A new sign-in: its state, PKCE verifier and nonce kept; returns the provider's URL."""
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier, challenge = pkce_pair()
        key = f"{self.prefix}:signin:{state}"
        async with redis_or_503():
            await self.redis.hset(key, mapping={"verifier": verifier, "nonce": nonce, "redirect": redirect_url})
            await self.redis.expire(key, SIGNIN_TTL)
        return await self.provider.authorize_url(redirect_url, state, nonce, challenge)

    async def finish(self, state: str, code: str, address: str) -> tuple[str, Actor]:
        """The provider's answer -> a new session id and who signed in. OidcError when refused."""
        if not 16 <= len(state) <= 64 or not code or len(code) > 4096:
            raise OidcError("the sign-in answer is malformed")
        key = f"{self.prefix}:signin:{state}"
        async with redis_or_503():
            pending = texts(await self.redis.hgetall(key))
            taken = await self.redis.delete(key)  # used once: a replayed answer finds nothing
        if not pending or not taken:
            raise OidcError("this sign-in is unknown or was already used; start again")
        claims = await self.provider.exchange(code, pending["verifier"], pending["redirect"], pending["nonce"])
        actor = actor_of(claims, self.settings, "session", address)
        if actor is None:
            raise OidcError("your account has no role on this gateway (ask an admin to map your groups)")
        sid = secrets.token_urlsafe(32)
        record: dict[Any, str] = {
            "subject": actor.subject,
            "role": actor.role,
            "teams": orjson.dumps(sorted(actor.teams)).decode(),
            "csrf": secrets.token_urlsafe(24),
        }
        async with redis_or_503():
            await self.redis.hset(self._session_key(sid), mapping=record)
            await self.redis.expire(self._session_key(sid), int(self.settings.session_ttl))
        return sid, actor

    # ---- sessions -----------------------------------------------------------------------------

    async def session(self, scope: Scope) -> dict[str, str] | None:
        sid = session_cookie(scope)
        if sid is None:
            return None
        async with redis_or_503():
            found = texts(await self.redis.hgetall(self._session_key(sid)))
        return found or None

    async def end(self, scope: Scope) -> None:
        sid = session_cookie(scope)
        if sid is not None:
            async with redis_or_503():
                await self.redis.delete(self._session_key(sid))

    async def session_actor(self, scope: Scope) -> Actor | None:
        found = await self.session(scope)
        if found is None:
            return None
        if scope.get("method", "GET") not in SAFE_METHODS:
            sent = header(scope, b"x-csrf-token") or b""
            if not hmac.compare_digest(sent, found.get("csrf", "").encode()):
                raise GatewayError(
                    403, "A change made from a session needs its x-csrf-token header.", code=Code.CSRF_FAILED
                )
        teams = _teams(found.get("teams"))
        return Actor(found.get("subject", ""), found.get("role", "viewer"), teams, "session", client_address(scope))

    async def token_actor(self, token: str, scope: Scope) -> Actor | None:
        if not looks_like_jwt(token):
            return None
        audience = self.settings.audience or self.settings.client_id
        try:
            claims = await self.provider.verify(token, audience)
        except OidcError as exc:
            raise GatewayError(401, f"The access token was refused: {exc}.", code=Code.INVALID_API_KEY) from None
        return actor_of(claims, self.settings, "bearer", client_address(scope))


def _teams(raw: Any) -> frozenset[str]:
    try:
        value = orjson.loads(raw) if raw else []
    except orjson.JSONDecodeError:
        return frozenset()
    return frozenset(str(v) for v in value) if isinstance(value, list) else frozenset()
