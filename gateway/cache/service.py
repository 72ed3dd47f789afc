"""What the request path asks of the response cache: `consult` (cacheable? its key), `answer` (a
hit, in the shape the client asked for), `finish` (count it; keep a miss's answer).

A request is cacheable when the cache is on for its model (the model's `cache:`, else
`cache.enabled`) or the client sent `x-gateway-cache: use`, and it is deterministic: temperature 0
or an integer seed, `n` at most 1, no tools unless `cache.tools`. `x-gateway-cache: refresh` does
not read the cache but stores the new answer; `skip` leaves the cache alone. Redis trouble never
fails a request: a lookup that fails is a miss, a store that fails is dropped.

Each process keeps the digests of the entries it knows are stored (its own stores at once, every
replica's within `SYNC` seconds, read from the store's index), and asks Redis only for those: a
miss costs no round trip before the engine is asked. An entry stored elsewhere less than `SYNC`
ago may be missed once; a digest whose entry expired or was evicted costs one empty lookup.

The answers themselves are kept in the process too, up to `cache.local_memory` bytes
(gateway/cache/near.py): the ones it stored and the ones it read, so a repeated hit costs no Redis
round trip either, and the stores leave for Redis together every PUT_EVERY seconds. An admin
invalidation takes effect at once on the process that made it and within `SYNC` seconds on the
others, which read the generations with the index.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Message, Scope, Send

from gateway.access.base import Principal, Usage
from gateway.cache.near import Entry, NearCache
from gateway.cache.shapes import fold_stream
from gateway.cache.store import CacheStore
from gateway.core.errors import invalid
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import ApiRequest
from gateway.settings import CacheSettings, ModelSettings, RouteSettings

log = logging.getLogger(__name__)

SYNC = 1.0  # seconds between reads of the entries other replicas stored
PUT_EVERY = 0.005  # seconds the stores gather before they leave together (this process hits them meanwhile)
MAX_PUTS = 64  # stores that leave at once without waiting for PUT_EVERY
MAX_KNOWN = 1_000_000  # digests remembered; past it, forgotten and read again
HEADER = b"x-gateway-cache"
MODES = (b"use", b"refresh", b"skip")
_NOT_KEYED = ("stream", "stream_options")  # both shapes share one entry
SSE = b"text/event-stream; charset=utf-8"
JSON = b"application/json"


class Lookup:
    __slots__ = ("digest", "hit", "model", "refresh", "sent", "size")

    def __init__(self, model: str, digest: str, refresh: bool) -> None:
        self.model = model
        self.digest = digest
        self.refresh = refresh
        self.hit = False
        self.sent: list[bytes] = []  # what a miss sent the client, to store
        self.size = 0

    def record(self, send: Send, limit: int) -> Send:
        """`send`, keeping a copy of the body bytes up to `limit` (more: nothing is stored)."""

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.body" and self.size <= limit:
                chunk = message.get("body", b"")
                self.size += len(chunk)
                self.sent.append(chunk)
            await send(message)

        return recording


@dataclass(frozen=True, slots=True)
class Replay:
    content_type: bytes
    body: bytes
    usage: dict[str, Any] | None
    finish_reason: str | None
    charged: Usage


class ResponseCache:
    def __init__(
        self,
        settings: CacheSettings,
        models: Mapping[str, ModelSettings],
        routes: Callable[[str], tuple[RouteSettings, ...]],
        store: CacheStore,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self._on = {name: m.cache if m.cache is not None else settings.enabled for name, m in models.items()}
        self._shared = frozenset(settings.shared)
        self._routes = routes
        self._versions: dict[str, tuple[tuple[RouteSettings, ...], bytes]] = {}
        self.store = store
        self._metrics = metrics
        self._known: set[str] = set()
        self._near = NearCache(settings.local_memory)
        self._puts: list[tuple[str, str, bytes]] = []  # stores not sent yet
        self._gens: dict[str, str] | None = None  # the generations last read; None: not yet (keep nothing)
        self._seen = float("-inf")  # the newest index score read
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._sync())

    async def stop(self) -> None:
        self._send_puts()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sync(self) -> None:
        while True:
            try:
                self._follow(await self.store.generations())
                if len(self._known) > MAX_KNOWN:
                    self._known.clear()
                    self._seen = float("-inf")
                while True:
                    digests, self._seen = await self.store.new_entries(self._seen)
                    self._known.update(digests)
                    if len(digests) < 10_000:
                        break
            except Exception as exc:  # Redis away: try again next time
                log.warning("response cache sync failed: %s", exc)
            await asyncio.sleep(SYNC)

    def _follow(self, gens: dict[str, str]) -> None:
        """The generations as Redis has them now: a model whose generation moved (an invalidation
        on any replica) loses the entries this process keeps of it."""
        old, self._gens = self._gens, gens
        if old is None or old == gens:
            return
        if old.get("*") != gens.get("*"):
            self._near.drop_model(None)
            return
        for model in old.keys() | gens.keys():
            if old.get(model) != gens.get(model):
                self._near.drop_model(model)

    async def invalidate(self, model: str | None) -> int:
        """A new generation for the model (None: every model), in force here at once; returns it."""
        generation = await self.store.invalidate(model)
        self._near.drop_model(model)
        if self._gens is not None:
            self._gens = {**self._gens, model or "*": str(generation)}
        return generation

    @staticmethod
    def wanted(settings: CacheSettings, models: Mapping[str, ModelSettings]) -> bool:
        """Whether any model may use the cache: without, the request path never consults it."""
        return settings.enabled or any(m.cache for m in models.values())

    def consult(self, scope: Scope, request: ApiRequest, principal: Principal) -> Lookup | None:
        """The request's lookup, or None when the cache is not for it. A bad header is a 400."""
        mode = None
        for name, value in scope["headers"]:
            if name == HEADER:
                mode = value.strip().lower()
                if mode not in MODES:
                    raise invalid("'x-gateway-cache' must be use, refresh or skip.", param="x-gateway-cache")
        model = request.model
        if mode == b"skip" or (mode is None and not self._on.get(model, False)):
            return None
        if not self._deterministic(request):
            return None
        body = request.body
        if "stream" in body or "stream_options" in body:
            body = {k: v for k, v in body.items() if k not in _NOT_KEYED}
        who = "*" if model in self._shared else principal.key_id or "-"
        head = f"{request.endpoint.kind}\0{model}\0{who}\0".encode() + self._version(model)
        digest = hashlib.blake2b(head + orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=20).hexdigest()
        return Lookup(model, digest, mode == b"refresh")

    def _deterministic(self, request: ApiRequest) -> bool:
        if request.n > 1:
            return False
        if request.endpoint.kind == "embeddings":
            return True
        body = request.body
        temperature, seed = body.get("temperature"), body.get("seed")
        fixed = (isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0) or (
            isinstance(seed, int) and not isinstance(seed, bool)
        )
        if not fixed:
            return False
        return self.settings.tools or not ("tools" in body or "functions" in body)

    def _version(self, model: str) -> bytes:
        """The model's routes as they are now: a route change (admin API, config) is a new key."""
        routes = self._routes(model)
        known = self._versions.get(model)
        if known is None or known[0] is not routes:
            text = repr([(r.name, r.model, r.engines) for r in routes]).encode()
            known = self._versions[model] = (routes, hashlib.blake2b(text, digest_size=8).digest())
        return known[1]

    async def answer(self, lookup: Lookup, request: ApiRequest) -> Replay | None:
        if lookup.refresh:
            return None
        now = time.monotonic()
        entry = self._near.get(lookup.digest, now)
        if entry is None:
            entry = await self._fetch(lookup, now)
            if entry is None:
                return None
        if not entry.parsed:
            try:
                entry.parse()
            except orjson.JSONDecodeError:  # not an answer we stored: the engine answers
                return None
            prompt, completion = _tokens(entry.usage)
            entry.tokens, entry.charged = prompt + completion, self.charged(prompt, completion)
        if request.stream:
            body = entry.stream(request.endpoint.kind == "chat", request.usage_wanted)
            if body is None:
                return None
            ctype = SSE
        else:
            body, ctype = entry.body, JSON
        lookup.hit = True
        self._metrics.cache_tokens_by[lookup.model].inc(entry.tokens)
        assert entry.charged is not None
        return Replay(ctype, body, entry.usage, entry.finish, entry.charged)

    async def _fetch(self, lookup: Lookup, now: float) -> Entry | None:
        """The entry from Redis, kept here when it is of the model's generation as this process
        knows it (one read before the last invalidation is served once, not kept)."""
        if lookup.digest not in self._known:
            return None
        try:
            stored = await self.store.get(lookup.model, lookup.digest)
        except Exception as exc:  # Redis down or slow: the engine answers
            log.warning("response cache lookup failed: %s", exc)
            return None
        if stored is None:
            return None
        gen, body, left_ms = stored
        expires = now + left_ms / 1000
        if self._gens is not None and gen == _tag(self._gens, lookup.model):
            self._near.put(lookup.digest, lookup.model, body, expires)
            kept = self._near.get(lookup.digest, now)  # None when it does not fit
            if kept is not None:
                return kept
        return Entry(lookup.model, body, expires)

    def charged(self, prompt: int, completion: int) -> Usage:
        """What a hit counts: `cache.charge` of the answer's tokens (none by default), the whole
        prompt as cached, so spend prices it at the model's `cached_input`."""
        charge = self.settings.charge
        counted = round(prompt * charge)
        return Usage(counted, round(completion * charge), True, counted)

    def finish(
        self, lookup: Lookup, request: ApiRequest, status: int, done: bool, usage: dict[str, Any] | None
    ) -> None:
        """At the end of the exchange: the metrics; a miss answered in full is stored."""
        self._metrics.cache_by[lookup.model, "hit" if lookup.hit else "miss"].inc()
        if lookup.hit or status != 200 or not done or request.model != lookup.model:
            return  # a fallback's answer is not this model's
        limit = self.settings.max_entry_bytes
        if lookup.size > limit or not lookup.sent:
            return
        sent = b"".join(lookup.sent)
        value = fold_stream(sent, request.endpoint.kind == "chat", usage) if request.stream else sent
        if value is None or len(value) > limit:
            return
        self._known.add(lookup.digest)
        if self._gens is not None:
            self._near.put(lookup.digest, lookup.model, value, time.monotonic() + self.settings.ttl)
        if not self._puts:
            asyncio.get_running_loop().call_later(PUT_EVERY, self._send_puts)
        self._puts.append((lookup.model, lookup.digest, value))
        if len(self._puts) >= MAX_PUTS:
            self._send_puts()

    def _send_puts(self) -> None:
        """The stores gathered so far, in one script call, without waiting (no task): the reply
        only says how many fit."""
        if self._puts:
            puts, self._puts = self._puts, []
            self.store.send_puts(puts, int(time.time() * 1000)).add_done_callback(_stored)


def _stored(future: asyncio.Future[Any]) -> None:
    exc = None if future.cancelled() else future.exception()
    reply = None if exc is not None or future.cancelled() else future.result()
    if exc is not None or isinstance(reply, Exception):  # NOSCRIPT after a Redis restart included
        log.warning("response cache store failed: %s", exc or reply)


def _tag(gens: dict[str, str], model: str) -> str:
    """The model's generation as the store's scripts spell it (gateway/cache/store.py)."""
    return f"{gens.get(model, '0')}.{gens.get('*', '0')}"


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (p if isinstance(p, int) else 0), (c if isinstance(c, int) else 0)
