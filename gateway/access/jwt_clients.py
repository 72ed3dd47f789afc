"""Client JWTs on the public API (optional: `auth.oidc.client_audience`): a JWT from the identity
provider, whose `team_claim` names a team, is accepted in place of an `sk-gw-` key and limited as
that team (its levels: the team, and its organization; gateway/access/levels.py).

A verified token is remembered (by its SHA-256, LRU-bounded) until it expires, so a client that
reuses its token costs one signature check, not one per request.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from gateway.access.base import Principal
from gateway.access.key_fields import TEAM_ID
from gateway.access.keys import ApiKey
from gateway.access.oidc import OidcError, OidcProvider
from gateway.access.oidc_roles import claim_values
from gateway.access.teams import TeamStore
from gateway.core.errors import invalid_key

CACHE = 10_000


class JwtClients:
    def __init__(self, provider: OidcProvider, teams: TeamStore, audience: str) -> None:
        self.provider = provider
        self.teams = teams
        self.audience = audience
        self.claim = provider.settings.team_claim
        self._known: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._orgs: dict[str, str | None] = {}  # a team's organization never changes

    async def principal(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).hexdigest()
        known = self._known.get(digest)
        if known is not None and time.time() < known[1]:
            self._known.move_to_end(digest)
            return known[0]
        try:
            claims = await self.provider.verify(token, self.audience)
        except OidcError as exc:
            raise invalid_key(f"The token was refused: {exc}.") from None
        names = claim_values(claims, self.claim)
        if len(names) != 1 or not TEAM_ID.fullmatch(names[0]):
            raise invalid_key(f"The token's '{self.claim}' claim must name one team (a team id).")
        team = names[0]
        if team not in self._orgs:
            exists, org = await self.teams.team_org(team)
            if not exists:
                raise invalid_key("The token names a team this gateway does not have.")
            self._orgs[team] = org
        key = ApiKey(id=team, name=f"jwt {str(claims.get('sub'))[:100]}", team=team, org=self._orgs[team], kind="team")
        principal = Principal(team, None, key)
        self._known[digest] = (principal, float(claims["exp"]))
        while len(self._known) > CACHE:
            self._known.popitem(last=False)
        return principal
