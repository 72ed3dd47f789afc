"""The running configuration of one gateway process, and its replacement by a reload.

`Running` is the process's ASGI app. Each configuration is a `Version`: a Gateway
(gateway/proxy/context.py) and the app built over it (its routes behind its Front). A request is
given to the current version's app once, as it starts (our server reads `app` per request:
gateway/process/worker.py; any other server calls `Running`, which reads `current`), and
finishes there whatever happens meanwhile; a batch line takes `holder.gw` as it starts.

A reload (`apply`, one at a time):
1. stages the pool's changes: engines that are new (or at a new address) get one health check
   while still unlisted, so they take traffic from their first request;
2. builds the new Gateway from the current one (gateway/proxy/context.py keeps what did not
   change) and its app, and reads what was changed at run time on any replica (routes stored in
   Redis, adapters), so its router knows it from its first request;
3. starts the new version's own services, commits the pool and swaps: one assignment, after
   which new requests go to the new version;
4. lets the old version go, in the background, once no request uses it: its own services stop
   (gateway/proxy/lifecycle.py) and the engines no configuration names any more leave the pool.
Until the swap nothing serving has changed: a failure before it leaves the running configuration
as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from gateway.engines import tls
from gateway.front.middleware import Front
from gateway.proxy import lifecycle
from gateway.proxy.context import Current, Gateway
from gateway.settings.source import Loaded
from gateway.store.service import StoreUser

log = logging.getLogger(__name__)

LET_GO_POLL = 0.2  # seconds between looks at whether a replaced version still serves a request
PRIME_TIMEOUT = 2.0  # reading the runtime routes and adapters before a swap; past it, they follow


class ReloadError(Exception):
    """The new configuration could not be put in place; the running one is unchanged."""


@dataclass(frozen=True)
class Version:
    gw: Gateway
    front: Front
    version: str  # gateway/settings/source.py
    loaded_at: float


class Running:
    def __init__(
        self,
        gw: Gateway,
        version: str,
        make_front: Callable[[Gateway], Front],
        users: list[StoreUser],
        holder: Current,
    ) -> None:
        self._make_front = make_front
        self._users = users  # the process's own users of the store (the batch runner, the retention)
        self.holder = holder
        self.current = Version(gw, make_front(gw), version, time.time())
        self.previous: str | None = None  # the version before the last reload
        self.reloads = 0
        self.on_swap: list[Callable[[Version], None]] = []  # the server follows (its app, its TLS)
        self.on_start: list[Callable[[], Awaitable[None]]] = []  # started with the app, stopped before it
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        self._lock = asyncio.Lock()
        self._replaced: list[Version] = []  # swapped out, some request still on them
        self._letting_go: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.current.front(scope, receive, send)

    # -- the reload ----------------------------------------------------------------------------

    async def apply(self, loaded: Loaded) -> bool:
        """Serves `loaded` from now on; False when it is the running version already. Raises
        ReloadError when it cannot (the running configuration stays)."""
        async with self._lock:
            old = self.current
            if loaded.version == old.version:
                return False
            settings = loaded.settings
            pool = old.gw.pool
            tls.forget()  # a renewed CA bundle under the same path is read again
            change = pool.stage(settings.engines, settings.health, settings.server.first_byte_timeout + 1)
            gw: Gateway | None = None
            try:
                old.gw.control.adopt(change.added.values())
                await pool.probe(change.added.values())
                gw = Gateway.build(settings, previous=old.gw)
                front = self._make_front(gw)
                await _prime(gw)
                await lifecycle.start(gw, before=old.gw)
            except Exception as exc:
                log.exception("the new configuration (version %s) could not be put in place", loaded.version)
                if gw is not None:  # what it started, if anything, goes
                    with contextlib.suppress(Exception):
                        await lifecycle.stop(gw, [old.gw])
                raise ReloadError(f"the new configuration could not be put in place: {exc!r}") from None
            for watcher in pool.commit(change):
                self._background(watcher.stop())
            gw.slots.forget(change.changed)
            gw.control.follow(gw.router)
            self.current = new = Version(gw, front, loaded.version, time.time())
            self.holder.gw = gw
            self.previous, self.reloads = old.version, self.reloads + 1
            for follow in self.on_swap:
                follow(new)
            self._replaced.append(old)
            self._background(self._let_go(old))
            return True

    async def _let_go(self, old: Version) -> None:
        """Stops what only `old` uses once no request is on it (a stream may take minutes)."""
        gw = old.gw
        # Polled: an event set by the last request out would cost every request a check.
        while old.front.active or any(getattr(ex, "gw", None) is gw for ex in gw.drain.live):  # noqa: ASYNC110
            await asyncio.sleep(LET_GO_POLL)
        try:
            await self._stop_replaced(old)
        except Exception:  # what it held stays open; the process serves on
            log.exception("configuration %s could not be let go cleanly", old.version)

    async def _stop_replaced(self, old: Version) -> None:
        self._replaced.remove(old)
        alive = [self.current.gw, *(v.gw for v in self._replaced)]
        await lifecycle.stop(old.gw, alive)
        named = {e.name for g in alive for e in g.settings.engines}
        await old.gw.pool.retire([e.name for e in old.gw.settings.engines if e.name not in named])
        log.info("configuration %s let go: no request uses it any more", old.version)

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._letting_go.add(task)
        task.add_done_callback(self._letting_go.discard)

    # -- the process's start and end -----------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await lifecycle.start(self.current.gw, users=self._users, greeting={"version": self.current.version})
            for start in self.on_start:
                await start()
        except Exception as exc:
            log.exception("the gateway could not start")
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        for stop in self.on_stop:
            await stop()
        async with self._lock:
            for task in list(self._letting_go):
                task.cancel()
            await asyncio.gather(*self._letting_go, return_exceptions=True)
            for old in list(self._replaced):  # the drain is over: nothing is left on them
                await self._stop_replaced(old)
            await lifecycle.stop(self.current.gw)
        await send({"type": "lifespan.shutdown.complete"})


async def _prime(gw: Gateway) -> None:
    """What other replicas changed at run time, read before the new router serves: routes stored
    in Redis (canary weights), adapters added through the admin API. Redis out of reach: the new
    version starts with the file's, and its route store and adapters catch up when Redis is back."""
    try:
        async with asyncio.timeout(PRIME_TIMEOUT):
            if gw.redis is not None:
                await gw.redis.routes.reload()
            if gw.adapters is not None:
                await gw.adapters.registry.refresh()
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("the new configuration starts with the file's routes and adapters: Redis: %r", exc)
