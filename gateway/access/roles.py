"""Who is calling the admin API, and what that role may do.

Three roles: `admin` (everything), `team_admin` (the keys and spend of the teams it names, nothing
else that changes), `viewer` (reads everything, changes nothing). The admin key is an `admin`
(break-glass); a signed-in person or a provider's access token gets the role its claims map to
(gateway/access/oidc_roles.py). Checks raise 403 `forbidden` with what the role lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.core.errors import Code, GatewayError

ROLES = ("admin", "team_admin", "viewer")


@dataclass(frozen=True)
class Actor:
    subject: str  # who: "admin-key", or the provider's `sub` (with the email when it has one)
    role: str
    teams: frozenset[str] = field(default_factory=frozenset)  # a team_admin's team ids
    via: str = "admin_key"  # admin_key, session (the console), bearer (a provider's access token)
    address: str = ""  # the client's address, for the audit log

    @property
    def sees_all(self) -> bool:
        return self.role in ("admin", "viewer")

    def may_read_team(self, team: str | None) -> bool:
        return self.sees_all or (team is not None and team in self.teams)

    def require_admin(self) -> None:
        if self.role != "admin":
            raise forbidden(f"This needs the admin role; you are {self.role}.")

    def require_read_all(self) -> None:
        if not self.sees_all:
            raise forbidden("A team admin sees only its own teams' keys and spend.")

    def require_read_team(self, team: str | None) -> None:
        if not self.may_read_team(team):
            raise forbidden("A team admin sees only its own teams' keys and spend.")

    def require_change_team(self, team: str | None) -> None:
        """Changing a key of `team` (None: a key without a team)."""
        if self.role == "admin":
            return
        if self.role == "viewer":
            raise forbidden("A viewer changes nothing.")
        if team is None or team not in self.teams:
            raise forbidden("A team admin changes only its own teams' keys.")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, code=Code.FORBIDDEN, type="permission_error")
