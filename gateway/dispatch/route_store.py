"""Model routes changed at run time (canary weights, rollback), shared by every replica via Redis.

A change is written to one hash and announced on a channel; every gateway process applies it on
the announcement, after every (re)subscription, and every few seconds too, so a replica that
missed a message (Redis restarted, a cluster node lost) still converges. The subscription is the
Subscriber's (gateway/resp/subscriber.py): one connection to any node, moved on a node's loss.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.access.keys import redis_or_503
from gateway.dispatch.routing import Router
from gateway.resp.subscriber import Subscriber
from gateway.settings import ConfigError, EngineSettings, RouteSettings, parse_routes

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0


def routes_json(routes: tuple[RouteSettings, ...]) -> list[dict[str, Any]]:
    # `adapter` marks routes the gateway derives for a LoRA adapter: never stored nor sent back
    return [{**{k: v for k, v in asdict(r).items() if k != "adapter"}, "engines": list(r.engines)} for r in routes]


class RouteStore:
    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        subscriber: Subscriber,
        prefix: str,
        router: Router,
        engines: dict[str, EngineSettings],
        timeout: float | None = None,
    ) -> None:
        self._redis = redis
        self._timeout = timeout  # bounds an admin change (redis.timeout)
        self._subscriber = subscriber
        self._hash = f"{prefix}:routes"
        self._channel = f"{prefix}:routes:changed"
        self._router = router
        self._engines = engines
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow_forever(), name="route-store")

    async def _follow_forever(self) -> None:
        """A bug below must not end the following silently (a task's exception is seen only when
        it is awaited, here at shutdown): log it, and follow again."""
        while True:
            try:
                await self._follow()
            except Exception:
                log.exception("route store: following route changes failed; starting again")
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def put(self, model: str, routes: tuple[RouteSettings, ...]) -> None:
        async with redis_or_503(self._timeout):
            await self._redis.hset(self._hash, model, json.dumps(routes_json(routes)))
            await self._redis.publish(self._channel, model)
            await self.reload()

    async def reset(self, model: str) -> None:
        async with redis_or_503(self._timeout):
            await self._redis.hdel(self._hash, model)
            await self._redis.publish(self._channel, model)
            await self.reload()

    async def reload(self) -> None:
        raw = await self._redis.hgetall(self._hash)
        overrides: dict[str, tuple[RouteSettings, ...]] = {}
        for name, value in raw.items():
            model = name.decode() if isinstance(name, bytes) else name
            try:
                overrides[model] = parse_routes(json.loads(value), model, self._engines, f"redis {self._hash}")
            except (ValueError, ConfigError) as exc:  # e.g. names an engine no longer configured
                log.warning("ignoring stored routes of %s: %s", model, exc)
        self._router.apply_overrides(overrides)

    async def _follow(self) -> None:
        outage = self._subscriber.outage  # one line per outage, whichever of us notices it first
        async for _ in self._subscriber.subscribe(self._channel, idle_every=POLL_SECONDS):
            # A change announced, a (re)subscription, or the periodic re-read: read the hash.
            try:
                await self.reload()
            except (RedisError, OSError) as exc:
                outage.lost("the route store keeps the current routes (%s)", exc)
            else:
                outage.back("the route store reads routes again")
