"""API keys in Redis: the record, and secret -> key resolution (admin payload checks: key_fields.py).

Layout (`gw` is the prefix; the braces are a Redis Cluster hash tag, so one key's record and its
quota counters share a slot and one Lua script may touch them all):

    gw:{key_<16 hex>}:rec     HASH of the record; numbers as strings, "" for null, JSON for lists
    gw:keyhash:<sha256 hex>   STRING -> key id (the secret itself is never stored)
    gw:keys                   SET of every key id, revoked ones included

A key of a team also has a mirror of its record under its team's hash tag, which admission reads
instead (gateway/access/levels.py), and is listed in its team's member set. The record stays the
truth: every change writes it first, then the mirror.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from gateway.access.base import PRIORITIES
from gateway.access.key_fields import BUDGETS, FIELDS, LIMITS, NANOS
from gateway.access.levels import levels_of, team_level
from gateway.core.errors import quota_unavailable
from gateway.core.times import iso
from gateway.resp.lag import within

SECRET_PREFIX = "sk-gw-"
_ID = re.compile(r"key_[0-9a-f]{16}")
# What "Redis is out of reach" looks like, on one Redis or a cluster (no seed reachable at start
# raises RedisClusterException, which is not a RedisError; a slot without a master, ClusterDownError).
REDIS_DOWN = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
    OSError,
)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    expires_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    revoked_at: float | None = None
    prefix: str = ""
    priority: str = "normal"  # the scheduler's band: high, normal, low
    weight: float = 1.0  # the share within the band
    daily_budget: int | None = None  # nano-units of the pricing currency
    monthly_budget: int | None = None
    team: str | None = None
    org: str | None = None  # the team's organization (fixed when the team is made)
    kind: str = "key"  # "team": a client JWT limited as its team alone (gateway/access/jwt_clients.py)

    @property
    def token_limited(self) -> bool:
        """Whether admission must bound what a request may spend: a token or money limit, here or
        (for a key of a team) possibly at the team or its organization."""
        return (
            self.tpm is not None
            or self.daily_tokens is not None
            or self.monthly_tokens is not None
            or self.daily_budget is not None
            or self.monthly_budget is not None
            or self.team is not None
        )

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "prefix": self.prefix,
            "models": list(self.models) if self.models is not None else None,
            **{name: getattr(self, name) for name in LIMITS},
            **{name: money(getattr(self, name)) for name in BUDGETS},
            "team": self.team,
            "org": self.org,
            "expires_at": iso(self.expires_at),
            "expires_at_unix": self.expires_at,
            "metadata": dict(self.metadata),
            "priority": self.priority,
            "weight": self.weight,
            "created_at": iso(self.created_at),
            "created_at_unix": self.created_at,
            "revoked": self.revoked_at is not None,
            "revoked_at": iso(self.revoked_at),
            "revoked_at_unix": self.revoked_at,
        }


# ---- the Redis record ---------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _json(value: str | None, default: Any) -> Any:
    # A record damaged by hand (or by an older release) must not take the whole key list down.
    try:
        return orjson.loads(value) if value else default
    except orjson.JSONDecodeError:
        return default


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Validated fields -> HASH values: "" for null, JSON for models and metadata."""
    out: dict[str, str] = {}
    for name, value in fields.items():
        if value is None:
            out[name] = ""
        elif name == "models":
            out[name] = orjson.dumps(list(value)).decode()
        elif name == "metadata":
            out[name] = orjson.dumps(value).decode()
        elif name == "expires_at":
            out[name] = repr(float(value))
        else:
            out[name] = str(value)
    return out


