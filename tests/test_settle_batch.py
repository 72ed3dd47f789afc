"""Settling in batches (gateway/access/settle_batch.py): the releases of one loop iteration leave
in one script call (one per slot on a Redis Cluster), and the totals are those of one-by-one
releases, on a real Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.crc import key_slot

from gateway.access.keys import KeyStore
from gateway.access.quota import Quota
from testkit.keyed import admin, create_key, start_gateway
from testkit.procs import fake_upstream
from testkit.redis_cluster import RedisCluster
from testkit.redis_server import RedisServer
from tests.test_cluster_stores import Replica
from tests.test_cluster_stores import new_key as new_cluster_key
from tests.test_cluster_stores import run as run_cluster
from tests.test_quota import MODEL, T, new_key, run


def test_one_call_settles_a_loop_iteration_exactly(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, max_concurrent=60, daily_tokens=10**6)
        adms = await asyncio.gather(*(quota.admit(key, MODEL, 500, now=T) for _ in range(60)))
        assert await client.zcard(f"gw:{{{key.id}}}:leases") == 60
        calls = quota.settles.calls
        await asyncio.gather(*(quota.release(adm, 10 + i, i) for i, adm in enumerate(adms)))
        assert quota.settles.calls == calls + 1  # sixty releases, one script call
        await asyncio.gather(*(quota.release(adm, 10 + i, i) for i, adm in enumerate(adms)))  # repeats: nothing
        usage = await quota.usage(key.id, now=T)
        prompt, completion = sum(10 + i for i in range(60)), sum(range(60))
        for period in ("day", "month"):
            assert usage[period]["requests"] == 60
            assert usage[period]["prompt_tokens"] == prompt and usage[period]["completion_tokens"] == completion
            assert usage[period]["tokens"] == prompt + completion
        assert usage["minute"] == {"requests": 60, "tokens": prompt + completion}
        assert await client.zcard(f"gw:{{{key.id}}}:leases") == 0  # every slot free again

    run(redis_server, body)


def test_a_batch_is_one_call_per_slot_on_a_cluster(redis_cluster: RedisCluster) -> None:
    async def body(a: Replica, b: Replica) -> None:
        keys = [(await new_cluster_key(a, daily_tokens=10**6))[0] for _ in range(8)]
        adms: list[Any] = []
        for key in keys:
            adms += await asyncio.gather(*(a.quota.admit(key, MODEL, 100) for _ in range(3)))
        calls = a.quota.settles.calls
        await asyncio.gather(*(a.quota.release(adm, 7, 5) for adm in adms))
        slots = {key_slot(f"gw:{{{key.id}}}:leases".encode()) for key in keys}
        assert a.quota.settles.calls == calls + len(slots)
        for key in keys:
            usage = await b.quota.usage(key.id)  # read through the other replica
            assert usage["day"]["requests"] == 3 and usage["day"]["tokens"] == 36
            assert usage["day"]["prompt_tokens"] == 21 and usage["day"]["completion_tokens"] == 15

    run_cluster(redis_cluster, body)


def test_a_slot_is_free_before_the_client_has_its_answer(logs_dir: Path, redis_server: RedisServer) -> None:
    """Clients of keys with max_concurrent 1, each sending its next request the moment it has the
    previous answer, many at once (so releases share batches): never a concurrency refusal, and
    every request counted once."""
    up = fake_upstream(logs_dir, "--model", "fake", name="settle-fake").start().wait_healthy()
    cfg = {
        "redis": {"url": redis_server.url, "timeout": 1.0},
        "auth": {"enabled": True},
        "engines": [{"name": "fake", "kind": "openai", "url": up.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake", "model": "fake"}]}],
    }
    gw = start_gateway(logs_dir, cfg, "gw-settle")
    try:
        keys = [create_key(gw, max_concurrent=1) for _ in range(12)]
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}

        async def client(secret: str) -> list[int]:
            headers = {"authorization": f"Bearer {secret}"}
            async with httpx.AsyncClient(timeout=30, headers=headers) as c:
                return [(await c.post(gw.url + "/v1/chat/completions", json=body)).status_code for _ in range(25)]

        async def all_clients() -> list[list[int]]:
            return await asyncio.gather(*(client(secret) for _, secret in keys))

        statuses = asyncio.run(all_clients())
        assert all(s == 200 for one in statuses for s in one), statuses
        for key_id, _ in keys:
            usage = admin(gw, "GET", f"/admin/keys/{key_id}/usage").json()
            assert usage["day"]["requests"] == 25
    finally:
        gw.stop()
        up.stop()
