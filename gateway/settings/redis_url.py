"""Redis URLs, one parser for every client: one Redis, or a Redis Cluster and its seeds.

redis://[user:password@]host:port[/db]      one Redis (or a cluster reached through one seed,
rediss://...                                with cluster: true), rediss:// over TLS
redis+cluster://[user:password@]host:port[,host:port...]   a Redis Cluster, several seeds
rediss+cluster://...                        the same over TLS
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL and the `cluster` flag say, checked."""

    seeds: tuple[tuple[str, int], ...]
    cluster: bool
    tls: bool
    username: str | None
    password: str | None
    db: int

    @property
    def auth_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            kwargs["ssl"] = True
        return kwargs


def parse_redis_url(url: str, cluster: bool = False) -> RedisTarget:
    """Raises ValueError with a message fit for a config error."""
    parsed = urlparse(url)
    if parsed.scheme not in SCHEMES:
        raise ValueError(f"the URL must start with one of {', '.join(s + '://' for s in SCHEMES)}, got {url!r}")
    in_cluster = cluster or parsed.scheme.endswith("+cluster")
    auth, _, hosts = parsed.netloc.rpartition("@")
    username = password = None
    if auth:
        name, colon, secret = auth.partition(":")
        username, password = (unquote(name) or None, unquote(secret)) if colon else (None, unquote(name))
    seeds = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = part.strip(), "6379"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {part!r} in {url!r}")
        seeds.append((host.strip("[]"), int(port)))
    if len(seeds) > 1 and not in_cluster:
        raise ValueError("several hosts are a Redis Cluster's seeds: use redis+cluster:// or cluster: true")
    path = parsed.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    db = int(path or 0)
    if in_cluster and db != 0:
        raise ValueError("a Redis Cluster has only database 0")
    return RedisTarget(tuple(seeds), in_cluster, parsed.scheme.startswith("rediss"), username, password, db)
