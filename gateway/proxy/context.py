"""What every request of one gateway process shares: settings, metrics, engines, router, clients,
access, the store. Built whole by `Gateway.build` before the app serves, and frozen: nothing
reassigns a field afterwards. What changes at run time lives inside a service (the pool's engine
states, the store service's open store, the route store's weights), never in the context.

A configuration reload builds a new Gateway from its predecessor (`previous`): a request keeps
the one it started with to its end, and new requests take the new one (gateway/front/running.py).
What lives as long as the process is shared whatever changed (the metrics, the engine pool, the
scheduler's queue, the control channel, the drain, the store, the Redis clients); a service whose
settings did not change is reused (the upstream client, the observer, the access and quota, the
prompt counter, the inference log); the rest is built anew (the router and what reads its routes:
the scheduler, the route store, the response cache, the adapters). `Current` holds the newest, for
the work that outlives a request (a batch takes it for each of its lines)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
from gateway.dispatch.scheduler import Dispatcher, Scheduler, SlotQueue, Unscheduled
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
T = TypeVar("T")


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
        cls,
        settings: Settings,
        router: Router,
        metrics: GatewayMetrics,
        counter: PromptCounter,
        previous: RedisServices | None = None,
        whole: bool = False,
    ) -> RedisServices:
        """With `previous` (a reload): its clients (the redis section needs a restart), and, when
        it is kept `whole` (`Gateway.build` says), everything but the route store (which follows
        the new configuration's router)."""
        r = settings.redis
        assert r.url is not None
        engines = {e.name: e for e in settings.engines}
        timeout = r.timeout + ADMIN_MARGIN
        if previous is not None and whole:
            routes = RouteStore(previous.clients.admin, previous.clients.subscriber, r.prefix, router, engines, timeout)
            return dataclasses.replace(previous, routes=routes)
        clients = (
            previous.clients if previous is not None else build_clients(r.url, cluster=r.cluster, timeout=r.timeout)
        )
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
        pricing = settings.pricing
        alerts = BudgetAlerts(pricing.alerts, clients.admin, pricing.currency) if pricing.alerts else None
        oidc = settings.auth.oidc
        sign_in = OidcSignIn(OidcProvider(oidc), clients.admin, r.prefix) if oidc is not None else None
        return cls(
            clients,
            KeyStore(clients.admin, r.prefix, timeout=2 * r.timeout, admin_timeout=r.timeout + ADMIN_MARGIN),
            TeamStore(clients.admin, r.prefix),
            quota,
            RouteStore(clients.admin, clients.subscriber, r.prefix, router, engines, timeout),
            counter,
            alerts,
            sign_in,
        )


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
    slots: SlotQueue  # the scheduler's queue and capacities, shared by every configuration
    started: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls,
        settings: Settings,
        metrics_hub: str | None = None,
        drain: Drain | None = None,
        control_path: str | None = None,
        previous: Gateway | None = None,
    ) -> Gateway:
        p = previous
        kept = _Kept(p, settings)
        # a breaker's trial request is void once it could have timed out (and its slot freed)
        trial_timeout = settings.server.first_byte_timeout + 1
        if p is None:
            metrics = GatewayMetrics(metrics_hub)
            pool = Pool(settings.engines, settings.health, metrics, trial_timeout=trial_timeout)
            slots = SlotQueue(pool, metrics)
        else:  # the caller stages the pool's changes and commits them (gateway/engines/pool.py)
            metrics, pool, slots = p.metrics, p.pool, p.slots
        router = Router(pool, settings.models, settings.routing)
        scheduler: Dispatcher = Scheduler(settings, router, metrics, slots=slots)
        if not settings.scheduler.enabled:
            scheduler = Unscheduled(router)
        counter = kept.reuse(
            lambda s: {m.name: m.tokenizer for m in s.models},
            lambda g: g.counter,
            lambda: PromptCounter({m.name: m.tokenizer for m in settings.models}),
        )
        # keys, quotas, spend: kept whole (their in-flight leases, their caches) unless they changed
        whole = (
            p is not None and p.counter is counter and kept.unchanged(lambda s: (s.redis, s.auth, s.pricing, s.leases))
        )
        redis = None
        if settings.redis.url:
            redis = RedisServices.build(settings, router, metrics, counter, p.redis if p else None, whole)
        access: Access = OpenAccess()
        audit = spend = None
        if redis is not None:
            audit = p.audit if p is not None and p.audit is not None else AuditLog()
            spend = p.spend if p is not None and whole else SpendLog(alerts=redis.alerts)
        if p is not None and whole:
            access = p.access
        elif redis is not None and settings.auth.enabled:
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
        upstream = kept.reuse(
            lambda s: (s.server, [(e.url, e.api_key, e.ca_file) for e in s.engines]),
            lambda g: g.upstream,
            lambda: Upstream(settings.server),
        )
        if p is not None and upstream is p.upstream and any(e.ca_file for e in settings.engines):
            upstream = Upstream(settings.server)  # its TLS contexts read the CA files again (renewed in place)
        adapters = None
        if redis is not None and settings.adapters is not None:
            prefix = settings.redis.prefix
            adapters = Adapters(settings.adapters, redis.clients, prefix, router, models, upstream, metrics)
        send_timeout = settings.server.send_timeout
        return cls(
            settings,
            metrics,
            pool,
            router,
            upstream,
            kept.reuse(lambda s: s.server.send_timeout, lambda g: g.watchdog, lambda: SendWatchdog(send_timeout)),
            scheduler,
            p.control if p is not None else EngineControl(pool, router, metrics, control_path),
            p.drain if p is not None else drain or Drain(),
            access,
            admin_auth,
            redis,
            audit,
            spend,
            p.store if p is not None else StoreService(settings.store),
            kept.reuse(
                lambda s: (s.inference_log, [(m.name, m.log_payloads) for m in s.models]),
                lambda g: g.inference_log,
                lambda: InferenceLog(log, settings.models, metrics) if log.enabled else None,
            ),
            {m.name: min(default, m.max_prompt_bytes or default) for m in settings.models},
            counter,
            models,
            kept.reuse(
                lambda s: (s.tracing, s.logging), lambda g: g.observe, lambda: Observer.build(settings, metrics)
            ),
            cache,
            adapters,
            slots,
            p.started if p is not None else time.time(),
        )


class _Kept:
    """What a new configuration keeps of its predecessor's services."""

    def __init__(self, previous: Gateway | None, settings: Settings) -> None:
        self._previous = previous
        self._settings = settings

    def unchanged(self, part: Callable[[Settings], Any]) -> bool:
        p = self._previous
        return p is not None and part(p.settings) == part(self._settings)

    def reuse(self, part: Callable[[Settings], Any], service: Callable[[Gateway], T], build: Callable[[], T]) -> T:
        """The predecessor's service when the part of the settings it is built from is unchanged."""
        p = self._previous
        return service(p) if p is not None and self.unchanged(part) else build()


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


class Current:
    """The process's newest Gateway, for work that outlives a request: each piece of it (a batch
    line) reads `gw` once when it starts and keeps what it read."""

    __slots__ = ("gw",)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
