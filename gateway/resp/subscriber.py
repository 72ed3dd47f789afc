"""Follow a Redis pub/sub channel across node failures, on one Redis or a Redis Cluster.

In a Redis Cluster a PUBLISH reaches every node, replicas included, so a subscriber may listen on
any node: this one holds one plain SUBSCRIBE connection to one node, and when that node goes (a
crash, a failover, a network cut found by an unanswered PING) it moves to the next node it knows.
The nodes are learnt from the cluster itself (CLUSTER SLOTS, asked on each connect), so the seeds
may all be gone by the time they are needed.

A subscriber misses what is published while it is between nodes. It says so: after every
(re)subscription it yields a `subscribed` event, on which the caller re-reads whatever state the
channel announces changes of. redis-py's own cluster pub/sub (asyncio since redis-py 8.0) sticks
to the node of the channel's slot, and redis-py before 8.0 has none for asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """`message`: `data` was published. `subscribed`: (re)subscribed, anything published before
    may have been missed. `idle`: nothing for `idle_every` seconds (a cue for a periodic re-read)."""

    kind: Literal["message", "subscribed", "idle"]
    channel: str
    data: bytes | None = None


class OutageLog:
    """ "Redis unreachable" once when an outage begins and "Redis reachable again" once when it
    ends, however many parts of the process notice it (the subscription, the route store's reads)."""

    def __init__(self) -> None:
        self.down = False

    def lost(self, message: str, *args: object) -> None:
        if not self.down:
            self.down = True
            log.warning("Redis unreachable: " + message, *args)

    def back(self, message: str, *args: object) -> None:
        if self.down:
            self.down = False
            log.warning("Redis reachable again: " + message, *args)


class Subscriber:
    def __init__(
        self,
        seeds: list[tuple[str, int]],
        *,
        cluster: bool,
        timeout: float = 1.0,
        ping_every: float = 5.0,
        retry_pause: float = 0.5,
        connection_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """`connection_kwargs` go to redis.asyncio.Redis for each node (username, password, ssl...)."""
        if not seeds:
            raise ValueError("a subscriber needs at least one node")
        self._known = [f"{host}:{port}" for host, port in seeds]
        self._cluster = cluster
        self._timeout = timeout
        self._ping_every = ping_every
        self._retry_pause = retry_pause
        self._kwargs = connection_kwargs or {}
        self.node: str | None = None  # the node subscribed to now
        self.outage = OutageLog()  # shared with those who read what the channel announces

    async def subscribe(self, channel: str, idle_every: float | None = None) -> AsyncIterator[Event]:
        """Events of `channel`, forever; cancel the consuming task (or close the iterator) to stop."""
        failed: str | None = None
        outage = self.outage
        while True:
            for address in self._order(failed):
                try:
                    async with contextlib.aclosing(self._follow(address, channel, idle_every)) as events:
                        async for event in events:
                            if event.kind == "subscribed":
                                outage.back("subscribed to %s on %s", channel, address)
                            yield event
                except (RedisError, OSError, TimeoutError) as exc:
                    failed = address
                    outage.lost("the subscription to %s on %s was lost (%r); trying other nodes", channel, address, exc)
            await asyncio.sleep(self._retry_pause)

    def _order(self, failed: str | None) -> list[str]:
        """Every known node once, starting after the one that just failed (it goes last)."""
        known = self._known
        if failed in known:
            i = known.index(failed)
            return known[i + 1 :] + known[: i + 1]
        return list(known)

    async def _follow(self, address: str, channel: str, idle_every: float | None) -> AsyncGenerator[Event, None]:
        host, _, port = address.rpartition(":")
        client = aioredis.Redis(
            host=host.strip("[]"),
            port=int(port),
            socket_connect_timeout=self._timeout,
            socket_timeout=self._timeout + self._ping_every,
            # No silent reconnect and resubscribe inside redis-py: a lost connection must surface
            # here, so the caller hears `subscribed` and re-reads what it may have missed.
            retry=Retry(NoBackoff(), 0),
            **self._kwargs,
        )
        pubsub = client.pubsub()
        try:
            async with asyncio.timeout(2 * self._timeout):
                if self._cluster:
                    self._learn(await client.execute_command("CLUSTER", "SLOTS"), host)
                await pubsub.subscribe(channel)
            self.node = address
            yield Event("subscribed", channel)
            heard = quiet_since = time.monotonic()
            pinged = False
            while True:
                wait = self._ping_every if idle_every is None else min(self._ping_every, idle_every)
                message = await pubsub.get_message(timeout=wait)
                now = time.monotonic()
                if message is not None:
                    heard = now
                    pinged = False
                    if message["type"] == "message":
                        quiet_since = now
                        yield Event("message", channel, _bytes(message["data"]))
                        continue
                if idle_every is not None and now - quiet_since >= idle_every:
                    quiet_since = now
                    yield Event("idle", channel)
                if now - heard >= self._ping_every:
                    if pinged:  # a PING went unanswered for a whole period: the node is gone
                        raise TimeoutError(f"{address} did not answer PING within {self._ping_every}s")
                    await pubsub.ping()
                    pinged = True
        finally:
            self.node = None
            try:
                async with asyncio.timeout(self._timeout):
                    await pubsub.aclose()
                    await client.aclose()
            except (RedisError, OSError, TimeoutError):
                pass

    def _learn(self, slots: Any, asked_host: str) -> None:
        """Every node of CLUSTER SLOTS (masters and replicas), in the order first seen."""
        addresses = list(self._known)
        entries = slots.values() if isinstance(slots, dict) else slots
        for entry in entries:
            # redis-py's parsed form is {(start, end): {"primary": ..., "replicas": [...]}}
            members = [entry["primary"], *entry.get("replicas", [])] if isinstance(entry, dict) else entry[2:]
            for member in members:
                host = _text(member[0]) or asked_host
                addresses.append(f"{host}:{int(member[1])}")
        self._known = list(dict.fromkeys(addresses))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
