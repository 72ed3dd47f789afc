"""An OpenID Connect provider as the gateway sees it: its discovery document, its signing keys
(JWKS: cached for `jwks_ttl`, fetched again at once, at most every MIN_REFETCH seconds, when a
token names a key id it does not know, so a provider's key rotation needs no restart), the
authorization code exchange (with PKCE) and the verification of its JWTs (PyJWT: signature with
an allowed asymmetric algorithm only, issuer, audience, expiry with leeway).

Nothing here logs a token, a code or a secret; failures say what was wrong, not the token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from typing import Any

import httpx
import jwt

from gateway.settings.oidc import OidcSettings

log = logging.getLogger(__name__)

MIN_REFETCH = 5.0
MAX_TOKEN = 16_384  # bytes: a JWT longer than this is not one we will parse


class OidcError(Exception):
    """Why a token or a sign-in was refused (safe to show: never contains the token)."""


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, code_challenge) for S256."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and len(token) <= MAX_TOKEN and not token.startswith("sk-")


class OidcProvider:
    def __init__(self, settings: OidcSettings, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._http = http or httpx.AsyncClient(timeout=10)
        self._meta: dict[str, Any] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._keys_at = -1e18
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self._http.aclose()

    async def metadata(self) -> dict[str, Any]:
        if self._meta is None:
            url = self.settings.issuer + "/.well-known/openid-configuration"
            try:
                r = await self._http.get(url)
                r.raise_for_status()
                meta = r.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise OidcError(f"the provider's discovery document could not be read: {type(exc).__name__}") from None
            if not isinstance(meta, dict) or meta.get("issuer", "").rstrip("/") != self.settings.issuer:
                raise OidcError("the provider's discovery document names another issuer")
            self._meta = meta
        return self._meta

    async def _fetch_keys(self) -> None:
        meta = await self.metadata()
        try:
            r = await self._http.get(meta["jwks_uri"])
            r.raise_for_status()
            found = jwt.PyJWKSet.from_dict(r.json())
        except (httpx.HTTPError, ValueError, KeyError, jwt.PyJWTError) as exc:
            raise OidcError(f"the provider's keys could not be read: {type(exc).__name__}") from None
        self._keys = {k.key_id: k for k in found.keys if k.key_id and k.public_key_use in (None, "sig")}
        self._keys_at = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK:
        age = time.monotonic() - self._keys_at
        if kid not in self._keys or age > self.settings.jwks_ttl:
            async with self._lock:  # one fetch for every token that waits on it
                age = time.monotonic() - self._keys_at
                if (kid not in self._keys and age > MIN_REFETCH) or age > self.settings.jwks_ttl:
                    await self._fetch_keys()
        found = self._keys.get(kid)
        if found is None:
            raise OidcError("the token is signed with a key the provider does not publish")
        return found

    async def verify(self, token: str, audience: str, *, nonce: str | None = None) -> dict[str, Any]:
        """The claims of a valid JWT of this provider for `audience`; OidcError otherwise."""
        if not looks_like_jwt(token):
            raise OidcError("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OidcError("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.settings.algorithms:
            raise OidcError("the token's signature algorithm is not accepted")
        if not isinstance(kid, str) or not kid:
            raise OidcError("the token names no signing key")
        key = await self.key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iat", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise OidcError("the token has expired") from None
        except jwt.PyJWTError as exc:
            raise OidcError(f"the token is not valid here ({type(exc).__name__})") from None
        if nonce is not None and not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise OidcError("the sign-in's nonce does not match")
        return claims

    async def authorize_url(self, redirect_url: str, state: str, nonce: str, challenge: str) -> str:
        meta = await self.metadata()
        params = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect_url,
            "scope": self.settings.scopes,
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        return str(httpx.URL(meta["authorization_endpoint"], params=params))

    async def exchange(self, code: str, verifier: str, redirect_url: str, nonce: str) -> dict[str, Any]:
        """The authorization code -> the ID token's verified claims."""
        meta = await self.metadata()
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_url,
            "code_verifier": verifier,
            "client_id": self.settings.client_id,
        }
        extra: dict[str, Any] = {}
        if self.settings.client_secret:  # client_secret_basic; a public client sends none (PKCE only)
            extra["auth"] = httpx.BasicAuth(self.settings.client_id, self.settings.client_secret)
        try:
            r = await self._http.post(meta["token_endpoint"], data=data, **extra)
            body = r.json()
        except (httpx.HTTPError, ValueError):
            raise OidcError("the provider's token endpoint could not be reached") from None
        if r.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
            error = body.get("error") if isinstance(body, dict) else None
            raise OidcError(f"the provider refused the sign-in ({error if isinstance(error, str) else r.status_code})")
        return await self.verify(body["id_token"], self.settings.client_id, nonce=nonce)
