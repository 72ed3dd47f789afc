"""Cached answers in Redis, shared by every replica, each one Lua step.

Keys (one hash tag, so every script touches one slot of a Redis Cluster):
  {P}:{cache}:gen    hash: model -> generation, and `*` for all models (invalidation)
  {P}:{cache}:idx    sorted set: entry key -> its expiry (ms); the soonest-to-expire goes first
  {P}:{cache}:size   hash: entry key -> bytes it counts (value + key name)
  {P}:{cache}:total  the bytes of all entries counted
  {P}:{cache}:e:{model gen}.{all gen}:{digest}   an entry, with a TTL (PX)

The memory bound is our own accounting, independent of Redis's maxmemory: before an entry is
written, expired entries are dropped from the count (up to 64 a step, and one more per entry
written), then the oldest entries are evicted until each new one fits. Redis may expire an entry before the sweep sees it: the
count then runs high for a while, so the bound errs on the safe side. An invalidation bumps a
generation: old entries are never read again and leave by TTL or eviction.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.resp.client import LeanClient, Script

_GEN = """local gen = (redis.call('HGET', KEYS[1], ARGV[1]) or '0') .. '.' .. (redis.call('HGET', KEYS[1], '*') or '0')
"""

_GET = Script(
    _GEN
    + """
local key = ARGV[2] .. gen .. ':' .. ARGV[3]
local value = redis.call('GET', key)
if not value then return nil end
return {gen, value, redis.call('PTTL', key)}
"""
)

_PUT = Script(
    """
local function drop(k)
  local s = tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('DEL', k)
  if s > 0 then redis.call('DECRBY', KEYS[4], s) end
end
local prefix, ttl, now, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local sweep = 64 + (#ARGV - 4) / 3
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, sweep)) do drop(k) end
local all = redis.call('HGET', KEYS[1], '*') or '0'
local stored = 0
for i = 5, #ARGV, 3 do
  local key = prefix .. (redis.call('HGET', KEYS[1], ARGV[i]) or '0') .. '.' .. all .. ':' .. ARGV[i + 1]
  local value = ARGV[i + 2]
  local size = #value + #key
  if size <= max then
    if redis.call('HEXISTS', KEYS[3], key) == 1 then drop(key) end
    local total = tonumber(redis.call('GET', KEYS[4]) or '0')
    while total + size > max do
      local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
      if #oldest == 0 then
        redis.call('SET', KEYS[4], 0)
        total = 0
      else
        drop(oldest[1])
        total = tonumber(redis.call('GET', KEYS[4]) or '0')
      end
    end
    redis.call('SET', key, value, 'PX', ttl)
    redis.call('ZADD', KEYS[2], now + ttl, key)
    redis.call('HSET', KEYS[3], key, size)
    redis.call('INCRBY', KEYS[4], size)
    stored = stored + 1
  end
end
return stored
"""
)


class CacheStore:
    def __init__(self, redis: LeanClient, prefix: str, ttl: float, max_memory: int) -> None:
        self._redis = redis
        redis.preload(_GET, _PUT)
        base = f"{prefix}:{{cache}}"
        self._gen, self._idx, self._size, self._total = (f"{base}:{n}" for n in ("gen", "idx", "size", "total"))
        self._entries = f"{base}:e:"
        self._ttl_ms = int(ttl * 1000)
        self._max = max_memory

    async def get(self, model: str, digest: str) -> tuple[str, bytes, int] | None:
        """The entry under the model's current generation: (that generation, the answer, the
        milliseconds it has left), or None."""
        reply = await self._redis.run_script(_GET, [self._gen], [model, self._entries, digest])
        if reply is None:
            return None
        gen, value, left = reply
        return bytes(gen).decode(), bytes(value), int(left)

    async def generations(self) -> dict[str, str]:
        """Model -> its generation, and `*` -> the one of every model (absent: 0)."""
        reply = await self._redis.execute("HGETALL", self._gen, key=self._gen)
        return {bytes(reply[i]).decode(): bytes(reply[i + 1]).decode() for i in range(0, len(reply), 2)}

    def send_puts(self, puts: list[tuple[str, str, bytes]], now_ms: int) -> asyncio.Future[Any]:
        """Stores (model, digest, answer) entries in one step, without waiting; the future's reply
        is how many fit, or the error. The scripts are loaded on every (re)connection, so NOSCRIPT
        cannot happen."""
        keys = [self._gen, self._idx, self._size, self._total]
        args: list[Any] = [self._entries, self._ttl_ms, now_ms, self._max]
        for put in puts:
            args.extend(put)
        return self._redis.send_script(_PUT, keys, args)

    async def new_entries(self, after: float, limit: int = 10_000) -> tuple[list[str], float]:
        """Digests of the entries stored since `after` (their expiry, in ms: entries share one
        TTL, so it grows with the time they were stored), and the newest such expiry."""
        reply = await self._redis.execute(
            "ZRANGEBYSCORE", self._idx, f"({after}", "+inf", "WITHSCORES", "LIMIT", 0, limit, key=self._idx
        )
        digests = [bytes(reply[i]).decode().rsplit(":", 1)[-1] for i in range(0, len(reply), 2)]
        newest = float(reply[-1]) if reply else after
        return digests, newest

    async def invalidate(self, model: str | None) -> int:
        """A new generation for the model (None: every model); returns it."""
        return int(await self._redis.execute("HINCRBY", self._gen, model or "*", 1, key=self._gen))

    async def stats(self) -> dict[str, Any]:
        total = await self._redis.execute("GET", self._total, key=self._total)
        entries = await self._redis.execute("ZCARD", self._idx, key=self._idx)
        return {"bytes": int(total or 0), "entries": int(entries or 0), "max_memory": self._max}
