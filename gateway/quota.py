"""Quota admission and reconciliation: each one atomic Redis step (a Lua script, EVALSHA).

Per key, next to its record (gateway/keys.py) and under the same hash tag, so a script's keys
share one Redis Cluster slot:

    gw:{id}:min:<unix minute>   HASH requests, tokens                                (TTL 2 min)
    gw:{id}:day:<YYYY-MM-DD>    HASH requests, tokens, prompt_tokens, completion_tokens  (40 days)
    gw:{id}:month:<YYYY-MM>     HASH the same                                         (400 days)
    gw:{id}:leases              ZSET lease id -> expiry (unix ms), one per admitted request

`tokens` is committed usage plus outstanding reservations, so limits hold across any number of
replicas. A lease counts toward max_concurrent until it expires; an expired lease is kept for
LEASE_KEEP more, so a late release still reconciles, and ZREM's answer makes release idempotent.
Times are the gateway's clock (unix seconds): replicas are assumed NTP-synced.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any

import redis.asyncio as aioredis

from gateway.errors import GatewayError
from gateway.keys import REDIS_DOWN, ApiKey, iso
from gateway.resp import RespClient, Script

log = logging.getLogger(__name__)

MINUTE_TTL = 120
DAY_TTL = 40 * 86400
MONTH_TTL = 400 * 86400
LEASE_KEEP_MS = 3_600_000
WARN_EVERY = 10.0
TOKEN_LIMITS = ("tpm_exceeded", "daily_tokens_exceeded", "monthly_tokens_exceeded")

_ADMIT = """
local rec = redis.call('HMGET', KEYS[1], 'created_at', 'revoked_at', 'expires_at', 'models',
  'rpm', 'tpm', 'max_concurrent', 'daily_tokens', 'monthly_tokens')
if not rec[1] then return {'unknown'} end
-- a missing field (false) and "" both mean null
for i = 2, 9 do if rec[i] == '' then rec[i] = false end end
local now = tonumber(ARGV[1])
if rec[2] then return {'revoked'} end
if rec[3] and tonumber(rec[3]) * 1000 <= now then return {'expired', rec[3]} end
if rec[4] then
  local allowed = false
  for _, m in ipairs(cjson.decode(rec[4])) do
    if m == ARGV[2] then allowed = true break end
  end
  if not allowed then return {'model'} end
end
local function limit(v) if v then return tonumber(v) end return -1 end
local rpm, tpm, conc = limit(rec[5]), limit(rec[6]), limit(rec[7])
local daily, monthly = limit(rec[8]), limit(rec[9])
local reserve, lease, leases = tonumber(ARGV[3]), ARGV[4], KEYS[5]
local win = redis.call('HMGET', KEYS[2], 'requests', 'tokens')
local mreq, mtok = tonumber(win[1] or 0), tonumber(win[2] or 0)
-- a client-side retry of an admission that did run must not reserve twice
if redis.call('ZSCORE', leases, lease) then return {'ok', rpm, mreq, tpm, mtok} end
local function refuse(code, used, lim) return {code, rpm, mreq, tpm, mtok, used, lim} end
-- the longest-lasting refusal first, so its retry-after is honest
if monthly >= 0 then
  local used = tonumber(redis.call('HGET', KEYS[4], 'tokens') or 0)
  if used + reserve > monthly then return refuse('monthly_tokens_exceeded', used, monthly) end
end
if daily >= 0 then
  local used = tonumber(redis.call('HGET', KEYS[3], 'tokens') or 0)
  if used + reserve > daily then return refuse('daily_tokens_exceeded', used, daily) end
end
if rpm >= 0 and mreq + 1 > rpm then return refuse('rpm_exceeded', mreq, rpm) end
if tpm >= 0 and mtok + reserve > tpm then return refuse('tpm_exceeded', mtok, tpm) end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now - tonumber(ARGV[6]))
if conc >= 0 then
  local live = redis.call('ZCOUNT', leases, '(' .. ARGV[1], '+inf')
  if live >= conc then return refuse('concurrency_exceeded', live, conc) end
end
for i = 2, 4 do
  redis.call('HINCRBY', KEYS[i], 'requests', 1)
  redis.call('HINCRBY', KEYS[i], 'tokens', reserve)
  redis.call('EXPIRE', KEYS[i], ARGV[5 + i])
