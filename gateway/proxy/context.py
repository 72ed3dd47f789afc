"""What every request of one gateway process shares: settings, metrics, engines, router, clients,
access, the store. Built whole by `Gateway.build` before the app serves, and frozen: nothing
reassigns a field afterwards. What changes at run time lives inside a service (the pool's engine
states, the store service's open store, the route store's weights), never in the context."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.access.auth import KeyedAccess
from gateway.access.base import Access, OpenAccess
from gateway.access.keys import KeyStore
from gateway.access.quota import Quota
from gateway.access.tokens import PromptCounter
from gateway.adapters.service import Adapters
from gateway.cache.service import ResponseCache
from gateway.cache.store import CacheStore
from gateway.core.metrics import GatewayMetrics
from gateway.dispatch.route_store import RouteStore
from gateway.dispatch.routing import Router
from gateway.dispatch.scheduler import Dispatcher, Scheduler, Unscheduled
from gateway.dispatch.wake import EngineControl
from gateway.engines.client import Upstream
from gateway.engines.pool import Pool
from gateway.monitor.writer import InferenceLog
from gateway.proxy.drain import Drain
from gateway.proxy.relay import SendWatchdog
from gateway.resp.connect import RedisClients, build_clients
from gateway.settings import ModelSettings, Settings
from gateway.store.service import StoreService


@dataclass(frozen=True, slots=True)
class RedisServices:
    """Keys, quotas and the route store: everything of a process that lives in Redis."""

    clients: RedisClients
    keys: KeyStore
    quota: Quota
    routes: RouteStore
    counter: PromptCounter  # prompt tokens, for the reservations

    @classmethod
    def build(cls, settings: Settings, router: Router, metrics: GatewayMetrics) -> RedisServices:
        r = settings.redis
        assert r.url is not None
        clients = build_clients(r.url, cluster=r.cluster, timeout=r.timeout)
        quota = Quota(
            clients.lean,
            r.prefix,
            lease_ttl=settings.auth.lease_ttl,
            failure_mode=r.failure_mode,
            redis_timeout=r.timeout,
            metrics=metrics,
        )
        engines = {e.name: e for e in settings.engines}
        return cls(
            clients,
            KeyStore(clients.admin, r.prefix, timeout=2 * r.timeout),
            quota,
            RouteStore(clients.admin, clients.subscriber, r.prefix, router, engines),
            PromptCounter({m.name: m.tokenizer for m in settings.models}),
        )

    def start(self) -> None:
        self.routes.start()  # follows route changes made on any replica

    async def stop(self) -> None:
        await self.routes.stop()
        await self.clients.aclose()
        self.counter.close()


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    metrics: GatewayMetrics
    pool: Pool
    router: Router
    upstream: Upstream
    watchdog: SendWatchdog
    scheduler: Dispatcher  # engine slots: priorities and fair share when engines are full
    control: EngineControl  # managed engines' states and wakes (scale to zero), from the main process
    drain: Drain  # the graceful shutdown of this process
    access: Access  # OpenAccess, or keys and quotas in Redis
    redis: RedisServices | None  # None without `redis.url`
    store: StoreService  # files, batches, the inference log; opened in the background
    inference_log: InferenceLog | None  # None when the log is off (inference_log.enabled)
    prompt_limits: Mapping[str, int]  # model -> max request bytes
    models: Mapping[str, ModelSettings]  # by public name
    cache: ResponseCache | None = None  # None: no model uses the response cache (or no Redis)
    adapters: Adapters | None = None  # None: no `adapters:` section (or no Redis)
    started: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        settings: Settings,
        multiprocess_dir: str | None = None,
        drain: Drain | None = None,
        control_path: str | None = None,
    ) -> Gateway:
        metrics = GatewayMetrics(multiprocess_dir)
        pool = Pool(settings.engines, settings.health, metrics)
        router = Router(pool, settings.models, settings.routing)
        scheduler = Scheduler(settings, router, metrics) if settings.scheduler.enabled else Unscheduled(router)
        redis = RedisServices.build(settings, router, metrics) if settings.redis.url else None
        access: Access = OpenAccess()
        if redis is not None and settings.auth.enabled:
            access = KeyedAccess(redis.keys, redis.quota, redis.counter, settings.auth, metrics)
        log = settings.inference_log
        default = settings.server.max_body_bytes
        models = {m.name: m for m in settings.models}
        cache = None
        if redis is not None and ResponseCache.wanted(settings.cache, models):
            c = settings.cache
            store = CacheStore(redis.clients.lean, settings.redis.prefix, c.ttl, c.max_memory)
            cache = ResponseCache(c, models, lambda m: router.routes[m], store, metrics)
        upstream = Upstream(settings.server)
        adapters = None
        if redis is not None and settings.adapters is not None:
            p = settings.redis.prefix
            adapters = Adapters(settings.adapters, redis.clients, p, router, models, upstream, metrics)
        return cls(
            settings,
            metrics,
            pool,
            router,
            upstream,
            SendWatchdog(settings.server.send_timeout),
            scheduler,
            EngineControl(pool, router, metrics, control_path),
            drain or Drain(),
            access,
            redis,
            StoreService(settings.store),
            InferenceLog(log, settings.models, metrics) if log.enabled else None,
            {m.name: min(default, m.max_prompt_bytes or default) for m in settings.models},
            models,
            cache,
            adapters,
        )
