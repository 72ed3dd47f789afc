"""Claims -> a role: the values of the configured claim (`auth.oidc.roles_claim`, e.g. groups)
are matched against the lists in the config. admin wins over team_admin, which wins over viewer;
no match is no access (403)."""

from __future__ import annotations

from typing import Any

from gateway.access.roles import Actor
from gateway.settings.oidc import OidcSettings

MAX_VALUES = 1000


def claim_values(claims: dict[str, Any], name: str) -> list[str]:
    value: Any = claims
    for part in name.split("."):  # a nested claim, e.g. realm_access.roles
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value[:MAX_VALUES] if isinstance(v, str)]
    return []


def actor_of(claims: dict[str, Any], settings: OidcSettings, via: str, address: str) -> Actor | None:
    values = set(claim_values(claims, settings.roles_claim))
    subject = str(claims.get("sub", ""))[:256]
    email = claims.get("email")
    if isinstance(email, str) and email:
        subject = f"{subject} <{email[:256]}>"
    if values & set(settings.admin):
        return Actor(subject, "admin", via=via, address=address)
    teams = frozenset(t for v in values for t in settings.team_admin.get(v, ()))
    if teams:
        return Actor(subject, "team_admin", teams, via=via, address=address)
    if values & set(settings.viewer):
        return Actor(subject, "viewer", via=via, address=address)
    return None
