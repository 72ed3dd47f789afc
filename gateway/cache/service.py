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
from gateway.cache.shapes import fold_stream, unfold
from gateway.cache.store import CacheStore
from gateway.core.errors import invalid
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import ApiRequest
from gateway.settings import CacheSettings, ModelSettings, RouteSettings

log = logging.getLogger(__name__)

SYNC = 1.0  # seconds between reads of the entries other replicas stored
MAX_KNOWN = 1_000_000  # digests remembered; past it, forgotten and read again
HEADER = b"x-gateway-cache"
MODES = (b"use", b"refresh", b"skip")
_NOT_KEYED = ("stream", "stream_options")  # both shapes share one entry


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
        self._seen = float("-inf")  # the newest index score read
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._sync())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _sync(self) -> None:
        while True:
            try:
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
        if lookup.refresh or lookup.digest not in self._known:
            return None
        try:
            stored = await self.store.get(lookup.model, lookup.digest)
        except Exception as exc:  # Redis down or slow: the engine answers
            log.warning("response cache lookup failed: %s", exc)
            return None
        if stored is None:
            return None
        whole = orjson.loads(stored)
        usage = whole.get("usage") if isinstance(whole.get("usage"), dict) else None
        if request.stream:
            body = unfold(whole, request.endpoint.kind == "chat", request.usage_wanted)
            if body is None:
                return None
            ctype = b"text/event-stream; charset=utf-8"
        else:
            body, ctype = stored, b"application/json"
        choices = whole.get("choices") or [{}]
        finish = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
        prompt, completion = _tokens(usage)
        lookup.hit = True
        self._metrics.cache_tokens_by[lookup.model].inc(prompt + completion)
        return Replay(ctype, body, usage, finish, self.charged(prompt, completion))

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
        # Sent without waiting (no task): the reply only says whether it fit.
        self._known.add(lookup.digest)
        self.store.send_put(lookup.model, lookup.digest, value, int(time.time() * 1000)).add_done_callback(_stored)


def _stored(future: asyncio.Future[Any]) -> None:
    exc = None if future.cancelled() else future.exception()
    reply = None if exc is not None or future.cancelled() else future.result()
    if exc is not None or isinstance(reply, Exception):  # NOSCRIPT after a Redis restart included
        log.warning("response cache store failed: %s", exc or reply)


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (p if isinstance(p, int) else 0), (c if isinstance(c, int) else 0)
