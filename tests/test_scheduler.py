"""The scheduler end to end: a gateway with keys in a private Redis, fake engines with a fixed
capacity and service time (they count their own peak concurrency and the order in which requests
got a slot), and the real CPU engine worker.

The fake engines tag each request with its `user` field, so a test reads the dispatch order off
the engine itself (`GET /stats`); with auth on, fairness flows are keys and `user` is only a tag.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, decode_record, encode_fields
from gateway.core.errors import GatewayError
from testkit.keyed import ADMIN_KEY, admin, create_key, keyed_gateway
from testkit.metrics import scrape
from testkit.poll import eventually_async
from testkit.procs import TINY_MODEL, Proc, fake_upstream, gateway, running
from testkit.redis_server import RedisServer

TINY = "tiny-llama"
SERVICE_S = 0.4  # the `fixed` engine: 2 slots, each request holds one 400 ms


@pytest.fixture(scope="module")
def fixed(logs_dir: Path) -> Iterator[Proc]:
    with running(
        fake_upstream(logs_dir, "--chunks", "4", "--capacity", "2", "--service-ms", "400", name="fixed")
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def learn(logs_dir: Path) -> Iterator[Proc]:
    with running(
        fake_upstream(logs_dir, "--chunks", "4", "--capacity", "3", "--service-ms", "300", name="learn")
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def module_gw(
    logs_dir: Path, redis_session: RedisServer, fixed: Proc, learn: Proc, tiny_worker: Proc
) -> Iterator[Proc]:
    config = {
        "health": {"interval": 0.2},
        "redis": {"url": redis_session.url, "timeout": 1.0},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "scheduler": {"max_queue_wait": 120},  # the CPU engine is slow on a busy machine
        "engines": [
            {"name": "fixed", "kind": "openai", "url": fixed.url, "max_inflight": 2},
            {"name": "learn", "kind": "openai", "url": learn.url},  # capacity learned
            {"name": "tiny", "kind": "openai", "url": tiny_worker.url, "max_inflight": 1},
        ],
        "models": [
            {"name": "fixed", "routes": [{"engine": "fixed", "model": "fake"}]},
            {"name": "learn", "routes": [{"engine": "learn", "model": "fake"}]},
            {"name": TINY, "routes": [{"engine": "tiny", "model": TINY}], "tokenizer": str(TINY_MODEL)},
        ],
    }
    with keyed_gateway(logs_dir, config, "sched-gw") as proc:
        yield proc


@pytest.fixture
def gw(module_gw: Proc, redis_server: RedisServer) -> Proc:
    """The gateway, over a running and empty Redis."""
    return module_gw


def stats(fake: Proc, reset: bool = False) -> dict[str, Any]:
    if reset:
        httpx.post(fake.url + "/stats/reset", timeout=5)
    return dict(httpx.get(fake.url + "/stats", timeout=5).json())


def body(model: str, tag: str, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "user": tag, "stream": stream, **extra}


async def call(client: httpx.AsyncClient, gw: Proc, secret: str, payload: dict[str, Any]) -> tuple[int, float]:
    """Status and the time the whole answer was in."""
    headers = {"authorization": f"Bearer {secret}"}
    async with client.stream("POST", gw.url + "/v1/chat/completions", json=payload, headers=headers) as r:
        await r.aread()
        return r.status_code, time.monotonic()


async def wait_queued(client: httpx.AsyncClient, gw: Proc, model: str, count: int, band: str = "normal") -> None:
    deadline = time.monotonic() + 10
    while True:
        r = await client.get(gw.url + f"/admin/models/{model}", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        if r.json()["scheduler"]["bands"][band]["queued"] == count:
            return
        assert time.monotonic() < deadline, f"never {count} queued: {r.json()['scheduler']}"
        await asyncio.sleep(0.02)


# ---- the key record ----------------------------------------------------------------------------


def test_priority_and_weight_on_the_key_record() -> None:
    fields = validate_key_fields({"name": "n", "priority": "high", "weight": 2}, partial=False)
    assert fields["priority"] == "high" and fields["weight"] == 2.0
    key = decode_record({**encode_fields(fields), "id": "key_0123456789abcdef"})
    assert isinstance(key, ApiKey) and (key.priority, key.weight) == ("high", 2.0)
    assert key.public()["priority"] == "high" and key.public()["weight"] == 2.0
    cleared = decode_record({**encode_fields({"priority": None, "weight": None}), "id": "key_0123456789abcdef"})
    assert cleared is not None and (cleared.priority, cleared.weight) == ("normal", 1.0)
    for bad in ({"priority": "urgent"}, {"priority": 1}, {"weight": 0}, {"weight": -1}, {"weight": True}):
        with pytest.raises(GatewayError) as err:
            validate_key_fields({"name": "n", **bad}, partial=False)
        assert err.value.status == 400 and err.value.param == next(iter(bad))


def test_admin_api_and_cli_set_priority_and_weight(gw: Proc) -> None:
    key_id, _ = create_key(gw, priority="low", weight=0.5)
    got = admin(gw, "GET", f"/admin/keys/{key_id}").json()
    assert (got["priority"], got["weight"]) == ("low", 0.5)
    patched = admin(gw, "PATCH", f"/admin/keys/{key_id}", {"priority": "high", "weight": None}).json()
    assert (patched["priority"], patched["weight"]) == ("high", 1.0)
    bad = admin(gw, "PATCH", f"/admin/keys/{key_id}", {"priority": "top"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "gateway.cli.main", "keys", "--url", gw.url]
    run = subprocess.run([*cmd, "create", "--name", "c", "--priority", "high", "--weight", "3"], **_quiet(env))
    assert run.returncode == 0, run.stderr
    created = json.loads(run.stdout)
    assert (created["priority"], created["weight"]) == ("high", 3.0)
    run = subprocess.run([*cmd, "update", created["id"], "--priority", "low"], **_quiet(env))
    assert run.returncode == 0 and json.loads(run.stdout)["priority"] == "low"


def _quiet(env: dict[str, str]) -> dict[str, Any]:
    return {"capture_output": True, "text": True, "env": env, "timeout": 60, "check": False}


# ---- scheduling --------------------------------------------------------------------------------


def test_idle_engines_add_nothing(gw: Proc, fixed: Proc) -> None:
    """Below capacity no request enters a queue: no dispatch, no queue wait, straight through."""
    _, secret = create_key(gw)
    stats(fixed, reset=True)
    dispatched = scrape(gw.url, "gateway_dispatches_total")
    waits = scrape(gw.url, "gateway_queue_wait_seconds_count")

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(3):  # one at a time, then two at once: never more than the 2 slots
                assert (await call(client, gw, secret, body("fixed", f"s{i}")))[0] == 200
                await asyncio.sleep(0.05)
                pair = await asyncio.gather(*(call(client, gw, secret, body("fixed", "p")) for _ in range(2)))
                assert [status for status, _ in pair] == [200, 200]
                await asyncio.sleep(0.05)

    asyncio.run(run())
    assert scrape(gw.url, "gateway_dispatches_total") == dispatched
    assert scrape(gw.url, "gateway_queue_wait_seconds_count") == waits
    assert scrape(gw.url, "gateway_queued_requests") == 0
    engine = stats(fixed)
    assert engine["served"] == 9 and engine["max_running"] == 2 and engine["max_waiting"] == 0
    view = admin(gw, "GET", "/admin/models/fixed").json()["scheduler"]
    assert view["engines"] == [
        {"name": "fixed", "healthy": True, "in_flight": 0, "capacity": 2, "capacity_source": "configured"}
    ]
    assert all(band["queued"] == 0 for band in view["bands"].values())


def test_a_flood_does_not_delay_another_key(gw: Proc, fixed: Proc) -> None:
    _, flooder = create_key(gw)
    _, polite = create_key(gw)
    stats(fixed, reset=True)
    dispatched = scrape(gw.url, "gateway_dispatches_total", band="normal")

    async def run() -> tuple[int, float, list[float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            flood = [asyncio.ensure_future(call(client, gw, flooder, body("fixed", "A"))) for _ in range(12)]
            await wait_queued(client, gw, "fixed", 10)
            served = int((await client.get(fixed.url + "/stats")).json()["served"])
            status, polite_done = await call(client, gw, polite, body("fixed", "B"))
            assert status == 200
            return served, polite_done, [done for _, done in await asyncio.gather(*flood)]

    served, polite_done, flood_done = asyncio.run(run())
    engine = stats(fixed)
    # B got the slot after at most one more of A's (one dispatch turn), not after A's 10 waiting
    assert engine["order"].index("B") - served <= 1, engine["order"]
    assert sum(done > polite_done for done in flood_done) >= 8
    assert engine["max_running"] == 2 and engine["max_waiting"] == 0  # the engine's queue never used
    assert scrape(gw.url, "gateway_dispatches_total", band="normal") - dispatched == 11
    assert scrape(gw.url, "gateway_queue_wait_seconds_count", band="normal") >= 11


def test_a_high_priority_key_overtakes_a_queue_of_normal_ones(gw: Proc, fixed: Proc) -> None:
    _, normal = create_key(gw)
    high_id, high = create_key(gw)
    assert admin(gw, "PATCH", f"/admin/keys/{high_id}", {"priority": "high"}).json()["priority"] == "high"
    stats(fixed, reset=True)

    async def run() -> int:
        async with httpx.AsyncClient(timeout=60) as client:
            queue = [asyncio.ensure_future(call(client, gw, normal, body("fixed", "N"))) for _ in range(8)]
            await wait_queued(client, gw, "fixed", 6)
            served = int((await client.get(fixed.url + "/stats")).json()["served"])
            urgent = [call(client, gw, high, body("fixed", "H", stream=False)) for _ in range(2)]
            assert [status for status, _ in await asyncio.gather(*urgent)] == [200, 200]
            await asyncio.gather(*queue)
            return served

    served = asyncio.run(run())
    order = stats(fixed)["order"]
    # both high requests got the next two slots (a third at most, if one freed as they arrived)
    assert order[served : served + 3].count("H") == 2, order
    assert scrape(gw.url, "gateway_dispatches_total", band="high") >= 1


def test_the_gateway_never_exceeds_an_engines_capacity(gw: Proc, fixed: Proc) -> None:
    keys = [create_key(gw)[1] for _ in range(3)]
    stats(fixed, reset=True)

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [
                call(client, gw, secret, body("fixed", f"k{i}", stream=bool(j % 2)))
                for i, secret in enumerate(keys)
                for j in range(5)
            ]
            return [status for status, _ in await asyncio.gather(*calls)]

    assert asyncio.run(run()) == [200] * 15
    engine = stats(fixed)
    assert engine["served"] == 15 and engine["max_running"] == 2 and engine["max_waiting"] == 0
    # round robin between the three keys: none waits for another's five
    first = engine["order"][:9]
    assert all(first.count(tag) >= 2 for tag in ("k0", "k1", "k2")), engine["order"]


def test_a_client_that_leaves_the_queue_holds_nothing(gw: Proc, fixed: Proc, redis_server: RedisServer) -> None:
    """Disconnect while queued: out of the queue at once, the quota reservation and the
    concurrency lease released (checked in Redis), and the engine never sees the request."""
    holder_id, holder = create_key(gw, priority="high")
    key_id, secret = create_key(gw, tpm=100_000, daily_tokens=100_000, max_concurrent=4)
    leases = f"gw:{{{key_id}}}:leases"
    redis = redis_server.client()
    stats(fixed, reset=True)

    def usage() -> dict[str, Any]:
        return dict(admin(gw, "GET", f"/admin/keys/{key_id}/usage").json())

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # high-priority work keeps both slots busy for about 3 s: the normal request waits
            holding = [asyncio.ensure_future(call(client, gw, holder, body("fixed", "hold"))) for _ in range(16)]
            await wait_queued(client, gw, "fixed", 14, band="high")
            payload = json.dumps(body("fixed", "gone", max_tokens=50)).encode()
            _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                + f"authorization: Bearer {secret}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            await wait_queued(client, gw, "fixed", 1)
            assert redis.zcard(leases) == 1 and usage()["day"]["tokens"] > 0  # reserved while queued
            writer.close()
            await writer.wait_closed()
            await wait_queued(client, gw, "fixed", 0)
            deadline = time.monotonic() + 10
            while redis.zcard(leases) or usage()["day"]["tokens"]:
                assert time.monotonic() < deadline, (redis.zcard(leases), usage())
                await asyncio.sleep(0.02)
            assert [status for status, _ in await asyncio.gather(*holding)] == [200] * 16

    asyncio.run(run())
    assert usage()["day"]["tokens"] == 0 and redis.zcard(leases) == 0
    assert "gone" not in stats(fixed)["order"]
    assert scrape(gw.url, "gateway_client_disconnects_total", model="fixed") >= 1
    assert admin(gw, "GET", f"/admin/keys/{holder_id}/usage").json()["day"]["requests"] == 16
    redis.close()


def test_capacity_learned_from_the_engine(gw: Proc, learn: Proc) -> None:
    """No max_inflight: the first flood overfills the engine until it is seen saturated; from
    then on the gateway keeps the queue (the engine's own stays at its probing margin)."""
    _, secret = create_key(gw)

    async def flood() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [call(client, gw, secret, body("learn", f"l{i}")) for i in range(15)]
            assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 15

    stats(learn, reset=True)
    asyncio.run(flood())
    first = stats(learn)
    assert first["max_waiting"] >= 5  # nothing known yet: the engine queued them
    engine = admin(gw, "GET", "/admin/models/learn").json()["scheduler"]["engines"][0]
    assert engine["capacity_source"] == "learned" and 3 <= engine["capacity"] <= 5, engine
    stats(learn, reset=True)
    asyncio.run(flood())
    second = stats(learn)
    assert second["max_running"] == 3 and second["max_waiting"] <= 2, second


def test_priority_on_the_real_cpu_engine(gw: Proc) -> None:
    """The CPU worker with max_inflight 1: a high key's request goes right after the running one."""
    _, normal = create_key(gw)
    _, high = create_key(gw, priority="high")
    peak = 0

    async def run() -> list[str]:
        nonlocal peak
        finished: list[str] = []

        async def one(secret: str, tag: str, tokens: int) -> None:
            payload = body(TINY, tag, max_tokens=tokens, ignore_eos=True, stream_options={"include_usage": True})
            async with client.stream(
                "POST", gw.url + "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {secret}"}
            ) as r:
                text = (await r.aread()).decode()
                assert r.status_code == 200 and f'"completion_tokens":{tokens}' in text.replace(" ", ""), text
            finished.append(tag)

        async with httpx.AsyncClient(timeout=60) as client:
            queue = [asyncio.ensure_future(one(normal, f"n{i}", 64)) for i in range(4)]
            await wait_queued(client, gw, TINY, 3)
            urgent = asyncio.ensure_future(one(high, "high", 4))
            while not urgent.done() or not all(q.done() for q in queue):
                view = (await client.get(gw.url + f"/admin/models/{TINY}", headers=_admin())).json()
                peak = max(peak, view["scheduler"]["engines"][0]["in_flight"])
                await asyncio.sleep(0.02)
            await asyncio.gather(urgent, *queue)
        return finished

    finished = asyncio.run(run())
    assert finished.index("high") == 1, finished
    assert peak == 1


