"""Teams and organizations in admission: every level's limits checked and reserved in the one
script, exactly, across two replicas; refusals that name the level; the mirror of a team's key
following its record; one cluster slot per admission."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.access.levels import levels_of
from gateway.access.quota import Admission, Quota
from gateway.access.team_fields import ORG_FIELDS, TEAM_FIELDS, validate_group_fields
from gateway.access.teams import Group, TeamStore
from gateway.core.errors import GatewayError
from gateway.resp.client import RespClient
from testkit.redis_server import RedisServer
from tests.test_quota import MODEL, TIMEOUT, T, connect, refused


async def team(teams: TeamStore, **fields: Any) -> Group:
    return await teams.create_team(validate_group_fields({"name": "t", **fields}, TEAM_FIELDS, partial=False))


async def org(teams: TeamStore, **fields: Any) -> Group:
    return await teams.create_org(validate_group_fields({"name": "o", **fields}, ORG_FIELDS, partial=False))


async def key_of(store: KeyStore, group: Group | None, **limits: Any) -> ApiKey:
    fields = validate_key_fields({"name": "k", **limits, "team": group.id if group else None}, partial=False)
    key, _ = await store.create(fields, group.org if group else None)
    return key


def run(server: RedisServer, body: Any) -> Any:
    async def main() -> Any:
        client = connect(server)
        resp = RespClient(server.url, TIMEOUT)
        try:
            return await body(KeyStore(client), TeamStore(client), Quota(resp, redis_timeout=TIMEOUT), client)
        finally:
            await client.aclose()
            await resp.close()

    return asyncio.run(main())


def test_team_limits_hold_over_all_its_keys(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        t = await team(teams, rpm=3, max_concurrent=10)
        a, b = await key_of(store, t), await key_of(store, t, rpm=100)
        lone = await key_of(store, None, rpm=100)
        await quota.admit(a, MODEL, 1, now=T)
        await quota.admit(b, MODEL, 1, now=T)
        await quota.admit(a, MODEL, 1, now=T)
        err = await refused(quota.admit(b, MODEL, 1, now=T))
        assert err.status == 429 and err.code == "team_rpm_exceeded"
        assert "team" in err.message and "3 requests per minute" in err.message
        await quota.admit(lone, MODEL, 1, now=T)  # another key's limits are its own
        usage = await quota.usage(await teams.team_level(t.id), now=T)
        assert usage["minute"]["requests"] == 3 and usage["day"]["requests"] == 3

    run(redis_server, body)


def test_org_limits_hold_over_its_teams(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        o = await org(teams, tpm=100)
        t1, t2 = await team(teams, org=o.id), await team(teams, org=o.id)
        k1, k2 = await key_of(store, t1), await key_of(store, t2)
        await quota.admit(k1, MODEL, 60, now=T)
        err = await refused(quota.admit(k2, MODEL, 60, now=T))
        assert err.code == "org_tpm_exceeded" and "organization" in err.message
        await quota.admit(k2, MODEL, 40, now=T)

    run(redis_server, body)


def test_concurrent_admissions_of_a_team_over_two_replicas_never_overspend(redis_server: RedisServer) -> None:
    """60 admissions at once, 6 keys of one team, two replicas: the team's money budget, daily
    tokens and rpm all hold exactly, and settles land on every level."""

    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        t = await team(teams, daily_budget=0.05, daily_tokens=5000, rpm=40)  # 0.05 = 5e7 nano-units
        keys = [await key_of(store, t) for _ in range(6)]
        other = RespClient(redis_server.url, TIMEOUT)
        replicas = [quota, Quota(other, redis_timeout=TIMEOUT)]
        rng = random.Random(11)
        asks = [(rng.randint(10, 200), rng.randint(1_000_000, 5_000_000)) for _ in range(60)]
        try:
            results = await asyncio.gather(
                *(
                    replicas[i % 2].admit(keys[i % 6], MODEL, tokens, now=T, money=money)
                    for i, (tokens, money) in enumerate(asks)
                ),
                return_exceptions=True,
            )
            admitted = [r for r in results if isinstance(r, Admission)]
            refusals = [r for r in results if not isinstance(r, Admission)]
            codes = {e.code for e in refusals if isinstance(e, GatewayError)}
            assert refusals and codes <= {"team_budget_exceeded", "team_daily_tokens_exceeded", "team_rpm_exceeded"}
            assert len(admitted) <= 40
            assert sum(a.money for a in admitted) <= 50_000_000
            assert sum(a.reserved for a in admitted) <= 5000
            used = [(a, rng.randint(0, a.reserved), rng.randint(0, a.money)) for a in admitted]
            await asyncio.gather(*(quota.release(a, tok, 0, spend) for a, tok, spend in used))
            await asyncio.gather(*(quota.release(a, tok, 0, spend) for a, tok, spend in used))  # idempotent
        finally:
            await other.close()
        figures = await quota.usage(await teams.team_level(t.id), now=T)
        assert figures["day"]["requests"] == len(admitted)
        assert figures["day"]["tokens"] == sum(tok for _, tok, _ in used)
        assert round(figures["day"]["spend"] * 1e9) == sum(s for _, _, s in used)
        per_key = [await quota.usage(quota.levels(k)[0], now=T) for k in keys]
        assert sum(u["day"]["requests"] for u in per_key) == len(admitted)
        assert round(sum(u["day"]["spend"] for u in per_key) * 1e9) == sum(s for _, _, s in used)

    run(redis_server, body)


def test_budget_refusal_names_the_period_and_its_reset(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        k = await key_of(store, None, monthly_budget=1.0)
        await quota.admit(k, MODEL, 1, now=T, money=900_000_000)
        err = await refused(quota.admit(k, MODEL, 1, now=T, money=200_000_000))
        assert err.status == 429 and err.code == "budget_exceeded" and err.type == "insufficient_quota"
        assert "Monthly budget spent: 0.9 USD of 1 USD" in err.message and "resets at" in err.message
        assert int(err.headers["retry-after"]) > 86400  # the month's end, not a minute

    run(redis_server, body)


def test_a_team_key_follows_its_record(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        t1, t2 = await team(teams, rpm=1), await team(teams)
        k = await key_of(store, t1)
        await quota.admit(k, MODEL, 1, now=T)
        assert (await refused(quota.admit(k, MODEL, 1, now=T))).code == "team_rpm_exceeded"
        moved = await store.update(k.id, {"team": t2.id}, t2.org)
        assert moved is not None and moved.team == t2.id
        await quota.admit(moved, MODEL, 1, now=T)  # t2 has no rpm; the key's windows start afresh
        assert await teams.team_keys(t1.id) == [] and await teams.team_keys(t2.id) == [k.id]
        assert not await client.exists(levels_of("gw", k.id, t1.id, None)[0].limits)
        limited = await store.update(k.id, {"rpm": 1})
        assert limited is not None
        assert (await refused(quota.admit(limited, MODEL, 1, now=T))).code == "rpm_exceeded"
        await store.revoke(k.id)
        assert (await refused(quota.admit(limited, MODEL, 1, now=T + 60))).code == "invalid_api_key"
        with pytest.raises(GatewayError) as conflict:
            await teams.delete_team(t2.id)
        assert conflict.value.status == 409
        await store.update(k.id, {"team": None})
        assert (await teams.delete_team(t2.id)) is not None and await teams.get_team(t2.id) is None

    run(redis_server, body)


def test_every_level_of_an_admission_is_in_one_cluster_slot(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        o = await org(teams)
        t = await team(teams, org=o.id)
        k = await key_of(store, t)
        await quota.admit(k, MODEL, 5, now=T, money=10)
        levels = quota.levels(k)
        assert [lv.kind for lv in levels] == ["key", "team", "org"]
        names = [n.decode() for n in await client.keys(f"gw:{{{o.id}}}:*")]
        assert len(names) >= 3 * 4  # limits, minute, day, month, leases of three levels
        assert len({key_slot(n.encode()) for n in names}) == 1
        assert len({key_slot(lv.limits.encode()) for lv in levels}) == 1

    run(redis_server, body)


def test_team_and_org_limits_on_a_redis_cluster(redis_cluster: Any) -> None:
    """On a real Redis Cluster: keys of teams of one organization, admitted concurrently by two
    replicas (no CROSSSLOT: every level is under the organization's tag), never exceed the org's rpm."""
    from tests.test_cluster_stores import run as run_cluster

    async def body(a: Any, b: Any) -> None:
        teams = TeamStore(a.clients.admin)
        o = await org(teams, rpm=25)
        groups = [await team(teams, org=o.id) for _ in range(3)]
        keys = [await key_of(a.keys, groups[i % 3]) for i in range(6)]
        results = await asyncio.gather(
            *((a, b)[i % 2].quota.admit(keys[i % 6], MODEL, 3) for i in range(60)), return_exceptions=True
        )
        admitted = [r for r in results if isinstance(r, Admission)]
        codes = {r.code for r in results if isinstance(r, GatewayError)}
        assert len(admitted) == 25 and codes == {"org_rpm_exceeded"}
        await asyncio.gather(*(b.quota.release(adm, 1, 1) for adm in admitted))
        usage = await b.quota.usage(teams.org_level(o.id))
        assert usage["day"]["requests"] == 25 and usage["day"]["tokens"] == 50

    run_cluster(redis_cluster, body)
