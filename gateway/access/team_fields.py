"""What an admin may set on a team or an organization: validation of `/admin/teams` and
`/admin/orgs` payloads. The limits are the key's (gateway/access/key_fields.py), names included."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from gateway.access.key_fields import _CHECKS, BUDGETS, LIMITS
from gateway.core.errors import invalid

ORG_ID = re.compile(r"org_[0-9a-f]{16}")
TEAM_FIELDS = ("name", "models", *LIMITS, *BUDGETS, "metadata", "org")
ORG_FIELDS = ("name", "models", *LIMITS, *BUDGETS, "metadata")


def _org(param: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not ORG_ID.fullmatch(value):
        raise invalid("'org' must be an organization id (org_ and 16 hex digits), or null.", param=param)
    return value


def validate_group_fields(
    payload: Any, allowed: tuple[str, ...], *, partial: bool, known_models: Collection[str] | None = None
) -> dict[str, Any]:
    """A team or organization payload -> clean fields (budgets in nano-units). A team's `org` is
    set when it is made and never changes (its counters live under the organization's hash tag)."""
    if not isinstance(payload, dict):
        raise invalid("The request body must be a JSON object.")
    for name in payload:
        if name not in allowed:
            raise invalid(f"Unknown field {name!r}; expected some of: {', '.join(allowed)}.", param=str(name))
    if partial and "org" in payload:
        raise invalid("A team's 'org' is fixed when the team is made: make a new team instead.", param="org")
    if not partial and "name" not in payload:
        raise invalid("'name' is required.", param="name")
    out: dict[str, Any] = {}
    for name, value in payload.items():
        out[name] = _org(name, value) if name == "org" else _CHECKS[name](name, value)
    models = out.get("models")
    if models is not None and known_models is not None:
        unknown = [m for m in models if m not in known_models]
        if unknown:
            raise invalid(f"'models' names models nobody serves: {', '.join(map(repr, unknown))}.", param="models")
    return out