end
redis.call('ZADD', leases, now + tonumber(ARGV[5]), lease)
redis.call('PEXPIRE', leases, tonumber(ARGV[5]) + tonumber(ARGV[6]))
return {'ok', rpm, mreq + 1, tpm, mtok + reserve}
"""

_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local delta = tonumber(ARGV[2])
if delta ~= 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'tokens', delta)
end
-- never recreate an expired day/month hash: it would live without a TTL
for i = 3, 4 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HINCRBY', KEYS[i], 'tokens', delta)
    redis.call('HINCRBY', KEYS[i], 'prompt_tokens', ARGV[3])
    redis.call('HINCRBY', KEYS[i], 'completion_tokens', ARGV[4])
  end
end
return 1
"""


def reset_after(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: "12ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}" if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Admission:
    key_id: str
    lease_id: str
    reserved: int
    minute: int
    day: str
    month: str
    headers: dict[str, str] = field(default_factory=dict)
    local: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """The buckets `now` falls in, and the seconds until each resets."""

    minute: int
    day: str
    month: str
    minute_left: float
    day_left: float
    month_left: float


def window(now: float) -> Window:
    minute = int(now // 60)
    day, month, day_end, month_end = _calendar(int(now // 86400))
    return Window(minute, day, month, (minute + 1) * 60 - now, day_end - now, month_end - now)


@lru_cache(maxsize=8)
def _calendar(day_index: int) -> tuple[str, str, float, float]:
    d = date(1970, 1, 1) + timedelta(days=day_index)
    first_next = date(d.year + d.month // 12, d.month % 12 + 1, 1)
    month_end = datetime(first_next.year, first_next.month, 1, tzinfo=UTC).timestamp()
    return d.isoformat(), d.isoformat()[:7], (day_index + 1) * 86400.0, month_end


def rate_headers(rpm: int | None, requests: int, tpm: int | None, tokens: int, left: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    reset = reset_after(left)
    if rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - requests))
        headers["x-ratelimit-reset-requests"] = reset
    if tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - tokens))
        headers["x-ratelimit-reset-tokens"] = reset
    return headers


def refusal(code: str, used: int, limit: int, reserve: int, win: Window, headers: dict[str, str]) -> GatewayError:
    """One 429 per limit; retry-after is when that limit next has room (at least 1 s)."""
    if code == "monthly_tokens_exceeded":
        msg, wait = f"Monthly token quota exhausted: {used} of {limit} used", win.month_left
    elif code == "daily_tokens_exceeded":
        msg, wait = f"Daily token quota exhausted: {used} of {limit} used", win.day_left
    elif code == "rpm_exceeded":
        msg, wait = f"Rate limit reached: {limit} requests per minute", win.minute_left
    elif code == "tpm_exceeded":
        msg, wait = f"Rate limit reached: {limit} tokens per minute, {used} used", win.minute_left
    else:
        msg, wait = f"Too many concurrent requests: the limit is {limit}", 1.0
    if code in TOKEN_LIMITS:
        msg += f", this request reserves {reserve} (prompt + max_tokens)"
        if reserve > limit:
            msg += "; it can never fit, lower max_tokens"
    retry = max(1, math.ceil(wait))
    kind = "insufficient_quota" if code.endswith("_tokens_exceeded") else "rate_limit_exceeded"
    return GatewayError(
        429, f"{msg}. Retry after {retry}s.", code=code, type=kind, headers={"retry-after": str(retry), **headers}
    )


def refused_key(reason: str, model: str, expires_at: float | None = None) -> GatewayError:
    if reason == "model":
        return GatewayError(403, f"This API key may not use model '{model}'.", code="model_not_allowed")
    if reason == "revoked":
        return GatewayError(401, "This API key has been revoked.", code="invalid_api_key")
    if reason == "expired":
        return GatewayError(401, f"This API key expired at {iso(expires_at)}.", code="invalid_api_key")
    return GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")


class LocalLimiter:
    """The per-process stand-in while Redis is unreachable (fail-open mode): rpm and tpm per
    fixed minute and concurrency, from the limits on the caller's ApiKey snapshot. Daily and
    monthly quotas cannot be held per process and are not enforced here."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._windows: dict[str, list[int]] = {}  # key id -> [minute, requests, tokens]
        self._inflight: dict[str, int] = {}
        self._leases: set[str] = set()  # in-flight lease ids: a repeated release is a no-op

    def admit(self, key: ApiKey, model: str, reserve: int, now: float, win: Window, lease_id: str) -> dict[str, str]:
        if not key.usable(now):
            raise refused_key("revoked" if key.revoked_at is not None else "expired", model, key.expires_at)
        if not key.may_use(model):
            raise refused_key("model", model)
        counts = self._window(key.id, win.minute)
        requests, tokens = counts[1], counts[2]
        headers = rate_headers(key.rpm, requests, key.tpm, tokens, win.minute_left)
        if key.rpm is not None and requests + 1 > key.rpm:
            raise refusal("rpm_exceeded", requests, key.rpm, reserve, win, headers)
        if key.tpm is not None and tokens + reserve > key.tpm:
            raise refusal("tpm_exceeded", tokens, key.tpm, reserve, win, headers)
        inflight = self._inflight.get(key.id, 0)
        if key.max_concurrent is not None and inflight >= key.max_concurrent:
            raise refusal("concurrency_exceeded", inflight, key.max_concurrent, reserve, win, headers)
        counts[1] += 1
        counts[2] += reserve
        self._inflight[key.id] = inflight + 1
        self._leases.add(lease_id)
        return rate_headers(key.rpm, counts[1], key.tpm, counts[2], win.minute_left)

    def release(self, adm: Admission, used: int) -> None:
        if adm.lease_id not in self._leases:
            return
        self._leases.discard(adm.lease_id)
        left = self._inflight.get(adm.key_id, 0) - 1
        if left > 0:
            self._inflight[adm.key_id] = left
        else:
            self._inflight.pop(adm.key_id, None)
        counts = self._windows.get(adm.key_id)
        if counts is not None and counts[0] == adm.minute:
            counts[2] += used - adm.reserved

    def _window(self, key_id: str, minute: int) -> list[int]:
        counts = self._windows.get(key_id)
        if counts is None or counts[0] != minute:
            if len(self._windows) >= self.max_keys:
                self._windows = {k: c for k, c in self._windows.items() if c[0] == minute}
            counts = self._windows[key_id] = [minute, 0, 0]
        return counts


class Quota:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str = "gw",
        *,
        lease_ttl: float = 300.0,
        failure_mode: str = "closed",
        redis_timeout: float = 0.25,
        breaker: float = 1.0,
        fast: RespClient | None = None,
    ) -> None:
        if failure_mode not in ("closed", "open"):
            raise ValueError(f"failure_mode must be 'closed' or 'open', not {failure_mode!r}")
        self.redis = redis
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.failure_mode = failure_mode
        # the socket timeouts bound each command; this bounds a whole call, redis-py's retries included
        self.deadline = 2 * redis_timeout
        self.breaker = breaker  # after a Redis failure, skip Redis this long (seconds)
        self.local = LocalLimiter()
        self.redis_errors = 0
        self.fail_open_admissions = 0
        self._lease_ms = max(1, round(lease_ttl * 1000))
        self._skip_until = 0.0
        self._warned = -math.inf
        # The two per-request scripts go through the lean client when there is one (see resp.py).
        self._fast = fast
        self._admit_script, self._release_script = Script(_ADMIT), Script(_RELEASE)
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)

    def _base(self, key_id: str) -> str:
        return f"{self.prefix}:{{{key_id}}}:"

    async def admit(self, key: ApiKey, model: str, reserve_tokens: int, now: float | None = None) -> Admission:
        if reserve_tokens < 0:
            raise ValueError("reserve_tokens must be >= 0")
        now = time.time() if now is None else now
        win = window(now)
        lease_id = secrets.token_hex(8)
        if time.monotonic() >= self._skip_until:
            base = self._base(key.id)
            keys = [base + "rec", f"{base}min:{win.minute}", base + "day:" + win.day, base + "month:" + win.month]
            keys.append(base + "leases")
            args: list[str | int] = [round(now * 1000), model, reserve_tokens, lease_id, self._lease_ms]
            args += [LEASE_KEEP_MS, MINUTE_TTL, DAY_TTL, MONTH_TTL]
            try:
                async with asyncio.timeout(self.deadline):
                    if self._fast is not None:
                        reply = await self._fast.run_script(self._admit_script, keys, args)
                    else:
                        reply = await self._admit(keys=keys, args=args)
            except REDIS_DOWN as exc:
                self._failed("admit", exc)
            else:
                return self._decide(reply, key.id, model, reserve_tokens, lease_id, win)
        return self._admit_without_redis(key, model, reserve_tokens, now, win, lease_id)

    def _decide(self, reply: list[Any], key_id: str, model: str, reserve: int, lease_id: str, win: Window) -> Admission:
        status = _text(reply[0])
        if len(reply) < 5:
            raise refused_key(status, model, float(_text(reply[1])) if len(reply) > 1 else None)
        rpm, tpm = (None if v < 0 else int(v) for v in (reply[1], reply[3]))
        headers = rate_headers(rpm, int(reply[2]), tpm, int(reply[4]), win.minute_left)
        if status != "ok":
            raise refusal(status, int(reply[5]), int(reply[6]), reserve, win, headers)
        return Admission(key_id, lease_id, reserve, win.minute, win.day, win.month, headers)

    def _admit_without_redis(
        self, key: ApiKey, model: str, reserve: int, now: float, win: Window, lease_id: str
    ) -> Admission:
        if self.failure_mode == "closed":
            raise GatewayError(
                503,
                "Quota store unavailable, retry shortly.",
                code="quota_unavailable",
                headers={"retry-after": "1"},
            )
        headers = self.local.admit(key, model, reserve, now, win, lease_id)
        self.fail_open_admissions += 1
        return Admission(key.id, lease_id, reserve, win.minute, win.day, win.month, headers, local=True)

    async def release(self, adm: Admission, prompt_tokens: int, completion_tokens: int) -> None:
        """Replace the reservation by the actual usage. Idempotent: a repeat changes nothing."""
        if adm.local:
            self.local.release(adm, prompt_tokens + completion_tokens)
            return
        base = self._base(adm.key_id)
        keys = [base + "leases", f"{base}min:{adm.minute}", base + "day:" + adm.day, base + "month:" + adm.month]
        delta = prompt_tokens + completion_tokens - adm.reserved
        try:
            async with asyncio.timeout(self.deadline):
                args: list[str | int] = [adm.lease_id, delta, prompt_tokens, completion_tokens]
                if self._fast is not None:
                    await self._fast.run_script(self._release_script, keys, args)
                else:
                    await self._release(keys=keys, args=args)
        except REDIS_DOWN as exc:
            # The lease expires by itself; the reservation stays counted (errs on the safe side).
            self._failed("release", exc)

    async def refresh_leases(self, adms: Iterable[Admission]) -> None:
        """Push back the expiry of in-flight leases (call every lease_ttl / 3 for long streams)."""
        expiry = round(time.time() * 1000) + self._lease_ms
        remote = [adm for adm in adms if not adm.local]
        if not remote:
            return
        try:
            async with asyncio.timeout(self.deadline):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for adm in remote:
                        leases = self._base(adm.key_id) + "leases"
                        pipe.zadd(leases, {adm.lease_id: expiry}, xx=True)  # XX: never revive a released one
                        pipe.pexpire(leases, self._lease_ms + LEASE_KEEP_MS)
                    await pipe.execute()
        except REDIS_DOWN as exc:
            self._failed("refresh_leases", exc)

    async def usage(self, key_id: str, now: float | None = None) -> dict[str, Any]:
        win = window(time.time() if now is None else now)
        base = self._base(key_id)
        fields = ("requests", "tokens", "prompt_tokens", "completion_tokens")
        try:
            async with asyncio.timeout(self.deadline):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hmget(base + "day:" + win.day, fields)
                    pipe.hmget(base + "month:" + win.month, fields)
                    pipe.hmget(f"{base}min:{win.minute}", ("requests", "tokens"))
                    day, month, minute = await pipe.execute()
        except REDIS_DOWN as exc:
            self._failed("usage", exc)
            raise GatewayError(503, "Quota store unavailable, retry shortly.", code="quota_unavailable") from None
        return {
            "id": key_id,
            "day": {"date": win.day, **_counts(fields, day)},
            "month": {"month": win.month, **_counts(fields, month)},
            "minute": _counts(("requests", "tokens"), minute),
        }

    async def history(self, key_id: str, days: int, now: float | None = None) -> list[dict[str, Any]]:
        """Usage of the last `days` UTC days (today included), oldest first, from the day hashes.
        A day with no hash (no use, or older than DAY_TTL) counts zero."""
        today = date.fromisoformat(window(time.time() if now is None else now).day)
        dates = [(today - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]
        base = self._base(key_id)
        fields = ("requests", "prompt_tokens", "completion_tokens", "tokens")
        try:
            async with asyncio.timeout(self.deadline):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for day in dates:
                        pipe.hmget(base + "day:" + day, fields)
                    rows = await pipe.execute()
        except REDIS_DOWN as exc:
            self._failed("history", exc)
            raise GatewayError(503, "Quota store unavailable, retry shortly.", code="quota_unavailable") from None
        return [{"date": day, **_counts(fields, row)} for day, row in zip(dates, rows, strict=True)]

    def _failed(self, op: str, exc: BaseException) -> None:
        self.redis_errors += 1
        now = time.monotonic()
        self._skip_until = now + self.breaker
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            if self.failure_mode == "open":
                log.warning("Redis unreachable: fail-open, per-process limits (%s: %r)", op, exc)
            else:
                log.warning("Redis unreachable: fail-closed, refusing requests (%s: %r)", op, exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counts(names: Iterable[str], values: list[Any]) -> dict[str, int]:
    return {name: int(v) if v is not None else 0 for name, v in zip(names, values, strict=True)}
