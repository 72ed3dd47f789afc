"""Keys, quotas and routes on a real Redis Cluster (3 masters, 3 replicas), through the clients
gateway/resp/connect.py builds: redis-py's RedisCluster for the key and route stores, the lean
cluster client for the two quota scripts. Two sets of clients stand for two gateway replicas."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.access.quota import _ADMIT, _RELEASE, Admission, Quota, admit_args
from gateway.access.quota_windows import window
from gateway.core.errors import GatewayError
from gateway.core.metrics import GatewayMetrics
from gateway.dispatch.route_store import RouteStore
from gateway.dispatch.routing import Router
from gateway.engines.pool import Pool
from gateway.resp.cluster import ClusterClient
from gateway.resp.connect import RedisClients, build_clients
from gateway.settings import EngineSettings, HealthSettings, ModelSettings, RouteSettings
from testkit.poll import eventually_async
from testkit.redis_cluster import RedisCluster

MODEL = "tiny"
TIMEOUT = 3.0  # a bound on each Redis call: generous, the tests share two busy cores
ADMIT, RELEASE = _ADMIT, _RELEASE


class Replica:
    """What one gateway process holds: its clients, key store and quota."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.clients: RedisClients = build_clients(cluster.url, timeout=TIMEOUT)
        self.keys = KeyStore(self.clients.admin)  # type: ignore[arg-type]
        self.quota = Quota(self.clients.lean, redis_timeout=TIMEOUT)

    @property
    def lean(self) -> ClusterClient:
        assert isinstance(self.clients.lean, ClusterClient)
        return self.clients.lean


