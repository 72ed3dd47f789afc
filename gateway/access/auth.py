"""API keys and quotas on the request path: authenticate -> admit (reserve) -> settle (reconcile).

Money: admission reserves the most the request may cost at the model's price (its prompt and
max_tokens); settle charges what the engine reported, and hands each settled request to the
spend sink (the hourly rollups to the store, gateway/monitor/spend.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

from starlette.types import Scope

from gateway.access.base import Grant, Principal, Usage
from gateway.access.jwt_clients import JwtClients
from gateway.access.keys import KeyStore
from gateway.access.oidc import looks_like_jwt
from gateway.access.quota import Admission, Quota, reservation
from gateway.access.tokens import PromptCounter
from gateway.core.errors import Code, GatewayError, invalid_key
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import ApiRequest, header
from gateway.settings import AuthSettings, PricingSettings

log = logging.getLogger(__name__)

# (the settled grant, the usage charged, its cost in nano-units): the spend rollups listen here
SpendSink = Callable[[Grant, Usage, int], None]

ADMIN = Principal(key_id="admin")


def bearer(scope: Scope) -> str:
    value = header(scope, b"authorization")
    if not value:
        raise GatewayError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code=Code.MISSING_API_KEY)
    scheme, _, secret = value.decode("latin-1").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise invalid_key("Malformed Authorization header: expected 'Bearer <key>'.")
    return secret


def is_admin_key(secret: str, admin_key: str | None) -> bool:
    # Constant-time, so response timing says nothing about how much of a guess was right.
    return admin_key is not None and hmac.compare_digest(secret.encode(), admin_key.encode())


class KeyedAccess:
    def __init__(
        self,
        keys: KeyStore,
        quota: Quota,
        counter: PromptCounter,
        settings: AuthSettings,
        metrics: GatewayMetrics,
        pricing: PricingSettings | None = None,
    ) -> None:
        self.keys = keys
        self.pricing = pricing or PricingSettings()
        self._prices = self.pricing.models  # read on every settle: a plain dict
        self.spend_sink: SpendSink | None = None
        self.jwt_clients: JwtClients | None = None  # client JWTs in place of keys (auth.oidc.client_audience)
        self.quota = quota
        self._counter = counter
        self._settings = settings
        self._metrics = metrics
        self._in_flight: dict[str, Admission] = {}  # lease id -> admission
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_leases(), name="lease-refresh")
        self.quota.start()

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self.quota.close()

    async def authenticate(self, scope: Scope) -> Principal:
        secret = bearer(scope)
        if self._settings.admin_is_client and is_admin_key(secret, self._settings.admin_key):
            return ADMIN
        if self.jwt_clients is not None and looks_like_jwt(secret):
            return await self.jwt_clients.principal(secret)
        key = await self.keys.resolve(secret)
        if key is None or not key.usable(time.time()):
            raise invalid_key()
        return Principal(key.id, key.models, key, key.priority, key.weight)

    async def principal_of(self, key_id: str | None) -> Principal:
        if key_id is None:
            return Principal()
        if key_id == ADMIN.key_id:
            return ADMIN
        key = await self.keys.record_for(key_id)
        if key is None:
            raise invalid_key(f"The API key {key_id} that owns this batch does not exist.")
        return Principal(key.id, key.models, key)

    async def admit(self, principal: Principal, request: ApiRequest) -> Grant:
        key = principal.key
        if key is None:
            return Grant(principal, request)
        prompt = None
        if key.token_limited:
            # Without a cap the engine may write up to the context length: set one, so the
            # reservation bounds what the request can spend and a budget is never overspent.
            request.cap_max_tokens(self._settings.default_max_tokens)
            prompt = await self._counter.of(request)
        reserve = reservation(key, request, prompt or 0)
        price = self._prices.get(request.model)
        money = price.ceiling(prompt or 0, reserve - (prompt or 0)) if price is not None else 0
        try:
            admission = await self.quota.admit(
                key, request.model, reserve, batch=request.batch_id is not None, money=money, line=request.batch_line
            )
        except GatewayError as exc:
            if exc.status == 429 and exc.code is not None:
                self._metrics.quota_rejections.labels(str(exc.code)).inc()
            raise
        self._in_flight[admission.lease_id] = admission
        headers = [(k.encode(), v.encode()) for k, v in admission.headers.items()]
        return Grant(principal, request, admission, headers)

    async def settle(self, grant: Grant, usage: Usage) -> Usage:
        admission: Admission | None = grant.admission
        if admission is None:
            return usage
        self._in_flight.pop(admission.lease_id, None)
        if not usage.exact:
            # The engine never reported usage (aborted, failed): charge what we know was spent,
            # the prompt only when the engine got as far as writing something.
            prompt = 0
            if usage.completion_tokens and grant.request is not None:
                prompt = await self._counter.of(grant.request)  # counted once: at admission when it was
            usage = Usage(prompt, usage.completion_tokens, exact=False)
        model = grant.request.model if grant.request is not None else ""
        price = self._prices.get(model)
        cost = price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) if price else 0
        grant.usage, grant.cost = usage, cost  # before the release: a cancelled wait there has charged all the same
        await self.quota.release(admission, usage.prompt_tokens, usage.completion_tokens, cost)
        if self.spend_sink is not None:
            self.spend_sink(grant, usage, cost)
        m = self._metrics
        if usage.prompt_tokens:
            m.key_tokens_by[admission.key_id, "prompt"].inc(usage.prompt_tokens)
        if usage.completion_tokens:
            m.key_tokens_by[admission.key_id, "completion"].inc(usage.completion_tokens)
        return usage

    async def _refresh_leases(self) -> None:
        # Long streams outlive a lease; extend every in-flight one in one pipeline.
        interval = max(0.1, self.quota.lease_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            if self._in_flight:
                await self.quota.refresh_leases(list(self._in_flight.values()))
