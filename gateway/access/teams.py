"""Teams and organizations in Redis: their records, which are also the limits admission reads
(gateway/access/levels.py has the layout), and the indexes that list them.

    gw:teams                      HASH team id -> its organization's id ("" for none)
    gw:orgs                       SET of organization ids
    gw:{T}:team:<team id>         HASH the team (T: its organization's id, else its own)
    gw:{T}:team:<team id>:keys    SET its keys' ids (gateway/access/keys.py keeps it)
    gw:{O}:org:<org id>           HASH the organization (O: its own id)
    gw:{O}:org:<org id>:teams     SET its teams' ids
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.access.key_fields import BUDGETS, LIMITS, TEAM_ID
from gateway.access.keys import _UPDATE, _int, _json, _num, _pairs, encode_fields, money, redis_or_503, texts
from gateway.access.levels import Level, org_level, team_level
from gateway.access.team_fields import ORG_ID
from gateway.core.errors import Code, GatewayError
from gateway.core.times import iso


@dataclass(frozen=True)
class Group:
    """A team or an organization: a name, limits like a key's, and metadata."""

    kind: str  # team or org
    id: str
    name: str
    org: str | None = None  # a team's organization
    models: tuple[str, ...] | None = None
    limits: dict[str, int | None] = field(default_factory=dict)  # LIMITS and BUDGETS (nano-units)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def public(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": self.id,
            "object": "team" if self.kind == "team" else "organization",
            "name": self.name,
        }
        if self.kind == "team":
            view["org"] = self.org
        return {
            **view,
            "models": list(self.models) if self.models is not None else None,
            **{name: self.limits.get(name) for name in LIMITS},
            **{name: money(self.limits.get(name)) for name in BUDGETS},
            "metadata": dict(self.metadata),
            "created_at": iso(self.created_at),
            "created_at_unix": self.created_at,
        }


def decode_group(kind: str, raw: Mapping[Any, Any]) -> Group | None:
    h = texts(raw)
    if "id" not in h:
        return None
    models = _json(h.get("models"), None)
    metadata = _json(h.get("metadata"), {})
    return Group(
        kind=kind,
        id=h["id"],
        name=h.get("name", ""),
        org=h.get("org") or None,
        models=tuple(str(m) for m in models) if isinstance(models, list) else None,
        limits={name: _int(h.get(name)) for name in (*LIMITS, *BUDGETS)},
        metadata=metadata if isinstance(metadata, dict) else {},
        created_at=_num(h.get("created_at")) or 0.0,
    )


def not_found(kind: str, group_id: str) -> GatewayError:
    if kind == "team":
        return GatewayError(404, f"No team with id '{group_id}'.", param="team", code=Code.TEAM_NOT_FOUND)
    return GatewayError(404, f"No organization with id '{group_id}'.", param="org", code=Code.ORG_NOT_FOUND)


