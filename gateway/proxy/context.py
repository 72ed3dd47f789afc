"""What every request of one gateway process shares: settings, metrics, engines, router, clients,
access, the store. Built whole by `Gateway.build` before the app serves, and frozen: nothing
reassigns a field afterwards. What changes at run time lives inside a service (the pool's engine
states, the store service's open store, the route store's weights), never in the context."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.access.admin_auth import AdminAuth
from gateway.access.auth import KeyedAccess
from gateway.access.base import Access, OpenAccess
from gateway.access.jwt_clients import JwtClients
from gateway.access.keys import KeyStore
from gateway.access.leases import Leases
from gateway.access.oidc import OidcProvider
from gateway.access.quota import Quota
from gateway.access.sessions import OidcSignIn
from gateway.access.teams import TeamStore
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
from gateway.monitor.alerts import BudgetAlerts
from gateway.monitor.audit import AuditLog
from gateway.monitor.spend import SpendLog
from gateway.monitor.writer import InferenceLog
from gateway.observe.observer import Observer
from gateway.proxy.drain import Drain
from gateway.proxy.relay import SendWatchdog
from gateway.resp.connect import RedisClients, build_clients
from gateway.settings import ModelSettings, Settings
from gateway.store.service import StoreService

# An admin call (a scan of the keys, a route write) is bounded by redis.timeout plus this: it does
# more than one command, and a loaded machine's Redis answers a list of keys more slowly than an
# admission; a stalled Redis still gets a 503 within about a second, not the client library's 10.
ADMIN_MARGIN = 0.5


@dataclass(frozen=True, slots=True)
class RedisServices:
    """Keys, teams, quotas, the route store and sign-in sessions: everything of a process that
    lives in Redis."""

    clients: RedisClients
    keys: KeyStore
    teams: TeamStore
    quota: Quota
    routes: RouteStore
    counter: PromptCounter  # prompt tokens, for the reservations
    alerts: BudgetAlerts | None  # budget webhooks (pricing.alerts)
    sign_in: OidcSignIn | None  # console sessions and provider tokens (auth.oidc)

    @classmethod
    def build(
        cls, settings: Settings, router: Router, metrics: GatewayMetrics, counter: PromptCounter
    ) -> RedisServices:
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
            currency=settings.pricing.currency,
        )
        if settings.leases.enabled:
            quota.leases = Leases(quota, clients.lean, clients.subscriber, settings.leases)
        engines = {e.name: e for e in settings.engines}
        pricing = settings.pricing
        alerts = BudgetAlerts(pricing.alerts, clients.admin, pricing.currency) if pricing.alerts else None
        oidc = settings.auth.oidc
        sign_in = OidcSignIn(OidcProvider(oidc), clients.admin, r.prefix) if oidc is not None else None
        return cls(
            clients,
            KeyStore(clients.admin, r.prefix, timeout=2 * r.timeout, admin_timeout=r.timeout + ADMIN_MARGIN),
            TeamStore(clients.admin, r.prefix),
            quota,
            RouteStore(clients.admin, clients.subscriber, r.prefix, router, engines, timeout=r.timeout + ADMIN_MARGIN),
            counter,
            alerts,
            sign_in,
        )

    def start(self) -> None:
        self.routes.start()  # follows route changes made on any replica
        if self.alerts is not None:
            self.alerts.start()

    async def stop(self) -> None:
        if self.sign_in is not None:
            await self.sign_in.provider.close()
        if self.alerts is not None:
            await self.alerts.stop()
        await self.routes.stop()
        await self.clients.aclose()


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
    admin_auth: AdminAuth  # who calls the admin API: the admin key, a console session, a provider token
    redis: RedisServices | None  # None without `redis.url`
    audit: AuditLog | None  # admin changes, to the store (with Redis: the admin API needs it)
    spend: SpendLog | None  # hourly spend rollups, to the store
    store: StoreService  # files, batches, the inference log; opened in the background
    inference_log: InferenceLog | None  # None when the log is off (inference_log.enabled)
    prompt_limits: Mapping[str, int]  # model -> max request bytes
    counter: PromptCounter  # prompt tokens: quota reservations and the models' max_prompt_tokens
    models: Mapping[str, ModelSettings]  # by public name
    observe: Observer | None  # access log, traces, Server-Timing; None when all are off
    cache: ResponseCache | None  # None: no model uses the response cache (or no Redis)
    adapters: Adapters | None  # None: no `adapters:` section (or no Redis)
    started: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        settings: Settings,
        metrics_hub: str | None = None,
        drain: Drain | None = None,
        control_path: str | None = None,
    ) -> Gateway:
        metrics = GatewayMetrics(metrics_hub)
        # a breaker's trial request is void once it could have timed out (and its slot freed)
        trial_timeout = settings.server.first_byte_timeout + 1
        pool = Pool(settings.engines, settings.health, metrics, trial_timeout=trial_timeout)
        router = Router(pool, settings.models, settings.routing)
        scheduler = Scheduler(settings, router, metrics) if settings.scheduler.enabled else Unscheduled(router)
        counter = PromptCounter({m.name: m.tokenizer for m in settings.models})
        redis = RedisServices.build(settings, router, metrics, counter) if settings.redis.url else None
        access: Access = OpenAccess()
        audit = spend = None
        if redis is not None:
            audit, spend = AuditLog(), SpendLog(alerts=redis.alerts)
        if redis is not None and settings.auth.enabled:
            access = _keyed_access(settings, redis, metrics, spend)
        admin_auth = AdminAuth(settings.auth.admin_key, redis.sign_in if redis is not None else None)
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
            admin_auth,
            redis,
            audit,
            spend,
            StoreService(settings.store),
            InferenceLog(log, settings.models, metrics) if log.enabled else None,
            {m.name: min(default, m.max_prompt_bytes or default) for m in settings.models},
            counter,
            models,
            Observer.build(settings, metrics),
            cache,
            adapters,
        )


def _keyed_access(
    settings: Settings, redis: RedisServices, metrics: GatewayMetrics, spend: SpendLog | None
) -> KeyedAccess:
    access = KeyedAccess(redis.keys, redis.quota, redis.counter, settings.auth, metrics, settings.pricing)
    if spend is not None:
        access.spend_sink = spend.add
    oidc = settings.auth.oidc
    if redis.sign_in is not None and oidc is not None and oidc.client_audience:
        access.jwt_clients = JwtClients(redis.sign_in.provider, redis.teams, oidc.client_audience)
    return access
