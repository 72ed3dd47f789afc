"""The lean request-path client (gateway/resp/client.py) on a Redis Cluster: a slot map over one
pipelined RespClient per master.

A command goes to the master of the CRC16 slot of its first key (`{hash tags}` honoured, so all
of one API key's quota keys land on one node). The map is learnt with CLUSTER SLOTS from any
node and kept until the cluster says otherwise:

- `MOVED slot host:port`: the slot has a new owner for good (resharding, failover): point the
  slot there, retry at once, and re-read the whole map in the background.
- `ASK slot host:port`: the slot is migrating and this key is on the target already: send
  `ASKING` + the command there (one write), once; the map stays as it is.
- `TRYAGAIN`: a multi-key command during a migration: retry shortly.
- A node that cannot be reached (nothing was sent): re-read the map from another node, since a
  replica may have taken over, and retry on the new owner if there is one.
- A connection that died after the command left: the command may have run, so it is never
  replayed; the caller gets the error (the quota scripts are idempotent per lease, and the
  caller decides) and the map is re-read in the background.

Every retry happens inside the caller's own await, so a caller that gave up (its timeout
cancelled it) stops them all: nothing is sent on its behalf later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.resp.client import CommandNotSent, RespClient, Script, ScriptKeys, pack, script_command
from gateway.settings.redis_url import parse_redis_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
TRYAGAIN_PAUSE = 0.02  # seconds; a migration moves a slot's keys in milliseconds
MIN_REFRESH_INTERVAL = 0.1  # seconds between two reads of the map: a failover is a burst of errors
RETIRE_AFTER = 5.0  # seconds a node that left the map keeps its connection, for replies in flight


class ClusterUnavailable(RedisConnectionError):
    """The cluster cannot serve the slot now (CLUSTERDOWN, no owner, redirected in circles): to
    the caller the same as an unreachable Redis, so its failure mode applies."""


class ClusterClient:
    def __init__(
        self,
        seeds: Sequence[tuple[str, int]],
        connect_timeout: float,
        *,
        user: str | None = None,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        if not seeds:
            raise ValueError("a Redis Cluster client needs at least one seed node")
        self._seeds = [f"{host}:{port}" for host, port in seeds]
        self._connect_timeout = connect_timeout
        self._scheme = "rediss" if tls else "redis"
        self._auth = ""
        if password is not None:
            self._auth = (quote(user, safe="") if user else "") + ":" + quote(password, safe="") + "@"
        self._slots: list[RespClient | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._nodes: dict[str, RespClient] = {}
        self._scripts: list[Script] = []  # "host:port" -> its client, masters of the map only
        self._retired: list[RespClient] = []  # nodes that left the map, closed RETIRE_AFTER later
        self._known: list[str] = list(self._seeds)  # every node of the last map, replicas too
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = -float("inf")
        self.refreshes = 0  # how many times the map was read (tests and metrics)

    @classmethod
    def from_url(cls, url: str, connect_timeout: float) -> ClusterClient:
        """Any URL of gateway/settings/redis_url.py, its hosts taken as the cluster's seeds."""
        target = parse_redis_url(url, cluster=True)
        return cls(list(target.seeds), connect_timeout, user=target.username, password=target.password, tls=target.tls)

    def owner(self, key: bytes | str) -> str | None:
        """The address this client would send `key` to now (None before the map is known)."""
        node = self._slots[key_slot(key.encode() if isinstance(key, str) else key)]
        return node.address if node is not None else None

    async def execute(self, *args: bytes | str | int | float, key: bytes | str | None = None) -> Any:
        """Run one command on the master of `key`'s slot (default: the command's first key)."""
        if key is None:
            key = args[1] if isinstance(args[1], bytes) else str(args[1])
        return await self._run(key_slot(key.encode() if isinstance(key, str) else key), pack(*args))

    def send_script(self, script: Script, keys: ScriptKeys, args: Sequence[Any]) -> asyncio.Future[Any]:
        """run_script without waiting for it (a task: the slot map may need reading first)."""
        return asyncio.ensure_future(self.run_script(script, keys, args))

    async def run_script(self, script: Script, keys: ScriptKeys, args: Sequence[Any]) -> Any:
        """EVALSHA on the master of the first key's slot (every key must share that slot)."""
        slot = key_slot(next(iter(keys)).encode())
        try:
            return await self._run(slot, script_command("EVALSHA", script.sha, keys, args))
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self._run(slot, script_command("EVAL", script.source, keys, args))

    async def _run(self, slot: int, command: bytes) -> Any:
        node = self._slots[slot]
        if node is None:
            await self._refresh()
            node = self._slots[slot]
            if node is None:
                raise ClusterUnavailable(f"no node of the cluster serves slot {slot}")
        asking = False
        for _ in range(MAX_REDIRECTS):
            try:
                if asking:
                    return await node.execute_asking_packed(command)
                return await node.execute_packed(command)
            except ResponseError as exc:
                message = str(exc)
                if message.startswith("MOVED "):
                    node, asking = self._moved(message), False
                elif message.startswith("ASK "):
                    node, asking = self._node(message.split()[2]), True
                elif message.startswith("TRYAGAIN"):
                    await asyncio.sleep(TRYAGAIN_PAUSE)
                elif message.startswith("CLUSTERDOWN"):
                    self._refresh_soon()
                    raise ClusterUnavailable(message) from None
                else:
                    raise
            except CommandNotSent:
                # Nothing left: a replica may own the slot now. Learn the map from another node.
                await self._refresh(avoid=node.address)
                owner = self._slots[slot]
                if owner is None or owner is node:
                    raise
                node, asking = owner, False
            except RedisConnectionError:
                self._refresh_soon()  # the command may have run: never replay it
                raise
        raise ClusterUnavailable(f"slot {slot}: still redirected after {MAX_REDIRECTS} tries")

    def _moved(self, message: str) -> RespClient:
        _, slot, address = message.split()
        node = self._slots[int(slot)] = self._node(address)
        self._refresh_soon()  # one slot moved: usually many did (a failover, a resharding)
        return node

    def _node(self, address: str) -> RespClient:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = RespClient(f"{self._scheme}://{self._auth}{address}", self._connect_timeout)
            node.preload(*self._scripts)
        return node

    def preload(self, *scripts: Script) -> None:
        """Every node loads these on each of its connections (see RespClient.preload)."""
        self._scripts = [*self._scripts, *scripts]
        for node in self._nodes.values():
            node.preload(*scripts)

    # ---- the slot map ---------------------------------------------------------------------------

    def _refresh_soon(self) -> None:
        """Read the map again in the background (errors are dropped: the next caller will see)."""
        idle = self._refresh_task is None or self._refresh_task.done()
        if idle and time.monotonic() - self._refreshed_at >= MIN_REFRESH_INTERVAL:
            self._refresh_task = asyncio.create_task(self._read_map(None), name="redis-cluster-map")
            self._refresh_task.add_done_callback(_retrieve)

    async def _refresh(self, avoid: str | None = None) -> None:
        """Read the map again, at most every MIN_REFRESH_INTERVAL; concurrent callers share one read."""
        task = self._refresh_task
        if task is None or task.done():
            if time.monotonic() - self._refreshed_at < MIN_REFRESH_INTERVAL:
                return
            task = self._refresh_task = asyncio.create_task(self._read_map(avoid), name="redis-cluster-map")
            task.add_done_callback(_retrieve)
        # shield: a caller that gives up must not cancel the read the others wait for
        await asyncio.shield(task)

    async def _read_map(self, avoid: str | None) -> None:
        candidates = [a for a in dict.fromkeys([*self._known, *self._seeds]) if a != avoid]
        if avoid is not None:
            candidates.append(avoid)  # last: it may have been a blip
        errors = []
        for address in candidates:
            node = self._nodes.get(address) or RespClient(
                f"{self._scheme}://{self._auth}{address}", self._connect_timeout
            )
            try:
                async with asyncio.timeout(2 * self._connect_timeout):
                    reply = await node.execute("CLUSTER", "SLOTS")
            except (RedisConnectionError, ResponseError, TimeoutError) as exc:
                errors.append(f"{address}: {exc!r}")
                continue
            finally:
                if address not in self._nodes:
                    node.close_after(0)
            self._apply(reply, address)
            return
        raise RedisConnectionError("no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _apply(self, reply: list[Any], source: str) -> None:
        source_host = source.rpartition(":")[0]
        slots: list[RespClient | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        known: list[str] = []
        masters: dict[str, RespClient] = {}
        for entry in reply:
            start, end, *members = entry
            addresses = []
            for member in members:
                host = member[0].decode() if isinstance(member[0], bytes) else str(member[0])
                if host in ("", "?"):  # the node does not know its own address: the one we asked
                    host = source_host
                addresses.append(f"{host}:{int(member[1])}")
            known.extend(addresses)
            master = masters.get(addresses[0]) or self._node(addresses[0])
            masters[addresses[0]] = master
            slots[int(start) : int(end) + 1] = [master] * (int(end) - int(start) + 1)
        for address, node in self._nodes.items():
            if address not in masters:
                node.close_after(RETIRE_AFTER)
                self._retired.append(node)
        self._retired = self._retired[-16:]
        self._nodes, self._slots = masters, slots
        self._known = list(dict.fromkeys(known))
        self._refreshed_at = time.monotonic()
        self.refreshes += 1

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)
        for node in [*self._nodes.values(), *self._retired]:
            await node.close()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A background read's error is not lost silently: it is logged, and the next caller retries."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("reading the Redis Cluster slot map failed: %r", task.exception())
