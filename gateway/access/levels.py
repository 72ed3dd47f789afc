"""Where a key's limits and counters live in Redis, for each level it is limited at: the key, its
team, the team's organization. Admission checks and reserves every level in one Lua script
(gateway/access/quota.py), so all of a request's levels share one Redis Cluster slot: the hash tag
is the organization's id when the key's team has one, else the team's id, else the key's own id.

    key without a team:  limits gw:{key_x}:rec                 counters gw:{key_x}:<window>...
    key of a team:       limits gw:{T}:key:<key_x>  (a mirror of the key's record, gateway/access/keys.py)
                         counters gw:{T}:key:<key_x>:<window>...
    the team:            limits gw:{T}:team:<team_y>            counters gw:{T}:team:<team_y>:<window>...
    the organization:    limits gw:{T}:org:<org_z>              counters gw:{T}:org:<org_z>:<window>...

with T = org_z if the team belongs to one, else team_y. A team's organization is fixed when the team
is made, so T never changes under a key while it stays in its team; moving a key to another team
starts its current windows afresh (its history is in the store's spend rollups).

Levels are a list, key first: admission and release loop over it, so another level (or a leased
budget) is one more entry, not another script.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

KEY, TEAM, ORG = "key", "team", "org"


@dataclass(frozen=True, slots=True)
class Level:
    kind: str  # key, team, org: what a refusal names
    id: str
    limits: str  # the HASH holding its limits (and, for the key, created_at/revoked_at/expires_at)
    base: str  # the prefix of its counters: <base>min:<minute>, <base>day:<date>, <base>leases, ...


def home_tag(team: str | None, org: str | None, key_id: str) -> str:
    return org or team or key_id


@lru_cache(maxsize=65_536)
def levels_of(prefix: str, key_id: str, team: str | None, org: str | None) -> tuple[Level, ...]:
    """The levels of a key, key first. Cached: it runs on every admission and release."""
    if team is None:
        base = f"{prefix}:{{{key_id}}}:"
        return (Level(KEY, key_id, base + "rec", base),)
    tag = f"{prefix}:{{{home_tag(team, org, key_id)}}}:"
    found = [
        Level(KEY, key_id, f"{tag}key:{key_id}", f"{tag}key:{key_id}:"),
        Level(TEAM, team, f"{tag}team:{team}", f"{tag}team:{team}:"),
    ]
    if org is not None:
        found.append(Level(ORG, org, f"{tag}org:{org}", f"{tag}org:{org}:"))
    return tuple(found)


@lru_cache(maxsize=65_536)
def team_levels(prefix: str, team: str, org: str | None) -> tuple[Level, ...]:
    """A client limited as its team (a client JWT): the team first, then its organization. Cached,
    as levels_of (and its keys with it: gateway/access/quota.py)."""
    found = [team_level(prefix, team, org)]
    if org is not None:
        found.append(org_level(prefix, org))
    return tuple(found)


def team_level(prefix: str, team: str, org: str | None) -> Level:
    tag = f"{prefix}:{{{home_tag(team, org, team)}}}:"
    return Level(TEAM, team, f"{tag}team:{team}", f"{tag}team:{team}:")


def org_level(prefix: str, org: str) -> Level:
    tag = f"{prefix}:{{{org}}}:"
    return Level(ORG, org, f"{tag}org:{org}", f"{tag}org:{org}:")
