"""Where adapters are loaded, shared by every replica through Redis (one hash tag, `{lora}`):

  {P}:{lora}:on:{engine}    hash: adapter -> when it was last used (ms); what the engine holds
  {P}:{lora}:use:{engine}   sorted set: "adapter NUL replica" -> lease expiry (ms); in use there
  {P}:{lora}:lock:{engine}  one load or unload at a time on the engine, across replicas (PX expiry)

A request for an adapter on an engine (`ensure`) first marks it in use there (a lease, renewed
every sweep while this replica has it in flight or used it within `GRACE`) and, in the same
step, learns whether the engine holds it; only then, and only when it does not, is it loaded.
Loads are single-flight: one task per engine and adapter in a replica, the engine's lock across
replicas, and a holder seen under the lock is not loaded again. At `max_loras`, the least
recently used adapter with no live mark is claimed (removed from the holdings, atomically with
the check) and then unloaded, so no adapter is unloaded while a request of any replica uses it.
After the first request, the hot path is two dict look-ups: no Redis, no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import orjson

from gateway.core.errors import Code, GatewayError
from gateway.core.metrics import GatewayMetrics
from gateway.engines.client import Upstream
from gateway.engines.pool import Engine, Pool
from gateway.resp.client import LeanClient, Script
from gateway.settings import AdapterSettings

log = logging.getLogger(__name__)

GRACE = 1.0  # seconds an adapter stays marked in use after its last request here
LEASE_MS = 15_000  # a mark outlives a crashed replica this long
SWEEP = 0.25  # seconds between sweeps (marks, holdings, definitions)

_MARK = Script("""
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return redis.call('HEXISTS', KEYS[2], ARGV[3])
""")
# The least recently used adapter (ARGV[2..], in that order) with no live mark: claimed, or nil.
_CLAIM = Script("""
local now = tonumber(ARGV[1])
for i = 2, #ARGV do
  local live = false
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
    if string.sub(m, 1, #ARGV[i] + 1) == ARGV[i] .. '\\0' then live = true break end
  end
  if not live and redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then return ARGV[i] end
end
return false
""")
_TOUCH = Script("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
""")
_UNLOCK = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