def run(cluster: RedisCluster, body: Callable[[Replica, Replica], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        a, b = Replica(cluster), Replica(cluster)
        try:
            return await body(a, b)
        finally:
            await a.clients.aclose()
            await b.clients.aclose()

    return asyncio.run(main())


async def new_key(replica: Replica, **limits: Any) -> tuple[ApiKey, str]:
    return await replica.keys.create(validate_key_fields({"name": "t", **limits}, partial=False))


# ---- the key store (expected to pass once the app builds its clients with gateway/resp/connect.py) --


def test_key_store_on_a_cluster(redis_cluster: RedisCluster) -> None:
    async def body(a: Replica, b: Replica) -> None:
        keys = [await new_key(a, rpm=10 + i) for i in range(12)]  # records over every master
        assert len({redis_cluster.master_of(f"gw:{{{k.id}}}:rec").port for k, _ in keys}) > 1
        assert [k.id for k in await b.keys.list()] == [k.id for k, _ in keys]
        for key, secret in keys:
            assert await b.keys.resolve(secret) == key  # made on one replica, known on the other
        key, secret = keys[0]
        updated = await a.keys.update(key.id, validate_key_fields({"rpm": 99}, partial=True))
        assert updated is not None and updated.rpm == 99 and (await b.keys.record_for(key.id)) == updated
        revoked = await a.keys.revoke(key.id)
        assert revoked is not None and revoked.revoked_at is not None

    run(redis_cluster, body)


def test_revocation_across_replicas(redis_cluster: RedisCluster) -> None:
    async def body(a: Replica, b: Replica) -> None:
        key, secret = await new_key(a, rpm=100)
        known = await b.keys.resolve(secret)  # replica b has it cached now
        assert known is not None
        await b.quota.admit(known, MODEL, 5)
        await a.keys.revoke(key.id)
        with pytest.raises(GatewayError) as err:  # b's snapshot is stale; admission reads Redis
            await b.quota.admit(known, MODEL, 5)
        assert (err.value.status, err.value.code) == (401, "invalid_api_key")
        await a.keys.update(key.id, validate_key_fields({"models": ["other"]}, partial=True))

    run(redis_cluster, body)


def test_quota_keys_share_the_record_slot(redis_cluster: RedisCluster) -> None:
    async def body(a: Replica, b: Replica) -> None:
        key, _ = await new_key(a, max_concurrent=5)
        adm = await a.quota.admit(key, MODEL, 10)
        await a.quota.refresh_leases([adm])
        master = redis_cluster.master_of(f"gw:{{{key.id}}}:rec")
        with master.client() as r:
            names = list(r.scan_iter(f"gw:{{{key.id}}}:*"))
        assert len(names) == 5 and len({key_slot(n) for n in names}) == 1
        await b.quota.release(adm, 3, 4)
        usage = await b.quota.usage(key.id)
        assert (usage["day"]["requests"], usage["day"]["tokens"]) == (1, 7)

    run(redis_cluster, body)


# ---- quota exactness through the lean cluster client, as quota.py calls the scripts ------------


async def admit(client: ClusterClient, key_id: str, reserve: int, now: float, lease: str | None = None) -> list[Any]:
    base, win = f"gw:{{{key_id}}}:", window(now)
    lease = lease or secrets.token_hex(8)
    # the tombstone, then the key's one level: limits, minute, day, month, leases (gateway/access/quota.py)
    keys = [f"{base}gone:{lease}", base + "rec", f"{base}min:{win.minute}", base + "day:" + win.day]
    keys += [base + "month:" + win.month, base + "leases"]
    return list(await client.run_script(ADMIT, keys, admit_args(round(now * 1000), MODEL, reserve, lease, 300_000)))


async def release(client: ClusterClient, key_id: str, lease: str, reserved: int, used: int, now: float) -> None:
    base, win = f"gw:{{{key_id}}}:", window(now)
    keys = [base + "leases", f"{base}min:{win.minute}", base + "day:" + win.day, base + "month:" + win.month]
    await client.run_script(RELEASE, keys, [lease, used - reserved, used, 0, 0])


async def counters(client: ClusterClient, key_id: str, now: float) -> dict[str, int]:
    base, win = f"gw:{{{key_id}}}:", window(now)
    out = {}
    for name, key in (("minute", f"{base}min:{win.minute}"), ("day", base + "day:" + win.day)):
        requests, tokens = await client.execute("HMGET", key, "requests", "tokens", key=key)
        out[f"{name}_requests"], out[f"{name}_tokens"] = int(requests or 0), int(tokens or 0)
    return out


@pytest.mark.parametrize(
    ("limits", "code", "bound"),
    [
        ({"rpm": 17}, b"rpm", lambda c, admitted: c["minute_requests"] == admitted == 17),
        ({"tpm": 500}, b"tpm", lambda c, admitted: c["minute_tokens"] <= 500),
        ({"daily_tokens": 400}, b"daily_tokens", lambda c, admitted: c["day_tokens"] <= 400),
        ({"monthly_tokens": 300}, b"monthly_tokens", lambda c, admitted: c["day_tokens"] <= 300),
    ],
    ids=["rpm", "tpm", "daily", "monthly"],
)
def test_concurrent_admissions_never_overspend(
    redis_cluster: RedisCluster, limits: dict[str, int], code: bytes, bound: Callable[[dict[str, int], int], bool]
) -> None:
    """60 admissions at once from two replicas on one key: exactly as many as the limit allows."""

    async def body(a: Replica, b: Replica) -> None:
        key, _ = await new_key(a, **limits)
        now, rng = time.time(), random.Random(11)
        reserves = [rng.randint(10, 40) for _ in range(60)]
        replies = await asyncio.gather(*(admit((a, b)[i % 2].lean, key.id, r, now) for i, r in enumerate(reserves)))
        admitted = [r for r, reply in zip(reserves, replies, strict=True) if reply[0] == b"ok"]
        assert {reply[0] for reply in replies} == {b"ok", code}
        figures = await counters(a.lean, key.id, now)
        assert figures["minute_requests"] == len(admitted) and figures["minute_tokens"] == sum(admitted)
        assert bound(figures, len(admitted))

    run(redis_cluster, body)


def test_concurrency_limit_is_exact(redis_cluster: RedisCluster) -> None:
    async def body(a: Replica, b: Replica) -> None:
        key, _ = await new_key(a, max_concurrent=7)
        now = time.time()
        leases = [secrets.token_hex(8) for _ in range(40)]
        replies = await asyncio.gather(
            *(admit((a, b)[i % 2].lean, key.id, 5, now, lease) for i, lease in enumerate(leases))
        )
        admitted = [lease for lease, reply in zip(leases, replies, strict=True) if reply[0] == b"ok"]
        assert len(admitted) == 7
        await asyncio.gather(*(release(b.lean, key.id, lease, 5, 2, now) for lease in admitted[:3]))
        replies = await asyncio.gather(*(admit(a.lean, key.id, 5, now) for _ in range(10)))
        assert [reply[0] for reply in replies].count(b"ok") == 3

    run(redis_cluster, body)


def test_failover_under_traffic_counts_nothing_twice(redis_cluster: RedisCluster) -> None:
    """Admissions on one key while its master dies: after the replica takes over, Redis holds
    one lease per counted request, every lease is one the gateway sent (once: an unsure one
    retried with the same lease id counts once), and every admission acknowledged after the
    failover is there."""

    async def body(a: Replica, b: Replica) -> None:
        key, _ = await new_key(a)
        master = redis_cluster.master_of(f"gw:{{{key.id}}}:rec")
        now = time.time()
        acknowledged: list[str] = []
        unsure: list[str] = []  # the connection died after the script was sent: it may have run
        stop = asyncio.Event()
        failed_over = False
        after: list[str] = []

        async def traffic(replica: Replica) -> None:
            while not stop.is_set():
                lease = secrets.token_hex(8)
                try:
                    async with asyncio.timeout(0.5):
                        reply = await admit(replica.lean, key.id, 3, now, lease)
                    assert reply[0] == b"ok"
                    acknowledged.append(lease)
                    if failed_over:
                        after.append(lease)
                except (RedisConnectionError, TimeoutError):
                    unsure.append(lease)
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(traffic(r)) for r in (a, b, a, b)]

        async def admitted() -> int:
            return len(acknowledged)

        await eventually_async(admitted, lambda n: n >= 8, what="admissions before the failover")
        await asyncio.to_thread(redis_cluster.kill_master, master)
        failed_over = True
        for _ in range(100):
            if len(after) >= 20:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        assert len(after) >= 20, "admissions did not resume after the failover"
        # the unsure ones, retried with their own lease ids: each counts at most once
        for lease in unsure:
            with contextlib.suppress(RedisConnectionError, TimeoutError):
                await admit(a.lean, key.id, 3, now, lease)
        base = f"gw:{{{key.id}}}:"
        leases = {m.decode() for m in await a.lean.execute("ZRANGE", base + "leases", 0, -1, key=base + "leases")}
        figures = await counters(a.lean, key.id, now)
        assert figures["minute_requests"] == len(leases) and figures["minute_tokens"] == 3 * len(leases)
        assert leases <= set(acknowledged) | set(unsure)
        assert set(after) <= leases  # nothing acknowledged by the new master was lost
        assert set(unsure) <= leases  # the retries landed, once each

    run(redis_cluster, body)


# ---- the route store ------------------------------------------------------------------------------


def subscribers(cluster: RedisCluster, channel: str) -> int:
    """Clients subscribed to `channel`, on any node."""
    total = 0
    for node in cluster.live():
        with node.client() as client:
            total += int(client.pubsub_numsub(channel)[0][1])
    return total


def router() -> Router:
    engines = (EngineSettings(name="e1", kind="openai", url="http://127.0.0.1:9"),)
    pool = Pool(engines, HealthSettings(), GatewayMetrics())
    return Router(pool, (ModelSettings(MODEL, (RouteSettings(("e1",), MODEL),)),), rng=random.Random(1))


def test_route_changes_reach_the_other_replica(redis_cluster: RedisCluster) -> None:
    """A route change made on one replica applies on the other at the announcement."""

    async def body(a: Replica, b: Replica) -> None:
        engines = {"e1": EngineSettings(name="e1", kind="openai", url="http://127.0.0.1:9")}
        writer_router, follower_router = router(), router()
        writer = RouteStore(a.clients.admin, a.clients.subscriber, "gw", writer_router, engines)
        follower = RouteStore(b.clients.admin, b.clients.subscriber, "gw", follower_router, engines)
        follower.start()
        try:
            await eventually_async(lambda: asyncio.to_thread(subscribers, redis_cluster, "gw:routes:changed"))
            canary = (RouteSettings(("e1",), MODEL, 90.0), RouteSettings(("e1",), "tiny-v2", 10.0, "v2"))
            await writer.put(MODEL, canary)
            assert writer_router.routes[MODEL] == canary
            for _ in range(40):
                if follower_router.routes[MODEL] == canary:
                    break
                await asyncio.sleep(0.05)
            assert follower_router.routes[MODEL] == canary  # within 2 s: the announcement, not the 5 s poll
        finally:
            await follower.stop()

    run(redis_cluster, body)


def test_quota_scripts_accept_a_stale_admission_object(redis_cluster: RedisCluster) -> None:
    """Admission objects cross nothing but the process: a release after the failover of the
    key's master still reconciles on the promoted replica."""

    async def body(a: Replica, b: Replica) -> None:
        key, _ = await new_key(a, daily_tokens=1000)
        adm: Admission = await a.quota.admit(key, MODEL, 100)
        master = redis_cluster.master_of(f"gw:{{{key.id}}}:rec")
        await asyncio.to_thread(redis_cluster.wait_replicated, master)
        await asyncio.to_thread(redis_cluster.kill_master, master)
        for _ in range(50):
            with contextlib.suppress(GatewayError):
                await a.quota.admit(key, MODEL, 1)  # the breaker lapses, the map is re-read
                break
            await asyncio.sleep(0.1)
        await a.quota.release(adm, 10, 10)
        usage = await a.quota.usage(key.id)
        assert (usage["day"]["requests"], usage["day"]["tokens"]) == (2, 21)

    run(redis_cluster, body)
