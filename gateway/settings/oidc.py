"""The `auth.oidc` section: single sign-on for the console and the admin API with any OpenID
Connect provider, and (optionally) the provider's JWTs as client credentials on the public API.

    auth:
      oidc:
        issuer: https://login.example.com/realms/company   # discovery: <issuer>/.well-known/openid-configuration
        client_id: llm-gateway
        # client secret: the environment variable GATEWAY_OIDC_CLIENT_SECRET (never in the file)
        roles_claim: groups
        admin: [platform-admins]               # claim values that make an admin
        viewer: [auditors]
        team_admin: {team-a-leads: [team_0123456789abcdef]}   # claim value -> the teams it administers
        audience: llm-gateway                  # the `aud` of access tokens the admin API accepts
        client_audience: null                  # set to accept provider JWTs on the public API
        team_claim: gateway_team               # the claim naming a client JWT's team
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.settings.reader import Reader

_KEYS = (
    "issuer",
    "client_id",
    "scopes",
    "redirect_url",
    "roles_claim",
    "admin",
    "viewer",
    "team_admin",
    "audience",
    "client_audience",
    "team_claim",
    "session_ttl",
    "jwks_ttl",
    "leeway",
    "algorithms",
)
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class OidcSettings:
    issuer: str = ""  # the provider's issuer URL (its discovery document lies under it)
    client_id: str = ""  # the gateway's client at the provider (secret: GATEWAY_OIDC_CLIENT_SECRET)
    client_secret: str | None = None
    scopes: str = "openid email profile groups"  # asked for at sign-in
    redirect_url: str | None = None  # the callback the provider returns to (default: <this host>/ui/auth/callback)
    roles_claim: str = "groups"  # the claim (a list or a string) whose values map to roles
    admin: tuple[str, ...] = ()  # claim values that make an admin
    viewer: tuple[str, ...] = ()  # claim values that make a viewer
    team_admin: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # claim value -> team ids
    audience: str | None = None  # the `aud` of admin API access tokens (default: client_id)
    client_audience: str | None = None  # when set, the public API accepts provider JWTs with this `aud`
    team_claim: str = "gateway_team"  # the claim of a client JWT that names its team (a team id)
    session_ttl: float = 8 * 3600.0  # seconds a console session lives
    jwks_ttl: float = 600.0  # seconds the provider's keys are cached (an unknown key id refetches sooner)
    leeway: float = 30.0  # seconds of clock skew allowed on exp/nbf/iat
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")  # signature algorithms accepted


def _strings(r: Reader, value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise r.fail(path, "must be a list of strings")
    return tuple(value)


def parse_oidc(r: Reader, auth: Mapping[str, Any], env: Mapping[str, str]) -> OidcSettings | None:
    raw = auth.get("oidc")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise r.fail("auth.oidc", "must be a mapping")
    r.known(raw, "auth.oidc.", _KEYS)
    p = "auth.oidc."
    issuer = raw.get("issuer")
    if not isinstance(issuer, str) or not issuer.startswith(("https://", "http://")):
        raise r.fail(p + "issuer", "must be the provider's issuer URL (https://...)")
    client_id = raw.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise r.fail(p + "client_id", "must be the gateway's client id at the provider")
    team_admin_raw = raw.get("team_admin") or {}
    if not isinstance(team_admin_raw, Mapping):
        raise r.fail(p + "team_admin", "must map claim values to lists of team ids")
    team_admin = {str(k): _strings(r, v, f"{p}team_admin.{k}") for k, v in team_admin_raw.items()}
    algorithms = _strings(r, raw.get("algorithms"), p + "algorithms") or OidcSettings.algorithms
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad:
        raise r.fail(p + "algorithms", f"unsupported {bad} (allowed: {', '.join(ALGORITHMS)}; never none or HS*)")
    texts = {}
    for name in ("scopes", "redirect_url", "roles_claim", "audience", "client_audience", "team_claim"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise r.fail(p + name, "must be a non-empty string")
        texts[name] = value
    defaults = OidcSettings()
    return OidcSettings(
        issuer=issuer.rstrip("/"),
        client_id=client_id,
        client_secret=env.get("GATEWAY_OIDC_CLIENT_SECRET") or None,
        scopes=texts["scopes"] or defaults.scopes,
        redirect_url=texts["redirect_url"],
        roles_claim=texts["roles_claim"] or defaults.roles_claim,
        admin=_strings(r, raw.get("admin"), p + "admin"),
        viewer=_strings(r, raw.get("viewer"), p + "viewer"),
        team_admin=team_admin,
        audience=texts["audience"],
        client_audience=texts["client_audience"],
        team_claim=texts["team_claim"] or defaults.team_claim,
        session_ttl=r.get(raw, "session_ttl", p, float, defaults.session_ttl, 60, 30 * 86400),
        jwks_ttl=r.get(raw, "jwks_ttl", p, float, defaults.jwks_ttl, 1, 86400),
        leeway=r.get(raw, "leeway", p, float, defaults.leeway, 0, 600),
        algorithms=algorithms,
    )
