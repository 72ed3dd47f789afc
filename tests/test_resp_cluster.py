"""The lean client on a real Redis Cluster (gateway/resp/cluster.py), and the promise both lean
clients keep: a command whose caller gave up is never sent later."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.resp.client import RespClient, Script
from gateway.resp.cluster import ClusterClient
from testkit.poll import eventually_async
from testkit.redis_cluster import ClusterNode, RedisCluster
from testkit.redis_server import RedisServer

INCR = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
TWO_KEYS = Script("redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return 1")


def run(cluster: RedisCluster, body: Callable[[ClusterClient], Awaitable[Any]], timeout: float = 0.5) -> Any:
    async def main() -> Any:
        client = ClusterClient.from_url(cluster.url, timeout)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def errorstat(cluster: RedisCluster, name: str) -> int:
    total = 0
    for node in cluster.live():
        with node.client() as r:
            total += int(r.info("errorstats").get(f"errorstat_{name}", {}).get("count", 0))
    return total


def key_on(cluster: RedisCluster, master: ClusterNode, avoid: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    """A key (quota layout) whose slot `master` serves."""
    for i in range(10_000):
        key = f"gw:{{key_{i:016x}}}:rec"
        if key_slot(key.encode()) not in avoid and cluster.master_of(key).port == master.port:
            return key
    raise LookupError(master.port)


def set_slot(cluster: RedisCluster, slot: int, *args: str) -> None:
    for node in cluster.masters():
        with node.client() as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, *args)


def test_each_key_goes_to_its_master(redis_cluster: RedisCluster) -> None:
    async def body(client: ClusterClient) -> None:
        keys = [f"gw:{{key_{i:016x}}}:min:1" for i in range(60)]
        await asyncio.gather(*(client.run_script(INCR, [k], [i + 1]) for i, k in enumerate(keys)))
        assert client.refreshes == 1  # the map was read once, then every command went straight there
        for i, k in enumerate(keys):
            with redis_cluster.master_of(k).client() as r:
                assert r.get(k) == str(i + 1).encode()
        # every master got some, and no node ever answered MOVED or ASK
        assert len({redis_cluster.master_of(k).port for k in keys}) == 3
        assert errorstat(redis_cluster, "MOVED") == errorstat(redis_cluster, "ASK") == 0
        # one key's quota keys share a hash tag: a script may touch them together
        assert await client.run_script(TWO_KEYS, ["gw:{key_a}:day:x", "gw:{key_a}:month:y"], ["v"]) == 1
        assert await client.execute("GET", "gw:{key_a}:month:y", key="gw:{key_a}:month:y") == b"v"

    run(redis_cluster, body)


def test_moved_slot_is_followed(redis_cluster: RedisCluster) -> None:
    async def body(client: ClusterClient) -> None:
        source, target = redis_cluster.masters()[:2]
        key = key_on(redis_cluster, source)
        assert await client.run_script(INCR, [key], [1]) == 1
        await client.execute("DEL", key, key=key)
        set_slot(redis_cluster, key_slot(key.encode()), "NODE", redis_cluster.ids[target.port])
        redis_cluster.wait_ok()
        assert client.owner(key) == source.address  # the client's map is stale now
        assert await client.run_script(INCR, [key], [5]) == 5  # MOVED, followed at once
        assert client.owner(key) == target.address
        with target.client() as r:
            assert r.get(key) == b"5"
        assert errorstat(redis_cluster, "MOVED") == 1

    run(redis_cluster, body)


def test_ask_during_a_migration(redis_cluster: RedisCluster) -> None:
    async def body(client: ClusterClient) -> None:
        source, target = redis_cluster.masters()[:2]
        key = key_on(redis_cluster, source)
        slot = key_slot(key.encode())
        await client.execute("PING", key=key)
        with target.client() as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", redis_cluster.ids[source.port])
        with source.client() as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", redis_cluster.ids[target.port])
        try:
            # the key is not on the source any more: ASK, then ASKING + the command on the target
            assert await client.execute("INCRBY", key, 7, key=key) == 7
            assert client.owner(key) == source.address  # ASK does not change the map
            direct = RespClient(f"redis://{target.address}", 1.0)
            try:
                assert await direct.execute_asking("GET", key) == b"7"
                await direct.execute_asking("DEL", key)
            finally:
                await direct.close()
            with source.client() as r:
                assert r.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            assert errorstat(redis_cluster, "ASK") == 1
        finally:
            for node in (source, target):
                with node.client() as r:
                    r.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")

    run(redis_cluster, body)


def test_failover_under_traffic(redis_cluster: RedisCluster) -> None:
    """A master dies: callers get connection errors (the quota failure mode applies), never a
    protocol error, and the client finds the promoted replica by itself."""

    async def body(client: ClusterClient) -> None:
        master = redis_cluster.masters()[0]
        key = key_on(redis_cluster, master)
        other = key_on(redis_cluster, redis_cluster.masters()[1])
        await client.run_script(INCR, [key], [1])
        outcomes: dict[str, int] = {"ok": 0, "unavailable": 0, "other": 0}
        other_ok, target = 0, float("inf")
        stop, recovered = asyncio.Event(), asyncio.Event()

        async def traffic() -> None:
            nonlocal other_ok
            while not stop.is_set():
                try:
                    async with asyncio.timeout(0.5):
                        await client.run_script(INCR, [key], [1])
                    outcomes["ok"] += 1
                    if outcomes["ok"] >= target:
                        recovered.set()
                except (RedisConnectionError, TimeoutError):
                    outcomes["unavailable"] += 1
                    await asyncio.sleep(0.05)
                except Exception:
                    outcomes["other"] += 1
                    raise
                try:
                    async with asyncio.timeout(0.5):
                        await client.run_script(INCR, [other], [1])
                    other_ok += 1
                except (RedisConnectionError, TimeoutError):
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(traffic()) for _ in range(4)]

        async def served() -> int:
            return outcomes["ok"]

        await eventually_async(served, lambda n: n >= 8, what="calls served before the failover")
        promoted = await asyncio.to_thread(redis_cluster.kill_master, master)
        before = outcomes["ok"]
        target = before + 20
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recovered.wait(), 10)
        stop.set()
        await asyncio.gather(*tasks)
        assert outcomes["other"] == 0
        assert outcomes["unavailable"] > 0, "the dead master was never noticed"
        assert outcomes["ok"] >= before + 20, f"no recovery after the failover: {outcomes}"
        assert client.owner(key) == promoted.address
        assert other_ok > 0

    run(redis_cluster, body)


def test_no_late_send_after_the_caller_gave_up_cluster(redis_cluster: RedisCluster) -> None:
    """The old owner answers MOVED only after the caller timed out: the command is not sent to
    the new owner on the caller's behalf."""

    async def body(client: ClusterClient) -> None:
        source, target = redis_cluster.masters()[:2]
        key = key_on(redis_cluster, source)
        await client.execute("PING", key=key)
        set_slot(redis_cluster, key_slot(key.encode()), "NODE", redis_cluster.ids[target.port])
        redis_cluster.wait_ok()
        assert source.proc is not None
        source.proc.send_signal(signal.SIGSTOP)  # well under the node timeout: no failover
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await client.execute("INCR", key, key=key)
        finally:
            source.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.5)  # the MOVED reply arrives now, to nobody
        with target.client() as r:
            assert r.get(key) is None
        assert await client.execute("INCR", key, key=key) == 1  # the next call follows the MOVED itself

    run(redis_cluster, body)


def test_no_late_send_after_the_caller_gave_up(redis_server: RedisServer) -> None:
    """A caller cancelled after it issued the command but before the write leaves: never sent."""

    async def main() -> None:
        client = RespClient(redis_server.url, 1.0)
        try:
            await client.execute("PING")
            task = asyncio.create_task(client.execute("INCR", "counter"))
            await asyncio.sleep(0)  # the task has queued its command for this iteration's write
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await client.execute("INCR", "other") == 1  # the connection is still in step
            assert await client.execute("GET", "counter") is None
        finally:
            await client.close()

    asyncio.run(main())
    with redis.Redis(port=redis_server.port) as r:
        assert r.info("commandstats")["cmdstat_incr"]["calls"] == 1


def test_unreachable_cluster_is_a_connection_error() -> None:
    async def main() -> None:
        client = ClusterClient([("127.0.0.1", 1)], 0.2)
        with pytest.raises(RedisConnectionError):
            await client.execute("GET", "k", key="k")
        await client.close()

    asyncio.run(main())
