"""Many gateway replicas on one Redis Cluster (3 masters, 3 replicas): limits of one shared key hold
exactly across 4 gateway processes, revocation reaches them all, and a master failover under
traffic costs only the configured failure mode while it lasts, with nothing double-counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import admin, create_key, start_gateway, usage
from testkit.poll import eventually_async
from testkit.procs import Proc, all_healthy, fake_upstream
from testkit.redis_cluster import RedisCluster

REPLICAS = 4


@pytest.fixture(scope="module")
def engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        "fake": fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", name="fake-so"),
        "slow": fake_upstream(logs_dir, "--model", "slow", "--chunks", "20", "--pace-ms", "150", name="slow-so"),
    }
    with all_healthy(procs):
        yield procs


@pytest.fixture(scope="module")
def gateways(logs_dir: Path, redis_cluster_session: RedisCluster, engines: dict[str, Proc]) -> Iterator[list[Proc]]:
    cfg: dict[str, Any] = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_cluster_session.url, "timeout": 0.5},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "engines": [{"name": n, "kind": "openai", "url": p.url} for n, p in engines.items()],
        "models": [{"name": n, "routes": [{"engine": n}]} for n in engines],
    }
    procs = [start_gateway(logs_dir, cfg, f"cluster-gw-{i}") for i in range(REPLICAS)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture
def gws(gateways: list[Proc], redis_cluster: RedisCluster) -> list[Proc]:
    """The replicas, over a whole and empty cluster."""
    return gateways


async def spread(gws: list[Proc], secret: str, count: int, model: str = "fake", **extra: Any) -> list[int]:
    """`count` chat requests at once, dealt round-robin over the replicas."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}
    headers = {"authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(timeout=60) as c:
        calls = [
            c.post(gws[i % len(gws)].url + "/v1/chat/completions", json=body, headers=headers) for i in range(count)
        ]
        return [r.status_code for r in await asyncio.gather(*calls)]


@pytest.mark.parametrize(
    ("limits", "code", "admitted"),
    [
        ({"rpm": 37}, "rpm_exceeded", 37),
        ({"tpm": 30 * 24}, "tpm_exceeded", 30),  # each reserves 8 prompt + 16 max_tokens (the fake)
        ({"daily_tokens": 25 * 24}, "daily_tokens_exceeded", 25),
    ],
)
def test_a_shared_key_is_exact_across_replicas(
    gws: list[Proc], limits: dict[str, int], code: str, admitted: int
) -> None:
    key_id, secret = create_key(gws[0], **limits)
    # The reservation is prompt (counted by tiktoken) + max_tokens: pin it with a known prompt size.
    statuses = asyncio.run(spread(gws, secret, 60, max_tokens=16, messages=[{"role": "user", "content": "x"}]))
    if "rpm" not in limits:
        per_request = usage(gws[1], key_id)["minute"]["tokens"] // max(1, statuses.count(200))
        assert per_request <= 24, per_request  # the bound the limits above were sized with
    assert statuses.count(200) + statuses.count(429) == 60, statuses
    figures = usage(gws[2], key_id)
    day = figures["day"]
    if "rpm" in limits:
        assert statuses.count(200) == admitted
    else:
        # Reservations shrink to the real usage (12 tokens) as requests end, so more than the
        # limit / reservation may pass; what must hold is the limit itself.
        assert statuses.count(200) >= admitted
        spent = figures["minute"]["tokens"] if "tpm" in limits else day["tokens"]
        assert spent <= next(iter(limits.values())), (spent, limits)
    assert day["requests"] == statuses.count(200)  # every replica's admissions, counted once
    assert day["tokens"] == day["prompt_tokens"] + day["completion_tokens"]  # all reconciled
    r = httpx.post(
        gws[3].url + "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16},
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )
    if r.status_code == 429:
        assert r.json()["error"]["code"] == code


def test_concurrency_is_exact_across_replicas(gws: list[Proc]) -> None:
    key_id, secret = create_key(gws[0], max_concurrent=5)
    statuses = asyncio.run(spread(gws, secret, 24, model="slow", stream=True))  # paced: streams only
    assert statuses.count(200) == 5 and statuses.count(429) == 19, (
        statuses
    )  # each holds its slot 3 s (20 chunks, 150 ms apart)
    assert usage(gws[1], key_id)["day"]["requests"] == 5


def test_revocation_reaches_every_replica(gws: list[Proc]) -> None:
    key_id, secret = create_key(gws[0])
    assert set(asyncio.run(spread(gws, secret, 8))) == {200}
    assert admin(gws[1], "DELETE", f"/admin/keys/{key_id}").status_code == 200
    assert set(asyncio.run(spread(gws, secret, 8))) == {401}


def test_a_master_failover_under_traffic(gws: list[Proc], redis_cluster: RedisCluster) -> None:
    key_id, secret = create_key(gws[0], daily_tokens=10**9)
    master = redis_cluster.master_of(f"gw:{{{key_id}}}:rec")
    outcomes: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16}
        headers = {"authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(timeout=30) as c:
            i = 0
            while not stop.is_set():
                r = await c.post(gws[i % 2].url + "/v1/chat/completions", json=body, headers=headers)
                outcomes.append(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "quota_unavailable" and r.headers["retry-after"]
                i += 1
                await asyncio.sleep(0.01)

    async def answered() -> list[int]:
        return outcomes

    async def main() -> float:
        task = asyncio.create_task(traffic())
        try:
            await eventually_async(answered, lambda o: o.count(200) >= 20, what="answers before the failover")
            started = time.monotonic()
            await asyncio.to_thread(redis_cluster.kill_master, master)
            took = time.monotonic() - started
            killed = len(outcomes)
            # served by the promoted replica, without a restart: 50 answers in a row
            await eventually_async(
                answered, lambda o: o[killed:][-50:] == [200] * 50, timeout=60, what="50 answers in a row after it"
            )
        finally:
            stop.set()
            await task
        return took

    took = asyncio.run(main())
    assert set(outcomes) <= {200, 503}, set(outcomes)  # fail closed while it lasts, never a 500
    assert outcomes.count(503) < len(outcomes), took
    deadline = time.monotonic() + 10
    while (day := usage(gws[1], key_id)["day"])["requests"] != outcomes.count(200):
        assert time.monotonic() < deadline, (day, outcomes.count(200))  # nothing counted twice
        time.sleep(0.2)