class Placement:
    def __init__(
        self,
        redis: LeanClient,
        prefix: str,
        pool: Pool,
        upstream: Upstream,
        metrics: GatewayMetrics,
        load_timeout: float,
    ) -> None:
        self._redis = redis
        self._base = f"{prefix}:{{lora}}"
        self.pool = pool
        self._upstream = upstream
        self._metrics = metrics
        self._timeout = load_timeout
        self._replica = uuid.uuid4().hex[:12]
        self._inflight: dict[tuple[str, str], int] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._marked: set[tuple[str, str]] = set()
        self._loading: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.adapters: dict[str, AdapterSettings] = {}  # set by the registry's owner

    def _key(self, kind: str, engine: str) -> str:
        return f"{self._base}:{kind}:{engine}"

    async def ensure(self, engine: Engine, adapter: str) -> None:
        """The engine holds `adapter` when this returns, and keeps it until `done`."""
        key = (engine.name, adapter)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        self._last[key] = time.monotonic()
        self._metrics.adapter_requests_by[adapter].inc()
        if key in self._marked and adapter in engine.adapters:
            return
        try:
            if key not in self._marked:
                member = f"{adapter}\0{self._replica}"
                expiry = int(time.time() * 1000) + LEASE_MS
                keys = [self._key("use", engine.name), self._key("on", engine.name)]
                held = await self._redis.run_script(_MARK, keys, [member, expiry, adapter])
                self._marked.add(key)
                if held:
                    engine.adapters.add(adapter)
                    return
            task = self._loading.get(key)
            if task is None:
                task = self._loading[key] = asyncio.ensure_future(self._load(engine, adapter))
                task.add_done_callback(lambda _: self._loading.pop(key, None))
            await asyncio.shield(task)
        except BaseException:
            self.done(engine, adapter)
            raise

    def done(self, engine: Engine, adapter: str) -> None:
        key = (engine.name, adapter)
        self._inflight[key] -= 1
        self._last[key] = time.monotonic()

    async def _load(self, engine: Engine, adapter: str) -> None:
        spec = self.adapters.get(adapter)
        if spec is None:
            raise GatewayError(404, f"The adapter '{adapter}' no longer exists.", code=Code.MODEL_NOT_FOUND)
        on, use = self._key("on", engine.name), self._key("use", engine.name)
        deadline = time.monotonic() + self._timeout
        token = await self._lock(engine, deadline)
        try:
            if await self._redis.execute("HEXISTS", on, adapter, key=on):
                engine.adapters.add(adapter)
                return
            limit = engine.settings.max_loras or 1
            while True:
                held = await self._redis.execute("HGETALL", on, key=on)
                holdings = {bytes(held[i]).decode(): float(held[i + 1]) for i in range(0, len(held), 2)}
                engine.adapters = set(holdings)
                if len(holdings) < limit:
                    break
                order = sorted(holdings, key=holdings.__getitem__)
                victim = await self._redis.run_script(_CLAIM, [use, on], [int(time.time() * 1000), *order])
                if victim:
                    await self._unload(engine, bytes(victim).decode())
                    continue
                if time.monotonic() > deadline:
                    raise GatewayError(
                        503, f"Every adapter slot of engine '{engine.name}' is in use.", code=Code.NO_HEALTHY_ENGINE
                    )
                await asyncio.sleep(0.05)  # an adapter in use there frees within GRACE of its last request
            started = time.monotonic()
            body = orjson.dumps({"lora_name": adapter, "lora_path": spec.path})
            status, text = await self._call(engine, "/v1/load_lora_adapter", body)
            if status != 200 and not (status == 400 and "already been loaded" in text):
                self._metrics.adapter_loads_by[adapter, engine.name, "failed"].inc()
                log.warning("loading adapter %s on %s failed: %s %s", adapter, engine.name, status, text[:200])
                raise GatewayError(502, f"The engine could not load the adapter '{adapter}'.", code=Code.UPSTREAM_ERROR)
            await self._redis.execute("HSET", on, adapter, int(time.time() * 1000), key=on)
            engine.adapters.add(adapter)
            self._metrics.adapter_loads_by[adapter, engine.name, "loaded"].inc()
            self._metrics.adapter_load_time.labels(adapter).observe(time.monotonic() - started)
        finally:
            await self._redis.run_script(_UNLOCK, [self._key("lock", engine.name)], [token])

    async def _unload(self, engine: Engine, adapter: str) -> None:
        status, text = await self._call(engine, "/v1/unload_lora_adapter", orjson.dumps({"lora_name": adapter}))
        engine.adapters.discard(adapter)
        if status not in (200, 404):  # 404: it was gone already (the engine restarted)
            log.warning("unloading adapter %s from %s: %s %s", adapter, engine.name, status, text[:200])
        self._metrics.adapter_unloads_by[adapter, engine.name].inc()

    async def _call(self, engine: Engine, path: str, body: bytes) -> tuple[int, str]:
        try:
            response = await self._upstream.post(engine.settings, path, body, False)
            text = (await response.read()).decode(errors="replace")
            response.release()
        except Exception as exc:
            raise GatewayError(502, f"The engine failed: {exc}.", code=Code.UPSTREAM_ERROR) from None
        return response.status, text

    async def _lock(self, engine: Engine, deadline: float) -> str:
        lock, token = self._key("lock", engine.name), uuid.uuid4().hex
        ttl = int(self._timeout * 1000) + 5000
        while not await self._redis.execute("SET", lock, token, "NX", "PX", ttl, key=lock):
            if time.monotonic() > deadline:
                raise GatewayError(
                    503, f"Engine '{engine.name}' is busy loading adapters.", code=Code.NO_HEALTHY_ENGINE
                )
            await asyncio.sleep(0.02)
        return token

    async def sweep(self) -> None:
        """Renews the marks of adapters in use here, drops the idle ones, records use for the
        LRU order, and refreshes which engine holds what."""
        now, wall = time.monotonic(), int(time.time() * 1000)
        for key in list(self._marked):
            name, adapter = key
            use, on = self._key("use", name), self._key("on", name)
            member = f"{adapter}\0{self._replica}"
            if self._inflight.get(key, 0) <= 0 and now - self._last.get(key, 0) > GRACE:
                self._marked.discard(key)
                await self._redis.execute("ZREM", use, member, key=use)
                continue
            await self._redis.execute("ZADD", use, wall + LEASE_MS, member, key=use)
            await self._redis.run_script(_TOUCH, [on], [adapter, wall - int((now - self._last[key]) * 1000)])
        for engine in self.pool.engines.values():
            if engine.settings.max_loras:
                on = self._key("on", engine.name)
                held = await self._redis.execute("HKEYS", on, key=on)
                engine.adapters = {bytes(a).decode() for a in held}

    def view(self, engine: Engine) -> list[dict[str, Any]]:
        return [{"name": a, "in_flight": self._inflight.get((engine.name, a), 0)} for a in sorted(engine.adapters)]

    async def run(self, refresh: Any) -> None:
        while True:
            try:
                await refresh()
                await self.sweep()
            except Exception as exc:  # Redis away: try again next sweep
                log.warning("adapter sweep failed: %s", exc)
            await asyncio.sleep(SWEEP)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
