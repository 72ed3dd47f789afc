"""Leased budgets (gateway/access/leases.py) on a real Redis and a real Redis Cluster: four
processes' quotas, each with its own clients and its own subscription to the leases channel, as
four gateway processes hold them. What all of them admit never exceeds a limit; a busy key costs
few round trips; a change, a revoke and a usage read see every slice back first."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.access.leases import Leases
from gateway.access.quota import Admission, Quota
from gateway.access.slices import Account, Slice
from gateway.access.team_fields import ORG_FIELDS, TEAM_FIELDS, validate_group_fields
from gateway.access.teams import TeamStore
from gateway.core.errors import GatewayError
from gateway.resp.connect import RedisClients, build_clients
from gateway.settings import LeaseSettings
from testkit.poll import eventually_async
from testkit.redis_cluster import RedisCluster
from testkit.redis_server import RedisServer

MODEL = "tiny"
TIMEOUT = 1.0
REPLICAS = 4


class Replica:
    """What one gateway process holds: its clients, and its quota with leases on."""

    def __init__(self, url: str, timeout: float = TIMEOUT, **settings: Any) -> None:
        self.clients: RedisClients = build_clients(url, timeout=timeout)
        self.quota = Quota(self.clients.lean, redis_timeout=timeout)
        self.leases = Leases(self.quota, self.clients.lean, self.clients.subscriber, LeaseSettings(**settings))
        self.quota.leases = self.leases
        self.quota.start()

    def held(self, key_id: str) -> list[Slice]:
        return [s for (k, _), account in self.leases._accounts.items() if k == key_id for s in account.slices()]

    async def close(self) -> None:
        await self.quota.close()
        await self.clients.aclose()


Body = Callable[[list[Replica], KeyStore], Awaitable[Any]]


def run(url: str, body: Body, replicas: int = REPLICAS, timeout: float = TIMEOUT, **settings: Any) -> Any:
    async def main() -> Any:
        group = [Replica(url, timeout, **settings) for _ in range(replicas)]
        try:
            # every process listens on the channel before anything is leased
            await eventually_async(
                lambda: asyncio.sleep(0, [r.clients.subscriber.node for r in group]),
                lambda nodes: None not in nodes,
                what="every replica subscribed",
            )
            return await body(group, KeyStore(group[0].clients.admin))
        finally:
            for r in group:
                await r.close()

    return asyncio.run(main())


async def new_key(store: KeyStore, org: str | None = None, **fields: Any) -> ApiKey:
    key, _ = await store.create(validate_key_fields({"name": "t", **fields}, partial=False), org)
    return key


async def busy(replica: Replica, key: ApiKey, requests: int = 40) -> None:
    """Requests one after another, fast: the key becomes busy on this replica, which leases."""
    for _ in range(requests):
        adm = await replica.quota.admit(key, MODEL, 20)
        await replica.quota.release(adm, 5, 5)


async def evalsha_calls(store: KeyStore) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_busy_key_costs_few_round_trips_and_its_usage_stays_exact(redis_server: RedisServer) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        (one,) = group
        key = await new_key(store, rpm=10**6, tpm=10**9, max_concurrent=1000, daily_tokens=10**12)
        calls = await evalsha_calls(store)
        prompt = completion = 0
        for i in range(1000):
            adm = await one.quota.admit(key, MODEL, 40)
            assert adm.headers["x-ratelimit-limit-requests"] == str(10**6)
            await one.quota.release(adm, 10 + i % 7, i % 5)
            prompt, completion = prompt + 10 + i % 7, completion + i % 5
        assert one.leases.admitted > 950  # the first few wait for the key to look busy
        assert await evalsha_calls(store) - calls < 50  # lease + return per slice, not 2 per request
        for s in one.held(key.id):
            assert s.until <= (s.minute + 1) * 60  # a slice of minute M admits in minute M only
        usage = await one.quota.usage(key.id)  # gives the slices back first
        assert usage["day"]["requests"] == usage["month"]["requests"] == 1000
        assert (usage["day"]["prompt_tokens"], usage["day"]["completion_tokens"]) == (prompt, completion)
        assert usage["day"]["tokens"] == usage["minute"]["tokens"] == prompt + completion
        assert usage["minute"]["requests"] == 1000
        assert await store.redis.zcard(f"gw:{{{key.id}}}:leases") == 0  # every concurrency lease freed
        assert await store.redis.zcard(f"gw:{{{key.id}}}:slices") == 0

    run(redis_server.url, body, replicas=1)


async def spread(group: list[Replica], key: ApiKey, count: int, reserve: int = 24, money: int = 0) -> list[Any]:
    """`count` first requests at once, dealt round-robin over the replicas."""
    calls = [group[i % len(group)].quota.admit(key, MODEL, reserve, money=money) for i in range(count)]
    return await asyncio.gather(*calls, return_exceptions=True)


async def release_all(group: list[Replica], results: list[Any], prompt: int, spend: int = 0) -> None:
    """Each admission released by the replica that admitted it (the i-th went to replica i % n)."""
    for i, adm in enumerate(results):
        if isinstance(adm, Admission):
            await group[i % len(group)].quota.release(adm, prompt, 0, spend)


@pytest.mark.parametrize(
    ("limits", "code", "reserve", "money", "most"),
    [
        ({"rpm": 37}, "rpm_exceeded", 24, 0, 37),
        ({"tpm": 30 * 24}, "tpm_exceeded", 24, 0, 30),
        ({"daily_tokens": 25 * 24}, "daily_tokens_exceeded", 24, 0, 25),
        ({"daily_budget": 0.000021}, "budget_exceeded", 24, 1000, 21),  # 21,000 nanos, 1,000 a request
        ({"max_concurrent": 5}, "concurrency_exceeded", 24, 0, 5),
    ],
)
def test_four_replicas_never_exceed_a_small_limit(
    redis_server: RedisServer, limits: dict[str, Any], code: str, reserve: int, money: int, most: int
) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        key = await new_key(store, **limits)
        results = await spread(group, key, 120, reserve, money)
        admitted = [r for r in results if isinstance(r, Admission)]
        refused = [r for r in results if not isinstance(r, Admission)]
        assert all(isinstance(e, GatewayError) and e.code == code for e in refused), refused[:3]
        # Held, not yet settled: what is admitted is what was reserved, and a refusal is only ever
        # answered once the slices other replicas held came back: exactly the limit.
        assert len(admitted) == most, (len(admitted), [len(r.held(key.id)) for r in group])
        assert sum(r.leases.calls for r in group) > 0  # the leased path was taken, not only the plain one
        await release_all(group, results, 12, money // 2)
        usage = await group[1].quota.usage(key.id)
        assert usage["day"]["requests"] == most
        assert usage["day"]["tokens"] == usage["day"]["prompt_tokens"] == 12 * most
        assert usage["day"]["spend"] * 10**9 == pytest.approx(most * (money // 2))
        assert await store.redis.zcount(f"gw:{{{key.id}}}:leases", "-inf", "+inf") == 0

    run(redis_server.url, body)


def test_team_limits_hold_over_its_keys_on_four_replicas(redis_server: RedisServer) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        teams = TeamStore(store.redis)
        org = await teams.create_org(validate_group_fields({"name": "o", "rpm": 31}, ORG_FIELDS, partial=False))
        fields = validate_group_fields({"name": "t", "org": org.id, "rpm": 1000}, TEAM_FIELDS, partial=False)
        team = await teams.create_team(fields)
        keys = [await new_key(store, org=org.id, team=team.id) for _ in range(3)]
        calls = [group[i % REPLICAS].quota.admit(keys[i % 3], MODEL, 10) for i in range(90)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        admitted = [r for r in results if isinstance(r, Admission)]
        assert len(admitted) == 31
        assert {e.code for e in results if isinstance(e, GatewayError)} == {"org_rpm_exceeded"}

    run(redis_server.url, body)


def test_a_lowered_limit_and_a_revoke_reach_every_replica_at_once(redis_server: RedisServer) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        if time.time() % 60 > 40:  # rpm counts per calendar minute: stay in one
            await asyncio.sleep(61 - time.time() % 60)
        key = await new_key(store, rpm=10**6)
        for r in group:
            await busy(r, key)
            assert r.held(key.id), "each replica holds a slice of the key"
        used = (await group[0].quota.usage(key.id))["minute"]["requests"]
        for r in group:
            await busy(r, key)  # slices again after the usage read took them back
        used += 4 * 40
        # The admin API's order: change the record, then recall (gateway/front/routes/admin.py).
        await store.update(key.id, {"rpm": used + 6})
        await group[2].quota.recall(group[2].quota.levels(key)[:1])
        assert not any(r.held(key.id) for r in group)
        results = await asyncio.gather(
            *(group[i % REPLICAS].quota.admit(key, MODEL, 20) for i in range(20)), return_exceptions=True
        )
        assert sum(isinstance(r, Admission) for r in results) == 6  # the new limit, at once, everywhere
        await release_all(group, results, 5)
        await store.update(key.id, {"rpm": 10**6})
        await group[0].quota.recall(group[0].quota.levels(key)[:1])
        for r in group:
            await busy(r, key)
            assert r.held(key.id)
        await store.revoke(key.id)
        await group[3].quota.recall(group[3].quota.levels(key)[:1])
        for r in group:
            with pytest.raises(GatewayError) as err:
                await r.quota.admit(key, MODEL, 20)
            assert err.value.status == 401 and "revoked" in err.value.message

    run(redis_server.url, body)


def test_an_unused_slice_goes_back_within_the_idle_bound(redis_server: RedisServer) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        (one,) = group
        key = await new_key(store, rpm=10**6)
        await busy(one, key, 60)
        assert one.held(key.id)
        stopped = time.monotonic()
        await eventually_async(
            lambda: store.redis.zcard(f"gw:{{{key.id}}}:slices"), lambda n: n == 0, timeout=5, what="slice back"
        )
        # idle 0.3 s, then it drains (nothing in flight) and goes back with the next sweep
        assert time.monotonic() - stopped < 0.3 + 0.3 + 0.5
        minute = int(time.time() // 60)
        requests = await store.redis.hget(f"gw:{{{key.id}}}:min:{minute}", "requests")
        assert requests is None or int(requests) <= 60  # what it did not use is back (or the minute turned)

    run(redis_server.url, body, replicas=1, idle=0.3)


def test_a_slice_admits_nothing_past_its_end() -> None:
    account = Account("key_0123456789abcdef", MODEL, (), frozenset())
    s = Slice("s1", account, 100, "d", "m", until=6060.0, requests=5, tokens=100, money=0, leases=2,
              rpm=None, tpm=None, requests_before=0, tokens_before=0)  # fmt: skip
    account.open.append(s)
    assert account.take(10, 0, now=6059.9, mono=1.0) is not None
    assert account.take(10, 0, now=6060.0, mono=1.0) is None  # the minute is over
    assert account.take(10, 0, now=6000.0, mono=1.0) is not None
    assert account.take(10, 0, now=6000.0, mono=1.0) is None  # both leases are held
    s.settle("s1.1", 10, 0, 3, 4, 0)
    assert s.held_tokens == 7 + 10 and s.free == [1]
    assert s.take(84, 0) is None and s.take(83, 0) == "s1.1"  # tokens: 100 taken, 17 held


def test_a_lease_call_given_up_during_a_stall_charges_nothing(redis_server: RedisServer) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        (one,) = group
        key = await new_key(store, daily_tokens=10**6, max_concurrent=100)
        await busy(one, key, 60)
        assert one.held(key.id)
        one.leases.drop_all()
        await eventually_async(
            lambda: store.redis.zcard(f"gw:{{{key.id}}}:slices"), lambda n: n == 0, what="slices given back"
        )
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            one.quota.breaker = 0.0
            for _ in range(3):
                with pytest.raises(GatewayError) as err:
                    await one.quota.admit(key, MODEL, 20)
                assert err.value.code == "quota_unavailable"
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not await one.quota.flush_pending():
            assert time.monotonic() < deadline, "the cancels never reached Redis"
            await asyncio.sleep(0.1)
        usage = await one.quota.usage(key.id)
        assert (usage["day"]["requests"], usage["day"]["tokens"]) == (60, 600)
        assert await store.redis.zcard(f"gw:{{{key.id}}}:leases") == 0
        assert not [k async for k in store.redis.scan_iter(match=f"gw:{{{key.id}}}:slice:*")]

    run(redis_server.url, body, replicas=1, timeout=0.1)


def test_leases_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    async def body(group: list[Replica], store: KeyStore) -> None:
        key = await new_key(store, rpm=10**6, daily_tokens=10**9)
        for r in group:
            await busy(r, key, 100)
        assert all(r.leases.admitted > 50 for r in group)
        usage = await group[1].quota.usage(key.id)
        assert usage["day"]["requests"] == 200 and usage["day"]["tokens"] == 2000
        small = await new_key(store, rpm=23)
        results = await spread(group, small, 60)
        assert sum(isinstance(r, Admission) for r in results) == 23

    run(redis_cluster.url, body, replicas=2)
