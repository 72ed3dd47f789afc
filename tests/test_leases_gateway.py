"""Leased budgets end to end: four gateway processes on one Redis, leases on (the default), a fast
fake engine (8 prompt tokens, 4 completion tokens per request). Concurrent first requests of keys
with small limits never pass a limit; a limit lowered or a key revoked on one replica holds on
every replica from the moment the admin call answers, while all four admit from slices."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from testkit.keyed import admin, create_key, start_gateway, usage
from testkit.poll import eventually_async
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer

REPLICAS = 4
PRICES = {"input": 1000.0, "output": 2000.0}  # per million tokens: 0.001 a prompt token, 0.002 an output one
BODY = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16}


@pytest.fixture(scope="module")
def replicas(logs_dir: Path, redis_session: RedisServer) -> Iterator[list[Proc]]:
    fake = fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", name="fake-leases").start().wait_healthy()
    cfg = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.up().url, "timeout": 1.0},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake", "model": "fake"}]}],
        "pricing": {"models": {"fake": PRICES}},
    }
    procs = [start_gateway(logs_dir, cfg, f"leases-{i}") for i in range(REPLICAS)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
        fake.stop()


@pytest.fixture
def gws(replicas: list[Proc], redis_server: RedisServer) -> list[Proc]:
    """The replicas, over a running and empty Redis."""
    return replicas


async def spread(gws: list[Proc], secret: str, count: int) -> list[int]:
    """`count` chat requests at once, dealt round-robin over the replicas."""
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60, headers=headers) as c:
        calls = [c.post(gws[i % len(gws)].url + "/v1/chat/completions", json=BODY) for i in range(count)]
        return [r.status_code for r in await asyncio.gather(*calls)]


def minute_safe() -> None:
    """rpm counts per calendar minute: start where the next few seconds stay in one."""
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)


def test_concurrent_first_requests_never_pass_a_team_or_budget_limit(gws: list[Proc]) -> None:
    minute_safe()
    org = admin(gws[0], "POST", "/admin/orgs", {"name": "o", "rpm": 29}).json()
    team = admin(gws[0], "POST", "/admin/teams", {"name": "t", "org": org["id"]}).json()
    secrets = [create_key(gws[i], team=team["id"])[1] for i in range(3)]

    async def all_keys() -> list[int]:
        runs = await asyncio.gather(*(spread(gws, s, 40) for s in secrets))
        return [status for statuses in runs for status in statuses]

    statuses = asyncio.run(all_keys())
    assert statuses.count(200) == 29 and statuses.count(429) == 120 - 29, statuses
    # a request reserves 8 x 0.001 + 16 x 0.002 = 0.04 and spends 8 x 0.001 + 4 x 0.002 = 0.016
    key_id, secret = create_key(gws[1], daily_budget=0.4)
    statuses = asyncio.run(spread(gws, secret, 60))
    assert set(statuses) == {200, 429}
    spent = usage(gws[2], key_id)["day"]["spend"]
    assert spent == pytest.approx(statuses.count(200) * 0.016) and spent <= 0.4
    assert statuses.count(200) >= 10  # at least the budget over the reservations


Record = tuple[float, int]  # (when it was sent, monotonic; its status)


async def traffic(gws: list[Proc], secret: str, stop: asyncio.Event, records: list[Record]) -> None:
    """One client per replica, each request after the last: every replica's key busy (it leases)."""

    async def client(gw: Proc) -> None:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {secret}"}) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = await c.post(gw.url + "/v1/chat/completions", json=BODY)
                records.append((sent, r.status_code))

    await asyncio.gather(*(client(gw) for gw in gws))


def holders(redis_url: str, key_id: str) -> int:
    """How many processes hold a live slice of the key (a slice id starts with its process's tag)."""
    with redis.Redis.from_url(redis_url) as r:
        live = r.zrangebyscore(f"gw:{{{key_id}}}:slices", f"({round(time.time() * 1000)}", "+inf")
    return len({member[:11] for member in live})


def test_a_lowered_limit_and_a_revoke_hold_everywhere_once_answered(gws: list[Proc], redis_server: RedisServer) -> None:
    minute_safe()
    key_id, secret = create_key(gws[0], rpm=10**6)

    async def main() -> tuple[float, float, float, float, list[Record]]:
        stop, records = asyncio.Event(), list[Record]()
        running = asyncio.create_task(traffic(gws, secret, stop, records))

        def until_all_hold() -> Awaitable[int]:
            return eventually_async(
                lambda: asyncio.to_thread(holders, redis_server.url, key_id),
                lambda n: n == REPLICAS,
                what="every replica holding a slice",
            )

        try:
            await until_all_hold()
            r = await asyncio.to_thread(admin, gws[1], "PATCH", f"/admin/keys/{key_id}", {"rpm": 1})
            lowered = time.monotonic()
            assert r.status_code == 200
            await asyncio.sleep(0.5)
            raising = time.monotonic()  # from here on a request may pass again
            await asyncio.to_thread(admin, gws[2], "PATCH", f"/admin/keys/{key_id}", {"rpm": 10**6})
            raised = time.monotonic()
            await until_all_hold()
            r = await asyncio.to_thread(admin, gws[3], "DELETE", f"/admin/keys/{key_id}")
            revoked = time.monotonic()
            assert r.status_code == 200
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await running
        return lowered, raising, raised, revoked, records

    lowered, raising, raised, revoked, records = asyncio.run(main())
    assert {status for sent, status in records if lowered < sent < raising} == {429}
    assert {status for sent, status in records if sent > revoked} == {401}
    assert any(status == 200 for sent, status in records if raised < sent < revoked)
    assert len(records) > 100


def test_usage_counts_what_every_replica_admitted(gws: list[Proc], redis_server: RedisServer) -> None:
    key_id, secret = create_key(gws[0], daily_tokens=10**9)

    async def main() -> list[Record]:
        stop, records = asyncio.Event(), list[Record]()
        running = asyncio.create_task(traffic(gws, secret, stop, records))
        await eventually_async(
            lambda: asyncio.to_thread(holders, redis_server.url, key_id),
            lambda n: n == REPLICAS,
            what="every replica holding a slice",
        )
        stop.set()
        await running
        return records

    records = asyncio.run(main())
    ok = sum(1 for _, status in records if status == 200)
    day: dict[str, Any] = usage(gws[1], key_id)["day"]  # the slices come back before the read
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (ok, 8 * ok, 4 * ok)
    assert day["tokens"] == 12 * ok
