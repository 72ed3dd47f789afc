"""The one place that turns the Redis settings (a URL of gateway/settings/redis_url.py and the `cluster`
flag) into clients, for one Redis or a Redis Cluster. Three clients, each for its own traffic:
- `admin`: redis-py's asyncio client (`Redis`, or `RedisCluster` which follows MOVED/ASK and
  splits pipelines per node) for the key store, the route store and the admin API;
- `lean`: the request path's pipelined client (gateway/resp/client.py, gateway/resp/cluster.py) for
  everything the quota does;
- `subscriber`: pub/sub that survives a node loss (gateway/resp/subscriber.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlunparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from gateway.resp.client import LeanClient, RespClient
from gateway.resp.cluster import ClusterClient
from gateway.resp.subscriber import Subscriber
from gateway.settings.redis_url import RedisTarget, parse_redis_url


def admin_client(target: RedisTarget, timeout: float) -> aioredis.Redis | RedisCluster:
    """redis-py, for everything but the two quota scripts. Bytes replies, as KeyStore expects."""
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout, **target.auth_kwargs}
    if target.cluster:
        nodes = [ClusterNode(host, port) for host, port in target.seeds]
        return RedisCluster(startup_nodes=nodes, **common)
    host, port = target.seeds[0]
    return aioredis.Redis(host=host, port=port, db=target.db, **common)


def lean_client(target: RedisTarget, timeout: float) -> LeanClient:
    """The request path's client for the quota."""
    if target.cluster:
        return ClusterClient(
            list(target.seeds), timeout, user=target.username, password=target.password, tls=target.tls
        )
    host, port = target.seeds[0]
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address
    if target.password is not None:
        user = quote(target.username, safe="") if target.username else ""
        netloc = f"{user}:{quote(target.password, safe='')}@{netloc}"
    scheme = "rediss" if target.tls else "redis"
    return RespClient(urlunparse((scheme, netloc, f"/{target.db}", "", "", "")), timeout)


def subscriber(target: RedisTarget, timeout: float, ping_every: float = 5.0) -> Subscriber:
    kwargs: dict[str, Any] = dict(target.auth_kwargs)
    if not target.cluster:
        kwargs["db"] = target.db
    return Subscriber(
        list(target.seeds), cluster=target.cluster, timeout=timeout, ping_every=ping_every, connection_kwargs=kwargs
    )


@dataclass
class RedisClients:
    admin: aioredis.Redis | RedisCluster
    lean: LeanClient
    subscriber: Subscriber

    async def aclose(self) -> None:
        await self.lean.close()
        await self.admin.aclose()


def build_clients(url: str, *, cluster: bool = False, timeout: float = 0.25) -> RedisClients:
    """All three from the settings (redis.url, redis.cluster, redis.timeout)."""
    target = parse_redis_url(url, cluster)
    return RedisClients(admin_client(target, timeout), lean_client(target, timeout), subscriber(target, timeout))
