"""Redis URLs and client building (gateway/settings/redis_url.py, gateway/resp/connect.py), and the
subscriber that follows a channel across node losses (gateway/resp/subscriber.py), against a real
Redis and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from gateway.resp.client import RespClient
from gateway.resp.cluster import ClusterClient
from gateway.resp.connect import build_clients, lean_client, parse_redis_url
from gateway.resp.subscriber import Event, Subscriber
from testkit.redis_cluster import RedisCluster
from testkit.redis_server import RedisServer

CHANNEL = "gw:routes:changed"


def test_parse_redis_url() -> None:
    one = parse_redis_url("redis://:pw@redis.llm:6380/2")
    assert (one.seeds, one.cluster, one.tls, one.username, one.password, one.db) == (
        (("redis.llm", 6380),),
        False,
        False,
        None,
        "pw",
        2,
    )
    assert parse_redis_url("redis://h").seeds == (("h", 6379),)
    assert parse_redis_url("redis://h:7000", cluster=True).cluster
    many = parse_redis_url("redis+cluster://u:p%40ss@a:7000,b:7001,[::1]:7002")
    assert many.cluster and many.seeds == (("a", 7000), ("b", 7001), ("::1", 7002))
    assert (many.username, many.password) == ("u", "p@ss")
    assert parse_redis_url("rediss+cluster://a:7000").tls
    assert parse_redis_url("rediss://a:7000").tls
    for bad, why in [
        ("http://a:1", "must start with"),
        ("redis://a:1,b:2", "Redis Cluster"),
        ("redis+cluster://a:1/3", "only database 0"),
        ("redis://a:1/x", "must be a number"),
        ("redis+cluster://a:x", "host:port"),
        ("redis+cluster://a:1,", "host:port"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_redis_url(bad)


def test_lean_client_kinds() -> None:
    assert isinstance(lean_client(parse_redis_url("redis://a:1/0"), 1.0), RespClient)
    assert isinstance(lean_client(parse_redis_url("redis+cluster://a:1,b:2"), 1.0), ClusterClient)
    assert isinstance(lean_client(parse_redis_url("redis://a:1", cluster=True), 1.0), ClusterClient)
    assert isinstance(lean_client(parse_redis_url("rediss://a:1"), 1.0), RespClient)  # TLS too


def test_clients_on_one_redis(redis_server: RedisServer) -> None:
    async def main() -> None:
        clients = build_clients(redis_server.url.replace("/0", "/3"), timeout=1.0)
        try:
            await clients.admin.set("k", "v")
            assert await clients.admin.get("k") == b"v"
            assert isinstance(clients.lean, RespClient)
            assert await clients.lean.execute("GET", "k") == b"v"  # the same database, 3
        finally:
            await clients.aclose()

    asyncio.run(main())
    with redis_server.client() as r:
        assert r.execute_command("SELECT", 3) and r.get("k") == b"v"


def test_clients_on_a_cluster(redis_cluster: RedisCluster) -> None:
    async def main() -> None:
        clients = build_clients(redis_cluster.url, timeout=1.0)
        try:
            assert isinstance(clients.admin, AsyncRedisCluster) and isinstance(clients.lean, ClusterClient)
            keys = [f"k{i}" for i in range(20)]  # over every master
            async with clients.admin.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.set(k, k)
                await pipe.execute()
            assert [await clients.lean.execute("GET", k, key=k) for k in keys] == [k.encode() for k in keys]
        finally:
            await clients.aclose()

    asyncio.run(main())


WAIT = 15.0  # seconds: generous, the machine is shared


async def next_event(events: AsyncIterator[Event]) -> Event:
    async with asyncio.timeout(WAIT):
        return await anext(events)


async def next_message(events: AsyncIterator[Event]) -> Event:
    async with asyncio.timeout(WAIT):
        while (event := await anext(events)).kind != "message":
            pass
        return event


def test_subscriber_survives_a_restart(redis_server: RedisServer) -> None:
    async def main() -> None:
        clients = build_clients(redis_server.url, timeout=0.5)
        sub = Subscriber([("127.0.0.1", redis_server.port)], cluster=False, timeout=0.5, ping_every=0.5)
        events = sub.subscribe(CHANNEL, idle_every=0.3)
        try:
            assert (await next_event(events)).kind == "subscribed"
            assert (await next_event(events)).kind == "idle"  # nothing published: a periodic cue
            await clients.admin.publish(CHANNEL, "tiny")
            assert await next_message(events) == Event("message", CHANNEL, b"tiny")
            redis_server.kill()
            redis_server.start()
            async with asyncio.timeout(WAIT):
                while (await next_event(events)).kind != "subscribed":
                    pass
            await clients.admin.publish(CHANNEL, "again")
            assert await next_message(events) == Event("message", CHANNEL, b"again")
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await clients.aclose()

    asyncio.run(main())


def test_subscriber_survives_a_master_failover(redis_cluster: RedisCluster) -> None:
    """Subscribed on a master that dies: the subscriber moves to another node (one it learnt from
    the cluster, not a seed) and hears what is published after the failover."""

    async def main() -> None:
        master = redis_cluster.masters()[0]
        clients = build_clients(redis_cluster.url, timeout=0.5)
        sub = Subscriber([("127.0.0.1", master.port)], cluster=True, timeout=0.5, ping_every=0.5)
        events = sub.subscribe(CHANNEL)
        try:
            assert (await next_event(events)).kind == "subscribed"
            assert sub.node == master.address
            await clients.admin.publish(CHANNEL, "before")  # any node: PUBLISH reaches them all
            assert await next_message(events) == Event("message", CHANNEL, b"before")

            waiter = asyncio.create_task(next_event(events))
            await asyncio.to_thread(redis_cluster.kill_master, master)
            assert (await waiter).kind == "subscribed"
            assert sub.node not in (None, master.address)
            for _ in range(50):  # the publisher's own client may need a moment to see the new map
                with contextlib.suppress(Exception):
                    await clients.admin.publish(CHANNEL, "after")
                    break
                await asyncio.sleep(0.1)
            assert await next_message(events) == Event("message", CHANNEL, b"after")
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await clients.aclose()

    asyncio.run(main())