class TeamStore:
    def __init__(self, redis: aioredis.Redis | RedisCluster, prefix: str = "gw") -> None:
        self.redis = redis
        self.prefix = prefix
        self._teams = f"{prefix}:teams"
        self._orgs = f"{prefix}:orgs"
        self._update = redis.register_script(_UPDATE)

    # ---- where things are ---------------------------------------------------------------------

    async def team_org(self, team_id: str) -> tuple[bool, str | None]:
        """(whether the team exists, its organization)."""
        if not TEAM_ID.fullmatch(team_id):
            return False, None
        async with redis_or_503():
            org = await self.redis.hget(self._teams, team_id)
        if org is None:
            return False, None
        text = org.decode() if isinstance(org, bytes) else str(org)
        return True, text or None

    async def team_level(self, team_id: str) -> Level | None:
        exists, org = await self.team_org(team_id)
        return team_level(self.prefix, team_id, org) if exists else None

    def org_level(self, org_id: str) -> Level:
        return org_level(self.prefix, org_id)

    # ---- teams --------------------------------------------------------------------------------

    async def create_team(self, fields: Mapping[str, Any]) -> Group:
        org = fields.get("org")
        if org is not None and await self.get_org(org) is None:
            raise not_found("org", org)
        team_id = "team_" + secrets.token_hex(8)
        record = self._record(team_id, fields, ("org",))
        level = team_level(self.prefix, team_id, org)
        async with redis_or_503(), self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(level.limits, mapping=record)
            if org is not None:
                pipe.sadd(self.org_level(org).base + "teams", team_id)
            pipe.hset(self._teams, team_id, org or "")  # last: the index never names a missing team
            await pipe.execute()
        team = decode_group("team", record)
        assert team is not None
        return team

    async def get_team(self, team_id: str) -> Group | None:
        level = await self.team_level(team_id)
        if level is None:
            return None
        async with redis_or_503():
            return decode_group("team", await self.redis.hgetall(level.limits))

    async def list_teams(self) -> list[Group]:
        async with redis_or_503():
            index = texts(await self.redis.hgetall(self._teams))
            if not index:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for team_id, org in sorted(index.items()):
                    pipe.hgetall(team_level(self.prefix, team_id, org or None).limits)
                raws = await pipe.execute()
        teams = [t for t in (decode_group("team", raw) for raw in raws) if t is not None]
        return sorted(teams, key=lambda t: (t.created_at, t.id))

    async def update_team(self, team_id: str, fields: Mapping[str, Any]) -> Group | None:
        level = await self.team_level(team_id)
        return None if level is None else await self._change("team", level, fields)

    async def team_keys(self, team_id: str) -> list[str]:
        level = await self.team_level(team_id)
        if level is None:
            return []
        async with redis_or_503():
            return sorted(texts({m: m for m in await self.redis.smembers(level.base + "keys")}))

    async def delete_team(self, team_id: str) -> Group | None:
        """Refused (409) while keys belong to it: move or revoke them first."""
        team = await self.get_team(team_id)
        if team is None:
            return None
        level = team_level(self.prefix, team_id, team.org)
        async with redis_or_503():
            if await self.redis.scard(level.base + "keys"):
                raise GatewayError(
                    409, "This team still has keys: move them to another team (PATCH team) first.", code=Code.CONFLICT
                )
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(self._teams, team_id)  # first: nothing finds it from now on
                pipe.delete(level.limits)
                if team.org is not None:
                    pipe.srem(self.org_level(team.org).base + "teams", team_id)
                await pipe.execute()
        return team

    # ---- organizations ------------------------------------------------------------------------

    async def create_org(self, fields: Mapping[str, Any]) -> Group:
        org_id = "org_" + secrets.token_hex(8)
        record = self._record(org_id, fields, ())
        async with redis_or_503(), self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.org_level(org_id).limits, mapping=record)
            pipe.sadd(self._orgs, org_id)
            await pipe.execute()
        org = decode_group("org", record)
        assert org is not None
        return org

    async def get_org(self, org_id: str) -> Group | None:
        if not ORG_ID.fullmatch(org_id):
            return None
        async with redis_or_503():
            return decode_group("org", await self.redis.hgetall(self.org_level(org_id).limits))

    async def list_orgs(self) -> list[Group]:
        async with redis_or_503():
            ids = sorted(texts({i: i for i in await self.redis.smembers(self._orgs)}))
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for org_id in ids:
                    pipe.hgetall(self.org_level(org_id).limits)
                raws = await pipe.execute()
        orgs = [o for o in (decode_group("org", raw) for raw in raws) if o is not None]
        return sorted(orgs, key=lambda o: (o.created_at, o.id))

    async def update_org(self, org_id: str, fields: Mapping[str, Any]) -> Group | None:
        if not ORG_ID.fullmatch(org_id):
            return None
        return await self._change("org", self.org_level(org_id), fields)

    async def delete_org(self, org_id: str) -> Group | None:
        org = await self.get_org(org_id)
        if org is None:
            return None
        level = self.org_level(org_id)
        async with redis_or_503():
            if await self.redis.scard(level.base + "teams"):
                raise GatewayError(409, "This organization still has teams: delete them first.", code=Code.CONFLICT)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.srem(self._orgs, org_id)
                pipe.delete(level.limits)
                await pipe.execute()
        return org

    # ---- shared -------------------------------------------------------------------------------

    def _record(self, group_id: str, fields: Mapping[str, Any], extra: tuple[str, ...]) -> dict[Any, str]:
        blank = {name: None for name in ("models", *LIMITS, *BUDGETS, "metadata", *extra)}
        return {**encode_fields({**blank, **fields}), "id": group_id, "created_at": repr(time.time())}

    async def _change(self, kind: str, level: Level, fields: Mapping[str, Any]) -> Group | None:
        args = [part for pair in encode_fields(fields).items() for part in pair]
        async with redis_or_503():
            return decode_group(kind, _pairs(await self._update(keys=[level.limits], args=args)))
