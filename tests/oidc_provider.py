"""A real OpenID Connect provider for tests: panva's oidc-provider (tests/oidc/provider.mjs) on
Node, installed by scripts/setup-oidc.sh. The test owns its signing keys (so it can rotate them,
and forge tokens the gateway must refuse)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from testkit.ci import require
from testkit.procs import ROOT, Proc, free_port

OIDC_DIR = ROOT / "tests" / "oidc"
RESOURCE = "urn:llm-gateway"  # the audience of the admin API's access tokens
CONSOLE_CLIENT, CONSOLE_SECRET = "llm-gateway-console", "console-client-secret-for-tests"


class SigningKey:
    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:16]

    def jwk(self) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private))
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": kid or self.kid})


class OidcProvider:
    """One provider process; `restart(keys)` publishes other keys on the same issuer (rotation)."""

    def __init__(self, tmp: Path, redirect_uri: str, accounts: dict[str, Any], bots: dict[str, list[str]]) -> None:
        require(shutil.which("node") is not None, "node is needed for the OIDC provider")
        require((OIDC_DIR / "node_modules" / "oidc-provider").exists(), "run scripts/setup-oidc.sh")
        self.tmp = tmp
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.redirect_uri = redirect_uri
        self.accounts = accounts
        self.bots = bots  # client id -> the groups its client-credentials tokens carry
        self.keys = [SigningKey()]
        self.proc: Proc | None = None

    def config(self) -> dict[str, Any]:
        clients: list[dict[str, Any]] = [
            {
                "client_id": CONSOLE_CLIENT,
                "client_secret": CONSOLE_SECRET,
                "redirect_uris": [self.redirect_uri],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ]
        for bot in self.bots:
            clients.append(
                {
                    "client_id": bot,
                    "client_secret": f"{bot}-secret",
                    "grant_types": ["client_credentials"],
                    "response_types": [],
                    "redirect_uris": [],
                    "token_endpoint_auth_method": "client_secret_basic",
                }
            )
        return {
            "issuer": self.issuer,
            "port": self.port,
            "jwks": {"keys": [k.jwk() for k in self.keys]},
            "clients": clients,
            "accounts": self.accounts,
            "clientGroups": self.bots,
            "resource": RESOURCE,
            "accessTokenTtl": 600,
        }

    def start(self) -> OidcProvider:
        path = self.tmp / f"oidc-{self.port}-{len(self.keys)}.json"
        path.write_text(json.dumps(self.config()))
        self.proc = Proc("oidc", ["node", str(OIDC_DIR / "provider.mjs"), str(path)], self.port, self.tmp / "oidc.log")
        self.proc.start().wait_healthy("/.well-known/openid-configuration", timeout=60)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self, keys: list[SigningKey]) -> None:
        self.stop()
        self.keys = keys
        deadline = time.monotonic() + 10
        while True:  # the old process's port may take a moment to free
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def bot_token(self, bot: str) -> str:
        """A client-credentials access token (a JWT for the gateway's resource)."""
        meta = httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=10).json()
        r = httpx.post(
            meta["token_endpoint"],
            data={"grant_type": "client_credentials", "resource": RESOURCE, "scope": "admin"},
            auth=(bot, f"{bot}-secret"),
            timeout=10,
        )
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    def claims(self, groups: list[str], **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.issuer,
            "aud": RESOURCE,
            "sub": "forged",
            "iat": now,
            "exp": now + 300,
            "groups": groups,
            **extra,
        }