def texts(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def decode_record(raw: Mapping[Any, Any]) -> ApiKey | None:
    if not raw:
        return None
    h = texts(raw)
    if "id" not in h:
        return None
    models = _json(h.get("models"), None)
    metadata = _json(h.get("metadata"), {})
    priority = h.get("priority") or "normal"
    weight = _num(h.get("weight"))
    return ApiKey(
        id=h["id"],
        name=h.get("name", ""),
        models=tuple(str(m) for m in models) if isinstance(models, list) else None,
        rpm=_int(h.get("rpm")),
        tpm=_int(h.get("tpm")),
        max_concurrent=_int(h.get("max_concurrent")),
        daily_tokens=_int(h.get("daily_tokens")),
        monthly_tokens=_int(h.get("monthly_tokens")),
        expires_at=_num(h.get("expires_at")),
        metadata=metadata if isinstance(metadata, dict) else {},
        created_at=_num(h.get("created_at")) or 0.0,
        revoked_at=_num(h.get("revoked_at")),
        prefix=h.get("prefix", ""),
        priority=priority if priority in PRIORITIES else "normal",
        weight=weight if weight is not None and 0 < weight < math.inf else 1.0,
        daily_budget=_int(h.get("daily_budget")),
        monthly_budget=_int(h.get("monthly_budget")),
        team=h.get("team") or None,
        org=h.get("org") or None,
    )


def money(nanos: int | None) -> float | None:
    return None if nanos is None else nanos / NANOS


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def record_key(prefix: str, key_id: str) -> str:
    return f"{prefix}:{{{key_id}}}:rec"


# Both return the record after the write, so an admin change costs one round trip.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return redis.call('HGETALL', KEYS[1])
"""
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if (redis.call('HGET', KEYS[1], 'revoked_at') or '') == '' then
  redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""


@asynccontextmanager
async def redis_or_503(seconds: float | None = None) -> AsyncIterator[None]:
    """Admin operations: Redis out of reach is a 503 `quota_unavailable`, never a 500; and one
    that has not answered within `seconds` (redis.timeout) is out of reach. Without the bound,
    redis-py's retries made an admin call on a stalled Redis take 8 to 10 seconds."""
    try:
        async with within(seconds):
            yield
    except (*REDIS_DOWN, TimeoutError):
        raise quota_unavailable() from None


@dataclass
class _Known:
    key_id: str
    key: ApiKey
    fetched: float  # monotonic


class KeyStore:
    """Keys in Redis, with an in-process cache of secret hash -> key.

    The hash -> id mapping never changes, so it is cached for good (LRU-bounded). The record
    snapshot returned by `resolve` is at most `record_ttl` seconds old: it serves the paths that
    do not admit (GET /v1/models) and the fail-open limiter. Admission itself reads the record
    fresh inside its Lua script (gateway/access/quota.py), so a revoke or PATCH applies at once to
    every replica. A known key therefore costs no Redis round trip here, and concurrent first
    requests with the same unknown key share one lookup.
    """

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        prefix: str = "gw",
        *,
        cache_size: int = 10_000,
        record_ttl: float = 2.0,
        timeout: float = 0.5,
        admin_timeout: float | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.cache_size = cache_size
        self.record_ttl = record_ttl
        self.timeout = timeout  # a key lookup on the request path
        self.admin_timeout = admin_timeout or timeout  # a whole admin operation
        self._index = f"{prefix}:keys"
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._loading: dict[str, asyncio.Future[ApiKey | None]] = {}
        self._update = redis.register_script(_UPDATE)
        self._revoke = redis.register_script(_REVOKE)

    def _rec(self, key_id: str) -> str:
        return record_key(self.prefix, key_id)

    async def create(self, fields: Mapping[str, Any], org: str | None = None) -> tuple[ApiKey, str]:
        """`fields` from validate_key_fields(partial=False); `org`: the organization of the key's
        team, when it has one (the caller checked the team exists). Returns the record and the secret."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + secrets.token_hex(8)
        digest = secret_hash(secret)
        record: dict[Any, str] = {
            **encode_fields({name: None for name in FIELDS if name != "name"}),
            **encode_fields(fields),
            "id": key_id,
            "hash": digest,
            "prefix": secret[:10],
            "created_at": repr(time.time()),
            "revoked_at": "",
            "org": org or "" if fields.get("team") else "",
        }
        key = decode_record(record)
        assert key is not None
        # No MULTI: the keys live in different cluster slots. The mapping goes last, so it never
        # points at a missing record (or a missing mirror).
        async with redis_or_503(self.admin_timeout), self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self._rec(key_id), mapping=record)
            pipe.sadd(self._index, key_id)
            if key.team:
                self._place(pipe, key, record)
            pipe.set(f"{self.prefix}:keyhash:{digest}", key_id)
            await pipe.execute()
        return key, secret

    def _place(self, pipe: Any, key: ApiKey, record: Mapping[Any, Any]) -> None:
        """Write the mirror of a team's key and list it in the team."""
        assert key.team is not None
        mirror = {k: v for k, v in record.items() if _text(k) != "hash"}
        pipe.hset(levels_of(self.prefix, key.id, key.team, key.org)[0].limits, mapping=mirror)
        pipe.sadd(self.members(key.team, key.org), key.id)

    def members(self, team: str, org: str | None) -> str:
        """The SET of a team's key ids (revoked ones included, until they leave the team)."""
        return team_level(self.prefix, team, org).base + "keys"

    async def record_for(self, key_id: str) -> ApiKey | None:
        if not _ID.fullmatch(key_id):
            return None
        async with redis_or_503(self.admin_timeout):
            return decode_record(await self.redis.hgetall(self._rec(key_id)))

    async def list(self) -> list[ApiKey]:
        async with redis_or_503(self.admin_timeout):
            ids = sorted(_text(i) for i in await self.redis.smembers(self._index))
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(self._rec(key_id))
                raws = await pipe.execute()
        keys = [k for k in map(decode_record, raws) if k is not None]
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def update(self, key_id: str, fields: Mapping[str, Any], org: str | None = None) -> ApiKey | None:
        """`fields` from validate_key_fields(partial=True); a None value clears that field. With
        `team` in `fields`, `org` is that team's organization (the caller checked the team)."""
        if not _ID.fullmatch(key_id):
            return None
        fields = dict(fields)
        if "team" in fields:
            fields["org"] = org if fields["team"] else None
        args = [part for pair in encode_fields(fields).items() for part in pair]
        async with redis_or_503(self.admin_timeout):
            before = await self.record_for(key_id) if "team" in fields else None
            raw = _pairs(await self._update(keys=[self._rec(key_id)], args=args))
            key = decode_record(raw)
            if key is not None:
                await self._follow(before, key, raw)
        self._forget(key_id)
        return key

    async def _follow(self, before: ApiKey | None, key: ApiKey, raw: Mapping[Any, Any]) -> None:
        """After a change of the record: the mirror follows (and moves when the team changed)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if before is not None and before.team and before.team != key.team:
                pipe.delete(levels_of(self.prefix, key.id, before.team, before.org)[0].limits)
                pipe.srem(self.members(before.team, before.org), key.id)
            if key.team:
                self._place(pipe, key, raw)
            await pipe.execute()

    async def revoke(self, key_id: str) -> ApiKey | None:
        if not _ID.fullmatch(key_id):
            return None
        async with redis_or_503(self.admin_timeout):
            raw = _pairs(await self._revoke(keys=[self._rec(key_id)], args=[repr(time.time())]))
            key = decode_record(raw)
            if key is not None and key.team:
                await self._follow(None, key, raw)
        self._forget(key_id)
        return key

    async def resolve(self, secret: str) -> ApiKey | None:
        """The request path: secret -> record, revoked or expired ones included (see usable())."""
        if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
            return None  # cannot be one of ours: no round trip
        digest = secret_hash(secret)
        known = self._known.get(digest)
        if known is not None:
            self._known.move_to_end(digest)
            if time.monotonic() - known.fetched < self.record_ttl:
                return known.key
        loading = self._loading.get(digest)
        if loading is None:
            loading = self._loading[digest] = asyncio.ensure_future(self._load(digest, known))
            loading.add_done_callback(lambda done: self._loaded(digest, done))
        try:
            # shield: one caller giving up must not cancel the lookup the others wait on
            async with within(self.timeout):  # Redis's time, not the loop's own lag
                return await asyncio.shield(loading)
        except (*REDIS_DOWN, TimeoutError):
            if known is not None:
                return known.key  # a stale snapshot lets fail-open mode serve known keys
            raise quota_unavailable() from None

    async def _load(self, digest: str, known: _Known | None) -> ApiKey | None:
        if known is None:
            raw_id = await self.redis.get(f"{self.prefix}:keyhash:{digest}")
            if raw_id is None:
                return None  # unknown keys are not cached: a key made on another replica works at once
            key_id = _text(raw_id)
        else:
            key_id = known.key_id
        raw = texts(await self.redis.hgetall(self._rec(key_id)))
        key = decode_record(raw)
        if key is None or not hmac.compare_digest(raw.get("hash", ""), digest):
            self._known.pop(digest, None)
            return None
        self._known[digest] = _Known(key_id, key, time.monotonic())
        self._known.move_to_end(digest)
        while len(self._known) > self.cache_size:
            self._known.popitem(last=False)
        return key

    def _loaded(self, digest: str, done: asyncio.Future[ApiKey | None]) -> None:
        self._loading.pop(digest, None)
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have given up already

    def _forget(self, key_id: str) -> None:
        """Drop this replica's snapshot at once; other replicas catch up within record_ttl."""
        for known in self._known.values():
            if known.key_id == key_id:
                known.fetched = -math.inf


def _pairs(reply: Any) -> dict[Any, Any]:
    """A Lua-returned HGETALL (a flat list) -> dict."""
    if not reply:
        return {}
    return dict(zip(reply[::2], reply[1::2], strict=True))