def _admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN_KEY}"}


# ---- bounds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(logs_dir: Path) -> Iterator[Proc]:
    with running(
        # 6 s: the other requests queue and time out (after 1 s) long before it ends, even on a busy machine
        fake_upstream(logs_dir, "--chunks", "2", "--capacity", "1", "--service-ms", "6000", name="slow")
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def bounded(logs_dir: Path, slow: Proc) -> Iterator[Proc]:
    """Auth off: the `user` field names the flow, so the per-key cap is per user."""
    config = {
        "health": {"interval": 0.5},
        "auth": {"enabled": False},
        "scheduler": {"max_queue_wait": 1.0, "max_queued_per_key": 3},
        "engines": [{"name": "slow", "kind": "openai", "url": slow.url, "max_inflight": 1}],
        "models": [{"name": "slow", "routes": [{"engine": "slow", "model": "fake"}]}],
    }
    with running(gateway(logs_dir, config, name="bounded-gw"), "/ready", timeout=60) as proc:
        yield proc


def test_queue_full_and_queue_timeout(bounded: Proc, slow: Proc) -> None:
    async def run() -> list[tuple[int, dict[str, Any], str | None, float]]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(user: str) -> tuple[int, dict[str, Any], str | None, float]:
                start = time.monotonic()
                r = await client.post(bounded.url + "/v1/chat/completions", json=body("slow", user, stream=False))
                payload = r.json().get("error") or {}
                return r.status_code, payload, r.headers.get("retry-after"), time.monotonic() - start

            running = asyncio.ensure_future(one("k"))
            await eventually_async(lambda: asyncio.to_thread(stats, slow), lambda st: st["running"] == 1)
            queued = [asyncio.ensure_future(one("k")) for _ in range(3)]
            deadline = time.monotonic() + 5
            while scrape(bounded.url, "gateway_queued_requests") < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            refused = await one("k")  # a fourth waiting request of the same user
            other = asyncio.ensure_future(one("other"))  # another user may still queue
            return [refused, *(await asyncio.gather(*queued)), await other, await running]

    refused, *timed_out, other, running = asyncio.run(run())
    status, error, retry_after, took = refused
    assert status == 429 and error["code"] == "queue_full" and error["type"] == "rate_limit_exceeded"
    assert retry_after is not None and int(retry_after) >= 1 and took < 0.5  # at once
    for status, error, retry_after, took in [*timed_out, other]:
        assert status == 429 and error["code"] == "queue_timeout" and int(retry_after or 0) >= 1
        assert 0.9 < took < 3.0
    assert running[0] == 200
    assert scrape(bounded.url, "gateway_queue_timeouts_total", band="normal") == 4
    assert scrape(bounded.url, "gateway_queue_full_total", band="normal") == 1
    assert scrape(bounded.url, "gateway_queued_requests") == 0
    assert stats(slow)["served"] == 1 and stats(slow)["max_waiting"] == 0
